"""``distill convert`` over several ranks (torch.distributed, gloo on CPU), as a user runs it:
``torchrun --nproc-per-node 2 -m distill convert ...``, each rank a process.

The reference is the same command in one process: two ranks must give the same student (to 1e-5;
the summed gradients of data-parallel steps differ from one process's only in rounding) and the
same report figures. A rank that dies stops the others with one line, and ``--resume`` in one
process then finishes the run as an uninterrupted one ends.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pipeline_tiny import TINY_OVERRIDES, save_tiny_model, write_text
from test_eval import task_dir  # noqa: F401  (a fixture)
from safetensors.torch import load_file

from distill.pipeline.checkpoint import RunStore
from distill.pipeline.run import run_convert
from distill.pipeline.run_config import load_run_config
from distill.distributed import Comm, lost_contact, split_blocks

TIMEOUT = 300
ONE = [sys.executable, "-m", "distill"]
TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "distill"]
BASE = TINY_OVERRIDES + ["model.feature_map=hedgehog", "model.window=4", "dist_timeout=60"]
STUDENT = ["transfer.inputs=student", "transfer.batch_size=3", "transfer.evicted_weight=0.5"]
FINETUNE = ["finetune.enabled=true", "finetune.steps=3", "finetune.batch_size=3", "finetune.lora_rank=2", "finetune.crop=16"]


def env(**extra: str) -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", **extra)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-assets")
    return {"model": str(save_tiny_model(root / "model", layers=4)), "data": str(write_text(root / "text.txt"))}


def argv(assets, out: Path, *extra: str) -> list[str]:
    return ["convert", assets["model"], "--out", str(out), *BASE, f"data={assets['data']}", *extra]


def convert(prefix: list[str], assets, out: Path, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run([*prefix, *argv(assets, out, *extra)], capture_output=True, text=True, env=env(), timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def convert_here(assets, out: Path, *extra: str) -> None:
    """The one-process reference, run in this process (it saves a process start)."""
    args = argv(assets, out, *extra)
    run_convert(args[1], out, load_run_config(None, args[4:]))


def assert_same_student(a: Path, b: Path, atol: float) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert set(wa) == set(wb)
    worst = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    assert worst <= atol, f"largest weight difference {worst:.3g} > {atol}"


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text(encoding="utf-8"))


def assert_same_figures(a: dict, b: dict) -> None:
    for key in ("teacher_ppl", "student_ppl", "ppl_ratio"):
        assert b[key] == pytest.approx(a[key], rel=1e-6), key
    for la, lb in zip(a["layers"], b["layers"], strict=True):
        for key in ("layer", "fit_error", "attn_kl", "transfer_mse_before", "transfer_mse_after"):
            assert lb[key] == pytest.approx(la[key], rel=1e-4, abs=1e-7), (la["layer"], key)
    assert a["tokens_by_stage"] == b["tokens_by_stage"]


def test_two_ranks_with_teacher_inputs_give_the_one_process_student(assets, tmp_path):
    """Layer-parallel transfer (each rank a block of layers), fit split by layer, select scored
    by layer, perplexity by sequence."""
    extra = ["select.keep_softmax=1", "select.from_position=8"]
    convert_here(assets, tmp_path / "one", *extra)
    done = convert(TWO, assets, tmp_path / "two", *extra)
    assert_same_student(tmp_path / "one", tmp_path / "two", atol=1e-5)
    one, two = report(tmp_path / "one"), report(tmp_path / "two")
    assert_same_figures(one, two)
    assert two["select"]["kept"] == one["select"]["kept"] and two["ranks"] == 2
    assert done.stdout.count("held-out perplexity:") == 1, done.stdout  # rank 0 speaks for the run
    assert "layers per rank [[0, 1], [2, 3]]" in (tmp_path / "two" / "logs" / "rank0.log").read_text()
    assert (tmp_path / "two" / "logs" / "rank1.log").is_file()


def test_two_ranks_with_student_inputs_and_finetune_give_the_one_process_student(assets, tmp_path):
    """Data-parallel transfer and finetune: each global batch of 3 split over the ranks."""
    convert_here(assets, tmp_path / "one", *STUDENT, *FINETUNE)
    convert(TWO, assets, tmp_path / "two", *STUDENT, *FINETUNE)
    assert_same_student(tmp_path / "one", tmp_path / "two", atol=1e-5)
    assert_same_figures(report(tmp_path / "one"), report(tmp_path / "two"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(assets, out: Path, per_rank: list[list[str]], *extra: str) -> list[subprocess.Popen]:
    """Start the ranks by hand (as torchrun would, without its agent that kills the survivors)."""
    base = env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(len(per_rank)))
    return [
        subprocess.Popen(
            [*ONE, *argv(assets, out, *extra, *own)],
            env=dict(base, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r, own in enumerate(per_rank)
    ]


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("distill: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("fsdp", [False, True])
def test_a_killed_rank_stops_the_other_then_one_process_resumes(assets, tmp_path, fsdp):
    """Rank 1 dies in the middle of a layer: in its second block (layer-parallel transfer) or, with
    fsdp=true, inside the sharded collectives of layer 3; one process then resumes either run."""
    steps = ["transfer.steps=150"]  # long enough to kill rank 1 inside its second layer
    reference = tmp_path / "reference"
    convert_here(assets, reference, *steps)
    out = tmp_path / "run"
    ranks = launch(assets, out, [[], []], *steps, "dist_timeout=30", f"fsdp={str(fsdp).lower()}")
    manifest = out / "state" / "manifest.json"
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:  # the first round of layers (0 and 2) is checkpointed
        try:
            if "transfer/layer_002" in json.loads(manifest.read_text())["entries"]:
                break
        except (OSError, ValueError, KeyError):
            pass
        assert ranks[0].poll() is None, ranks[0].communicate()[1][-3000:]
        time.sleep(0.05)
    ranks[1].send_signal(signal.SIGKILL)
    killed = time.time()
    stderr = ranks[0].communicate(timeout=120)[1]
    assert time.time() - killed < 30 + 15, "the surviving rank did not stop within its timeout"
    assert ranks[0].returncode == 1
    line = error_line(stderr)
    assert "lost contact with the other ranks" in line and "--resume" in line, line
    assert not (out / "model.safetensors").exists()

    done = subprocess.run([*ONE, *argv(assets, out, *steps), "--resume"], capture_output=True, text=True, env=env(), timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "transfer/layer_000" in json.loads(manifest.read_text())["entries"]
    assert_same_student(reference, out, atol=1e-5)


@pytest.mark.parametrize(
    "per_rank,wanted",
    [
        ([[], ["transfer.steps=7"]], ["config.transfer.steps", "same command"]),
        ([["fsdp=true", "data=self"]] * 2, ["data=self", "fsdp=false"]),  # sampling needs the whole teacher on one rank
        # the ranks load in turns under fsdp: rank 0's error in its turn reaches rank 1
        ([["fsdp=true", *FINETUNE, "finetune.targets=[qkv_proj]"]] * 2, ["finetune.targets names qkv_proj"]),
    ],
    ids=["different configs", "fsdp with data=self", "fsdp, refused in rank 0's turn"],
)
def test_bad_launches_are_refused_on_every_rank_before_any_work(assets, tmp_path, per_rank, wanted):
    out = tmp_path / "run"
    for rank in launch(assets, out, per_rank):
        stderr = rank.communicate(timeout=TIMEOUT)[1]
        assert rank.returncode == 2
        line = error_line(stderr)
        assert all(w in line for w in wanted), line
    assert not out.exists()


def test_fsdp_ranks_short_of_sequences_still_join_every_forward(assets, tmp_path):
    """3 held-out sequences scored one at a time (rank 1 has one fewer) and finetune steps of one
    sequence (rank 1 has none) over a sharded model: the spare forwards keep the ranks in step,
    also for the perplexity curve measured through the LoRA model, and change nothing."""
    extra = ["heldout_tokens=96", "batch_size_eval=1", *STUDENT, *FINETUNE, "finetune.batch_size=1", "finetune.eval_every=2"]
    convert_here(assets, tmp_path / "one", *extra)
    convert(TWO, assets, tmp_path / "two", *extra, "fsdp=true")
    assert_same_student(tmp_path / "one", tmp_path / "two", atol=1e-5)
    one, two = report(tmp_path / "one"), report(tmp_path / "two")
    assert_same_figures(one, two)
    assert [c["ppl"] for c in two["finetune_ppl_curve"]] == pytest.approx([c["ppl"] for c in one["finetune_ppl_curve"]], rel=1e-6)
    assert len(two["finetune_ppl_curve"]) == 2


def test_more_ranks_than_layers_to_train_still_converts(assets, tmp_path):
    keep = ["model.keep_softmax_layers=[0,1,2]"]  # one layer to train, two ranks
    convert_here(assets, tmp_path / "one", *keep)
    done = convert(TWO, assets, tmp_path / "two", *keep)
    assert "1 rank(s) idle" in done.stderr
    assert_same_student(tmp_path / "one", tmp_path / "two", atol=1e-5)


def test_a_gloo_transport_error_inside_a_gather_reads_as_lost_contact():
    """FSDP's gathers surface gloo's transport errors as plain RuntimeErrors (seen when a rank was
    killed during an all-gather); they become the one line, other RuntimeErrors stay bugs."""
    err = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                       "[127.0.0.1]:60309: Connection reset by peer. This is typically caused by a remote worker hanging")
    assert lost_contact(err) and not lost_contact(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    line = str(Comm(rank=1, world=2).lost(err))
    assert line.startswith("rank 1 lost contact with the other ranks (Read error [127.0.0.1]:60309: Connection reset") and "--resume" in line


@pytest.mark.parametrize("costs,parts", [([1.0] * 5, 2), ([5, 1, 1, 1, 1, 1], 2), ([1, 2, 3, 4, 5, 6, 7], 3), ([2.0], 3), ([], 2)])
def test_split_blocks_is_contiguous_and_optimal(costs, parts):
    blocks = split_blocks(costs, parts)
    assert len(blocks) == parts and [i for b in blocks for i in b] == list(range(len(costs)))
    best = min(  # every way to place parts−1 cuts
        (max(sum(costs[a:b]) for a, b in zip((0, *cuts), (*cuts, len(costs)))) for cuts in _cuts(len(costs), parts - 1)),
        default=0,
    )
    assert max((sum(costs[i] for i in b) for b in blocks), default=0) == best


def _cuts(n: int, k: int, start: int = 0):
    if k == 0:
        yield ()
        return
    for c in range(start, n + 1):
        for rest in _cuts(n, k - 1, c):
            yield (c, *rest)


def test_a_follower_store_reads_the_manifest_and_writes_nothing(tmp_path):
    import torch

    leader = RunStore(tmp_path)
    leader.create({"model": "m"})
    leader.save("a", {"x": torch.ones(2)}, {"seconds": 1.0})
    before = sorted(p.name for p in (tmp_path / "state").rglob("*"))
    follower = RunStore.follower(tmp_path)
    assert follower.has("a") and torch.equal(follower.load("a")[0]["x"], torch.ones(2))
    follower.save("b", {"y": torch.zeros(1)}, {"seconds": 2.0})
    follower.drop(["a"])
    assert follower.has("b") and follower.meta("b") == {"seconds": 2.0}
    assert sorted(p.name for p in (tmp_path / "state").rglob("*")) == before
    fresh = RunStore(tmp_path)
    fresh.open()
    assert set(fresh.entries) == {"a"}


def test_eval_over_two_ranks_gives_the_one_process_report(task_dir, tmp_path):  # noqa: F811
    """lm-eval splits the requests by rank; rank 0 gathers them and writes the one report."""
    from test_eval import tiny_llama, tiny_student, tiny_tokenizer

    from distill.cli import main

    tok = tiny_tokenizer()
    tiny_llama().save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    tiny_student().save_pretrained(tmp_path / "student", tokenizer=tok)
    args = ["eval", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"), "--tasks", "tiny_mc,tiny_ppl",
            "--include-path", str(task_dir), "--batch-size", "2", "--max-length", "64"]
    assert main([*args, "--out", str(tmp_path / "one.json")]) == 0
    done = subprocess.run([*TWO, *args, "--out", str(tmp_path / "two.json")], capture_output=True, text=True, env=env(),
                          timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert [(r["task"], r["metric"]) for r in two["rows"]] == [(r["task"], r["metric"]) for r in one["rows"]]
    for a, b in zip(one["rows"], two["rows"]):
        assert b["student"] == pytest.approx(a["student"], rel=1e-6) and b["teacher"] == pytest.approx(a["teacher"], rel=1e-6)
    assert two["lm_eval"]["student"]["n-samples"] == one["lm_eval"]["student"]["n-samples"]


def test_fsdp_shards_the_teacher_and_gives_the_one_process_student(assets, tmp_path):
    """fsdp=true: each rank holds half of the teacher's weights; fit, teacher-input transfer (then
    data parallel), select and a finetune with activation checkpointing give the one-process student."""
    extra = ["select.keep_softmax=1", "select.from_position=8", *FINETUNE, "finetune.activation_checkpointing=true"]
    convert_here(assets, tmp_path / "one", *extra)
    done = convert(TWO, assets, tmp_path / "two", *extra, "fsdp=true")
    assert_same_student(tmp_path / "one", tmp_path / "two", atol=1e-5)
    one, two = report(tmp_path / "one"), report(tmp_path / "two")
    assert_same_figures(one, two)
    assert two["select"]["kept"] == one["select"]["kept"]
    weights = load_file(str(tmp_path / "one" / "model.safetensors"))
    whole = sum(t.numel() * t.element_size() for t in weights.values()) / 2**30
    kept = sum(t.numel() * t.element_size() for k, t in weights.items() if not k.endswith("_proj.weight") and "norm" not in k and "embed" not in k) / 2**30
    assert two["weights_gib_per_rank"] == [pytest.approx((whole - kept) / 2 + kept, rel=0.05)] * 2, (whole, kept)
    assert "fsdp: this rank holds" in (tmp_path / "two" / "logs" / "rank1.log").read_text()
    assert done.stdout.count("held-out perplexity:") == 1, done.stdout
