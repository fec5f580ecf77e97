"""``distill convert`` end to end on a tiny model: outputs, resume, corrupt checkpoints, CLI errors."""
import json
import logging
import math
import os
import subprocess
import sys

import pytest
import torch
from pipeline_tiny import TINY_OVERRIDES, save_tiny_model, write_text
from safetensors.torch import load_file

from distill import load_converted
from distill.cli import main
from distill.errors import DistillError, RunFailed
from distill.pipeline import finetune as finetune_mod
from distill.pipeline import transfer as transfer_mod
from distill.pipeline.run_config import load_run_config
from distill.pipeline.perplexity import perplexity
from distill.pipeline.run import run_convert

FULL = TINY_OVERRIDES + [
    "model.feature_map=hedgehog",
    "model.window=4",
    "finetune.enabled=true",
    "finetune.steps=3",
    "finetune.lr=0.003",
    "finetune.lora_rank=2",
    "finetune.checkpoint_every=1",
    "finetune.eval_every=2",
    "finetune.crop=16",
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {"model": str(save_tiny_model(root / "model")), "data": str(write_text(root / "text.txt"))}


def _cfg(assets, *extra):
    return load_run_config(None, FULL + [f"data={assets['data']}", *extra])


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """One uninterrupted run that other tests compare against."""
    out = tmp_path_factory.mktemp("ref") / "run"
    report = run_convert(assets["model"], out, _cfg(assets))
    return out, report


def _weights(out):
    return load_file(str(out / "model.safetensors"))


def _same_model(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_outputs(reference):
    out, report = reference
    for key in ("teacher_ppl", "student_ppl", "tokens", "seconds", "layers"):
        assert key in report
    assert report["tokens"] == 256 and report["tokens_by_stage"]["finetune"] == 3 * 1 * 16
    assert [p["step"] for p in report["finetune_ppl_curve"]] == [2, 3]
    assert {"load", "data", "teacher_eval", "fit", "transfer", "finetune", "student_eval", "save", "total"} <= set(report["seconds"])
    assert [r["layer"] for r in report["layers"]] == [0, 1]
    for row in report["layers"]:
        assert {"layer", "fit_error", "transfer_mse_before", "transfer_mse_after"} <= set(row)
        assert row["transfer_mse_after"] < row["transfer_mse_before"]
        assert len(row["heads"]) == 4
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["student_ppl"] == report["student_ppl"]
    md = (out / "report.md").read_text()
    assert "held-out perplexity" in md and "| 1 |" in md
    assert "Student: feature map `hedgehog`, recurrence `linear`, window" in md
    assert {"fit.png", "transfer.png", "curves.png", "ppl_curve.png"} <= {p.name for p in out.glob("*.png")}
    assert (out / "tokenizer.json").exists() and (out / "run.yaml").read_text().startswith("# distill convert")


def test_saved_model_reloads_with_the_reported_perplexity(reference):
    out, report = reference
    model = load_converted(out)
    heldout = load_file(str(out / "state" / "data.safetensors"))["heldout"]
    assert perplexity(model, heldout, "parallel", 2) == pytest.approx(report["student_ppl"], rel=1e-4)


class Interrupt(KeyboardInterrupt):
    pass


def test_sparse_cache_is_switched_on_after_training(assets, reference, tmp_path):
    """Training-free: the same weights as without it; the saved model and its reported perplexity
    use it."""
    ref_out, ref_report = reference
    out = tmp_path / "sparse"
    report = run_convert(assets["model"], out, _cfg(assets, "model.sparse_cache=3"))
    _same_model(out, ref_out)
    model = load_converted(out)
    assert model.distill_config.sparse_cache == 3
    heldout = load_file(str(out / "state" / "data.safetensors"))["heldout"]
    assert perplexity(model, heldout, "parallel", 2) == pytest.approx(report["student_ppl"], rel=1e-4)
    assert report["student_ppl"] != pytest.approx(ref_report["student_ppl"], rel=1e-4)


def test_resume_after_interrupts_equals_uninterrupted(assets, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = _cfg(assets)
    real_train, real_loss = transfer_mod.train_layer, finetune_mod.distill_loss

    def stop_at_layer_1(attn, *args, **kwargs):
        if attn.layer_idx == 1:
            raise Interrupt
        return real_train(attn, *args, **kwargs)

    monkeypatch.setattr(transfer_mod, "train_layer", stop_at_layer_1)
    with pytest.raises(KeyboardInterrupt):
        run_convert(assets["model"], out, cfg)
    monkeypatch.setattr(transfer_mod, "train_layer", real_train)
    calls = {"n": 0}

    def stop_at_step_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Interrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(finetune_mod, "distill_loss", stop_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        run_convert(assets["model"], out, cfg, resume=True)
    manifest = json.loads((out / "state" / "manifest.json").read_text())
    assert manifest["entries"]["finetune"]["meta"]["step"] == 2
    monkeypatch.setattr(finetune_mod, "distill_loss", real_loss)
    report = run_convert(assets["model"], out, cfg, resume=True)
    _same_model(out, reference[0])
    assert report["student_ppl"] == reference[1]["student_ppl"]


def test_corrupt_checkpoint_restarts_from_the_last_good_step(assets, reference, tmp_path, caplog):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    layer1 = out / "state" / "transfer" / "layer_001.safetensors"
    data = bytearray(layer1.read_bytes())
    data[-5] ^= 0xFF  # same size, different bytes
    layer1.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        report = run_convert(assets["model"], out, _cfg(assets), resume=True)
    assert "transfer/layer_001 is corrupt or partial" in caplog.text
    assert "sha256" in caplog.text
    _same_model(out, reference[0])
    assert report["student_ppl"] == reference[1]["student_ppl"]
    # A truncated (partial) file early on: everything from it onwards is redone.
    fit = out / "state" / "fit.safetensors"
    fit.write_bytes(fit.read_bytes()[:100])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_convert(assets["model"], out, _cfg(assets), resume=True)
    assert "checkpoint fit is corrupt or partial" in caplog.text and "bytes" in caplog.text
    _same_model(out, reference[0])


def test_a_run_from_before_a_setting_existed_resumes(assets, reference, tmp_path):
    """A manifest written before ``model.linear_rope`` and ``transfer.position_shift`` existed
    (their keys absent) resumes as a run with their defaults; a setting that differs, or one this
    version does not know, is still refused by name."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    manifest = out / "state" / "manifest.json"
    data = json.loads(manifest.read_text())
    del data["config"]["model"]["linear_rope"], data["config"]["transfer"]["position_shift"]
    entries = list(data["entries"])
    data["entries"] = {k: data["entries"][k] for k in entries[: entries.index("transfer/layer_001")]}
    manifest.write_text(json.dumps(data))
    report = run_convert(assets["model"], out, _cfg(assets), resume=True)
    _same_model(out, reference[0])
    assert report["student_ppl"] == reference[1]["student_ppl"]
    with pytest.raises(DistillError, match=r"different settings \(config.transfer.position_shift\)"):
        run_convert(assets["model"], out, _cfg(assets, "transfer.position_shift=8"), resume=True)
    data["config"]["model"]["retired_knob"] = 1
    manifest.write_text(json.dumps(data))
    with pytest.raises(DistillError, match=r"different settings \(config.model.retired_knob\)"):
        run_convert(assets["model"], out, _cfg(assets), resume=True)


def test_run_folder_rules(assets, reference, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DistillError, match="not written by distill convert"):
        run_convert(assets["model"], out, _cfg(assets), overwrite=True)
    assert (out / "notes.txt").exists()
    ref = reference[0]
    with pytest.raises(DistillError, match="--resume .* or --overwrite"):
        run_convert(assets["model"], ref, _cfg(assets))
    with pytest.raises(DistillError, match="different settings .*transfer.steps"):
        run_convert(assets["model"], ref, _cfg(assets, "transfer.steps=7"), resume=True)
    with pytest.raises(DistillError, match="exclude each other"):
        run_convert(assets["model"], ref, _cfg(assets), resume=True, overwrite=True)
    # A bad MODEL leaves --out untouched (not even created).
    with pytest.raises(DistillError):
        run_convert(str(tmp_path / "no-model"), tmp_path / "fresh", _cfg(assets))
    assert not (tmp_path / "fresh").exists()


def test_nan_is_reported_in_the_report(assets, tmp_path, monkeypatch):
    real = transfer_mod.student_output
    calls = {"n": 0}

    def poisoned(attn, q, k, v, rope=None):
        calls["n"] += 1
        out = real(attn, q, k, v, rope)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(transfer_mod, "student_output", poisoned)
    report = run_convert(assets["model"], tmp_path / "run", _cfg(assets, "finetune.enabled=false"))
    assert len(report["events"]) == 1 and report["events"][0]["hint"] == "lower transfer.lr"
    assert "lower transfer.lr" in (tmp_path / "run" / "report.md").read_text()
    assert torch.isfinite(torch.tensor(report["student_ppl"]))


# ---- command line ---------------------------------------------------------------------------


def _cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_convert_and_generate(assets, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["convert", assets["model"], "--out", str(out), *TINY_OVERRIDES, f"data={assets['data']}"]
    args.insert(2, "model.window=4")  # an override before --out works too
    code, stdout, err = _cli(capsys, *args)
    assert code == 0, err
    assert "held-out perplexity: teacher" in stdout
    code, stdout, _ = _cli(capsys, "generate", str(out), "--prompt", "the cat", "--max-new-tokens", "5")
    assert code == 0 and stdout.startswith("the cat")
    code, stdout, _ = _cli(capsys, "generate", str(out), "--prompt", "the cat", "--max-new-tokens", "5", "--teacher")
    assert code == 0 and stdout.startswith("the cat")


def _gguf(path, arch="rwkv6"):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(16)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    return path


def _not_causal(path):
    from transformers import T5Config

    T5Config(d_model=8, d_ff=16, num_layers=1, num_heads=2, d_kv=4, vocab_size=32).save_pretrained(path)
    return path


def _unsupported(path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=42, n_positions=64)).save_pretrained(path)
    from pipeline_tiny import tiny_tokenizer

    tiny_tokenizer().save_pretrained(path)
    return path


def _converted(path):
    from pipeline_tiny import tiny_model, tiny_tokenizer

    from distill import ConvertConfig, convert_model

    convert_model(tiny_model(), ConvertConfig()).save_pretrained(path, tokenizer=tiny_tokenizer())
    return path


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda a, t: ["convert", str(t / "missing"), "--out", str(t / "o")], "does not exist"),
        (lambda a, t: ["convert", str(t / "missing.gguf"), "--out", str(t / "o")], "GGUF file .* does not exist"),
        (lambda a, t: ["convert", str(_gguf(t / "rwkv.gguf")), "--out", str(t / "o")], "model_type .rwkv6. is not supported; supported: llama"),
        (lambda a, t: ["convert", str(_not_causal(t / "t5")), "--out", str(t / "o")], "cannot load .* as a causal LM"),
        (lambda a, t: ["convert", str(_unsupported(t / "gpt2")), "--out", str(t / "o"), f"data={a['data']}"], "model_type 'gpt2' is not supported"),
        (lambda a, t: ["convert", a["model"], "--out", str(t / "o"), "transfer.stepz=1"], "unknown config key stepz"),
        (lambda a, t: ["convert", a["model"], "--out", str(t / "o"), "--config", str(t / "none.yaml")], "config file .* does not exist"),
        (lambda a, t: ["convert", a["model"], "--out", str(t / "o"), "data=" + str(t / "nothing.txt")], "data file .* does not exist"),
        (lambda a, t: ["convert", a["model"], "--out", str(t / "o"), *TINY_OVERRIDES, f"data={a['data']}", "calib_tokens=100000"], "fewer than calib_tokens"),
        (lambda a, t: ["convert", a["model"], "--out", str(t / "o"), "model.keep_softmax_layers=[5]"], "keep_softmax_layers has index 5"),
        (lambda a, t: ["convert", a["model"], "--out", str(t / "o"), "model.feature_map=nope"], "unknown feature map 'nope'"),
        (lambda a, t: ["convert", str(_converted(t / "conv")), "--out", str(t / "o")], "already converted"),
        (lambda a, t: ["generate", str(t / "missing"), "--prompt", "x"], "not a model folder"),
        (lambda a, t: ["generate", a["model"], "--prompt", "x"], "not a converted one"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(assets, tmp_path, capsys, make_args, message):
    import re

    code, _, err = _cli(capsys, *make_args(assets, tmp_path))
    assert code == 2
    # stderr may also hold transformers' loading progress bars; the error itself is one line.
    lines = [line for line in err.splitlines() if line.startswith("distill:")]
    assert len(lines) == 1 and lines[0].startswith("distill: error: ") and "Traceback" not in err, err
    assert re.search(message, lines[0]), lines[0]


def test_cli_non_empty_out_is_refused(assets, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("x")
    code, _, err = _cli(capsys, "convert", assets["model"], "--out", str(tmp_path / "o"))
    assert code == 2 and "is not empty" in err and "Traceback" not in err


def test_cli_unknown_flag_is_a_usage_error(assets, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["convert", assets["model"], "--out", str(tmp_path / "o"), "--frobnicate"])
    assert exc.value.code == 2


def test_cli_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    text = capsys.readouterr().out
    for flag in ("--out", "--config", "--resume", "--overwrite", "key=value", "MODEL"):
        assert flag in text
    for key in ("calib_tokens", "transfer.steps", "finetune.lora_rank", "fit.refine_iters", "model.window"):
        assert key in text


def test_cli_unreachable_hub_id_offline(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from distill.cli import main; sys.exit(main())", "convert", "no-such-org/no-such-model", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("distill: error: cannot load no-such-org/no-such-model") and "hub" in last


def test_every_layer_kept_as_softmax_converts_to_the_teacher(assets, tmp_path):
    report = run_convert(assets["model"], tmp_path / "run", _cfg(assets, "model.keep_softmax_layers=[0, 1]", "finetune.enabled=false"))
    assert report["layers"] == [] and report["student_ppl"] == pytest.approx(report["teacher_ppl"], rel=1e-6)


@pytest.mark.parametrize("override", ["transfer.lr=1e6", "finetune.lr=1e4"])
def test_a_diverging_run_never_publishes_non_finite_weights(assets, tmp_path, override):
    """A huge learning rate ends either with a finite model and perplexity, or with RunFailed and
    no model written; never NaN weights reported as success."""
    out = tmp_path / "run"
    try:
        report = run_convert(assets["model"], out, _cfg(assets, override))
    except RunFailed as err:
        assert not (out / "model.safetensors").exists() and "lower" in str(err)
        return
    assert math.isfinite(report["student_ppl"])
    assert all(bool(torch.isfinite(t).all()) for t in _weights(out).values())


def test_a_backend_that_cannot_run_here_is_bad_input(monkeypatch):
    from distill.pipeline.run import resolve_device

    monkeypatch.setenv("DISTILL_BACKEND", "fla")
    with pytest.raises(DistillError, match="DISTILL_BACKEND=fla needs CUDA"):
        resolve_device("cpu")
    monkeypatch.setenv("DISTILL_BACKEND", "nonsense")
    with pytest.raises(DistillError, match="unknown"):
        resolve_device("cpu")


def test_a_non_finite_student_is_never_saved_and_exits_1(assets, tmp_path, capsys, monkeypatch):
    """A stage that leaves a NaN behind (here injected after transfer) ends the run with one line
    naming that stage and its fix, exit code 1, no model file, and its checkpoints intact."""
    from distill.pipeline import run as run_mod

    real = run_mod.run_transfer

    def poisoned(model, *args, **kwargs):
        results = real(model, *args, **kwargs)
        with torch.no_grad():
            model.model.layers[1].self_attn.rnn.feature_map.proj_q.weight.fill_(float("nan"))
        return results

    monkeypatch.setattr(run_mod, "run_transfer", poisoned)
    out = tmp_path / "run"
    code, _, err = _cli(capsys, "convert", assets["model"], "--out", str(out), *FULL, f"data={assets['data']}", "finetune.enabled=false")
    lines = [line for line in err.splitlines() if line.startswith("distill:")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert "after the transfer stage" in lines[0] and "lower transfer.lr" in lines[0]
    assert not (out / "model.safetensors").exists()
    manifest = json.loads((out / "state" / "manifest.json").read_text())
    assert "transfer/layer_001" in manifest["entries"] and "student_eval" not in manifest["entries"]
    monkeypatch.setattr(run_mod, "run_transfer", real)  # the cause gone, the run resumes from its checkpoints
    code, _, err = _cli(capsys, "convert", assets["model"], "--out", str(out), *FULL, f"data={assets['data']}", "finetune.enabled=false", "--resume")
    assert code == 0, err
    assert all(bool(torch.isfinite(t).all()) for t in _weights(out).values())


def test_an_unsupported_gguf_is_refused_before_loading(tmp_path):
    import time

    from distill.models import gguf_architecture, load_model

    path = _gguf(tmp_path / "tiny.gguf", "gemma3")
    assert gguf_architecture(path) == "gemma3"
    start = time.time()
    with pytest.raises(DistillError, match="model_type 'gemma3' is not supported; supported: llama, mistral, qwen2, qwen3"):
        load_model(str(path))
    assert time.time() - start < 2.0
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(DistillError, match="not a readable GGUF file"):
        load_model(str(tmp_path / "junk.gguf"))


def test_long_range_nll_equals_the_models_own_loss(assets):
    """All layers in student mode, one layer at a time, equals the whole model's forward."""
    from distill import convert_model
    from distill.models import load_model
    from distill.pipeline.select import long_range_nll

    model, _ = load_model(assets["model"])
    convert_model(model, {"feature_map": "hedgehog", "window": 4})
    ids = torch.randint(2, 30, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for mode, layers in (("parallel", {0, 1}), ("teacher", set())):
            logits = model(ids, distill_mode=mode, use_cache=False).logits[:, 9:-1]
            ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 10:].flatten())
            assert long_range_nll(model, ids, layers, 10) == pytest.approx(float(ref), rel=1e-5)


def test_auto_keep_softmax_selects_saves_and_resumes(assets, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(assets, "model.keep_softmax_layers=auto:1", "select.from_position=16", "finetune.enabled=false")
    report = run_convert(assets["model"], out, cfg)
    select = report["select"]
    assert len(select["kept"]) == 1 and set(select["scores"]) == {"0", "1"}
    assert select["kept"] == [max((0, 1), key=lambda i: select["scores"][str(i)])]
    assert select["kept_kv_bytes"] * 2 == select["teacher_kv_bytes"] and select["state_bytes"] > 0
    again = load_converted(out)
    assert again.distill_config.keep_softmax_layers == select["kept"]
    assert [r["layer"] for r in report["layers"]] == [i for i in (0, 1) if i not in select["kept"]]
    # a resumed run re-applies the recorded choice and ends at the same model
    (out / "model.safetensors").unlink()
    manifest = json.loads((out / "state" / "manifest.json").read_text())
    manifest["entries"] = {k: v for k, v in manifest["entries"].items() if k not in ("student_eval", "model")}
    (out / "state" / "manifest.json").write_text(json.dumps(manifest))
    resumed = run_convert(assets["model"], out, cfg, resume=True)
    assert resumed["student_ppl"] == report["student_ppl"] and resumed["select"]["kept"] == select["kept"]
    with pytest.raises(DistillError, match="must be less than the 2 converted layers"):
        run_convert(assets["model"], tmp_path / "bad", _cfg(assets, "model.keep_softmax_layers=auto:2", "select.from_position=16"))
