"""``distill convert`` under faults, as a user meets them: each run is a separate process.

SIGKILL mid-transfer, a corrupted checkpoint, a learning rate that blows up, a full disk and a
truncated model file. Whatever happens, a run never publishes non-finite weights, reports bad
input or a full disk in one ``distill: error:`` line, and ``--resume`` ends at the same bytes as
an uninterrupted run. (tests/test_pipeline_run.py has in-process versions of the interrupt and
corrupt-checkpoint cases; these are their subprocess counterparts.)
"""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pipeline_tiny import TINY_OVERRIDES, make_assets
from safetensors.torch import load_file

from distill import load_converted
from distill.errors import DistillError
from distill.files import sha256

# What the ``distill`` console script runs (``python -m distill.cli`` would load cli.py twice).
CLI = [sys.executable, "-c", "import sys; from distill.cli import main; sys.exit(main())"]
TIMEOUT = 300  # seconds per process; a run takes a few, mostly imports

BASE = TINY_OVERRIDES + ["model.feature_map=hedgehog", "model.window=4", "finetune.enabled=false"]
FINETUNE = [
    "finetune.enabled=true",
    "finetune.steps=3",
    "finetune.lora_rank=2",
    "finetune.checkpoint_every=1",
    "finetune.crop=16",
]

# Runs the CLI with distill.files.commit failing as a full disk would, for one target file name
# (argv[1]); the rest of argv is the command line. The library must turn that into one line.
FULL_DISK = """\
import errno, os, sys
from pathlib import Path
import distill.files as files

real_commit, target = files.commit, sys.argv[1]

def commit(tmp, path):
    if Path(path).name == target:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
    real_commit(tmp, path)

files.commit = commit
from distill.cli import main
sys.exit(main(sys.argv[2:]))
"""


def env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def run(*argv: str, prefix: list[str] = CLI) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, *argv], capture_output=True, text=True, env=env(), timeout=TIMEOUT)


def convert(assets, out: Path, *extra: str, resume: bool = False, prefix: list[str] = CLI) -> subprocess.CompletedProcess:
    flags = ["--resume"] if resume else []
    return run("convert", assets["model"], "--out", str(out), *flags, *BASE, f"data={assets['data']}", *extra, prefix=prefix)


def error_lines(stderr: str) -> list[str]:
    """Lines distill itself wrote (log lines start with a time, progress bars with their name)."""
    return [line for line in stderr.splitlines() if line.startswith("distill:")]


def assert_one_error_line(done: subprocess.CompletedProcess, code: int) -> str:
    """Exit ``code``, no traceback, and exactly one line of its own that starts ``distill: error:``."""
    lines = error_lines(done.stderr)
    assert done.returncode == code, f"exit {done.returncode}, expected {code}; stderr tail:\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    glued = [line for line in done.stderr.splitlines() if "distill: error:" in line and not line.startswith("distill:")]
    assert not glued, f"the error does not start its own line (an unclosed progress bar?): {glued}"
    assert len(lines) == 1 and lines[0].startswith("distill: error: "), lines or done.stderr[-3000:]
    return lines[0]


def manifest(out: Path) -> dict:
    return json.loads((out / "state" / "manifest.json").read_text(encoding="utf-8"))


def assert_checkpoints_intact(out: Path) -> dict:
    """The manifest parses and every file it lists has its recorded size and sha256."""
    entries = manifest(out)["entries"]
    for key, record in entries.items():
        if "file" in record:
            path = out / "state" / record["file"]
            assert path.is_file(), f"{key}: {path} is missing"
            assert path.stat().st_size == record["size"], key
            assert sha256(path) == record["sha256"], f"{key}: {path} does not match its sha256"
    leftovers = [str(p) for p in out.rglob("*") if ".tmp-" in p.name]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    return entries


def assert_finite_weights(out: Path) -> None:
    weights = load_file(str(out / "model.safetensors"))
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not bad, f"model.safetensors holds non-finite values in {bad}"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """One uninterrupted run; returns its folder and the sha256 of its model.safetensors."""
    out = tmp_path_factory.mktemp("reference") / "run"
    done = convert(assets, out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, sha256(out / "model.safetensors")


# ---- a. SIGKILL during transfer ------------------------------------------------------------


def test_sigkill_during_transfer_then_resume_gives_the_same_model(assets, reference, tmp_path):
    out = tmp_path / "run"
    argv = [*CLI, "convert", assets["model"], "--out", str(out), *BASE, f"data={assets['data']}"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env())
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if any(k.startswith("transfer/") for k in manifest(out)["entries"]):
                    break
            except (OSError, ValueError, KeyError):
                pass  # not written yet
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        _, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill (exit {proc.returncode}):\n{stderr[-2000:]}"
    entries = assert_checkpoints_intact(out)
    assert any(k.startswith("transfer/") for k in entries) and "model" not in entries, list(entries)
    assert not (out / "model.safetensors").exists()

    done = convert(assets, out, resume=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sha256(out / "model.safetensors") == reference[1]


# ---- b. a corrupted checkpoint -------------------------------------------------------------


def test_corrupt_transfer_checkpoint_is_detected_and_redone(assets, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    layer = out / "state" / "transfer" / "layer_000.safetensors"
    data = bytearray(layer.read_bytes())
    for i in (-1, -5, -9):  # same size, different bytes (in the tensor data)
        data[i] ^= 0xFF
    layer.write_bytes(bytes(data))

    done = convert(assets, out, resume=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"transfer/layer_000 is corrupt or partial", done.stderr), done.stderr[-3000:]
    assert_checkpoints_intact(out)
    assert sha256(layer) == sha256(reference[0] / "state" / "transfer" / "layer_000.safetensors")  # redone
    assert sha256(out / "model.safetensors") == reference[1]


# ---- c. a learning rate that blows up ------------------------------------------------------


@pytest.mark.parametrize(
    "stage, extra",
    [("transfer", ["transfer.lr=1e6"]), ("finetune", [*FINETUNE, "finetune.lr=1e4"])],
    ids=["transfer-lr-1e6", "finetune-lr-1e4"],
)
def test_diverging_lr_never_publishes_non_finite_weights(assets, tmp_path, stage, extra):
    out = tmp_path / "run"

    def check(done: subprocess.CompletedProcess) -> None:
        if done.returncode == 0:
            assert_finite_weights(out)
            ppl = json.loads((out / "report.json").read_text(encoding="utf-8"))["student_ppl"]
            assert ppl is not None and math.isfinite(ppl), f"student perplexity {ppl} in report.json"
        else:
            line = assert_one_error_line(done, 1)
            assert stage in line, f"the error does not name the {stage} stage: {line}"
            assert not (out / "model.safetensors").exists(), "a failed run published model.safetensors"

    first = convert(assets, out, *extra)
    check(first)
    if first.returncode != 0:  # the run stays resumable: no traceback, the same clean outcome at worst
        check(convert(assets, out, *extra, resume=True))


# ---- d. a full disk ------------------------------------------------------------------------


def assert_disk_full_reported(done: subprocess.CompletedProcess, out: Path) -> dict:
    line = assert_one_error_line(done, 2)
    assert re.search(r"disk is full|no space left", line, re.I), line
    assert "free" in line and "--resume" in line, f"the error does not say how to fix it: {line}"
    assert not (out / "model.safetensors").exists()
    return assert_checkpoints_intact(out)


def test_full_disk_during_transfer_is_one_line_and_resumable(assets, reference, tmp_path):
    """ENOSPC injected when transfer/layer_001 is written (distill.files.commit fails)."""
    out = tmp_path / "run"
    wrapper = tmp_path / "full_disk.py"
    wrapper.write_text(FULL_DISK, encoding="utf-8")
    done = convert(assets, out, prefix=[sys.executable, str(wrapper), "layer_001.safetensors"])
    entries = assert_disk_full_reported(done, out)
    assert "transfer/layer_000" in entries and "transfer/layer_001" not in entries, list(entries)

    done = convert(assets, out, resume=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sha256(out / "model.safetensors") == reference[1]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 64 KiB file system (the checkpoints fit, the saved model does not); skipped where
    mounting is not allowed (not root, or no CAP_SYS_ADMIN). Yields (folder, grow), where
    grow() frees space by enlarging it."""
    if shutil.which("mount") is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and the mount command")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")

    def grow():
        subprocess.run(["mount", "-o", "remount,size=16m", str(mnt)], check=True, capture_output=True)

    try:
        yield mnt, grow
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)  # busy: detach it anyway


def test_real_full_disk_is_one_line_and_resumable(assets, reference, small_tmpfs):
    mnt, grow = small_tmpfs
    out = mnt / "run"
    done = convert(assets, out)
    entries = assert_disk_full_reported(done, out)
    assert entries, "the failing run recorded no checkpoint"
    grow()
    done = convert(assets, out, resume=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sha256(out / "model.safetensors") == reference[1]


# ---- e. a truncated model.safetensors ------------------------------------------------------

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def truncated_copy(reference, folder: Path, keep: int | None) -> Path:
    """The reference's model folder with model.safetensors cut to ``keep`` bytes (None = half)."""
    folder.mkdir()
    for name in MODEL_FILES:
        if (reference[0] / name).exists():
            shutil.copy(reference[0] / name, folder / name)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2 if keep is None else keep])
    return folder


@pytest.mark.parametrize("keep", [4, 100, None], ids=["in-length", "in-header", "in-data"])
def test_truncated_model_file_is_a_one_line_error(reference, tmp_path, keep):
    folder = truncated_copy(reference, tmp_path / "model", keep)
    with pytest.raises(DistillError) as err:
        load_converted(folder)
    message = str(err.value)
    assert "\n" not in message and str(folder) in message, message


def test_generate_on_a_truncated_model_exits_2(reference, tmp_path):
    folder = truncated_copy(reference, tmp_path / "model", None)
    line = assert_one_error_line(run("generate", str(folder), "--prompt", "hi", "--max-new-tokens", "2"), 2)
    assert str(folder) in line, line
