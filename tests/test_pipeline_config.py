"""The run config: YAML + key=value overrides, unknown keys and bad values rejected, shipped configs load."""
from pathlib import Path

import pytest

from distill.errors import DistillError
from distill.pipeline.run_config import RunConfig, apply_override, dump_run_config, load_run_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# Run configs of distill convert; configs/ also holds other tools' YAML (benchmarks, eval tasks).
CONFIGS = sorted(p for p in CONFIG_DIR.glob("*.yaml") if p.read_text(encoding="utf-8").startswith("# distill convert "))


def test_defaults_validate():
    cfg = load_run_config()
    assert cfg.data == "wiki" and cfg.model.feature_map == "hedgehog" and cfg.transfer.enabled
    assert cfg.calib_sequences == cfg.calib_tokens // cfg.seq_len


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  window: 8\ntransfer:\n  steps: 3\n  lr: 1e-3\nseq_len: 16\ncalib_tokens: 64\nheldout_tokens: 16\n")
    cfg = load_run_config(path, ["transfer.steps=7", "model.feature_map=poly", "model.feature_map_kwargs.rank=4", "data=self"])
    assert cfg.model.window == 8 and cfg.transfer.steps == 7
    assert cfg.transfer.lr == pytest.approx(1e-3)  # YAML 1.1 reads 1e-3 as a string; it becomes a float
    assert cfg.model.feature_map == "poly" and cfg.model.feature_map_kwargs == {"rank": 4}
    assert cfg.data == "self"


def test_round_trip():
    cfg = load_run_config(None, ["model.window=16", "finetune.enabled=true", "finetune.targets=[q_proj, v_proj]"])
    import yaml

    again = RunConfig.from_dict(yaml.safe_load(dump_run_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("transfer.stepz=3", "unknown config key stepz in transfer"),
        ("nonsense=1", "unknown config key nonsense"),
        ("model.windw=3", "unknown config key windw in model"),
        ("transfer.steps=many", "transfer.steps must be int"),
        ("transfer.lr=0", "lr must be > 0"),
        ("transfer.inputs=both", "inputs must be one of teacher, student"),
        ("model.decay=sometimes", "decay must be one of"),
        ("seq_len=1", "seq_len must be at least 2"),
        ("calib_tokens=10", "less than one sequence"),
        ("transfer=3", "must be a mapping"),
        ("fit.enabled=maybe", "fit.enabled must be bool"),
        ("steps", "must look like key=value"),
        ("seq_len.x=1", "seq_len must be int"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(DistillError, match=message):
        load_run_config(None, [override])


def test_override_into_a_value():
    with pytest.raises(DistillError, match="is a value, not a section"):
        load_run_config(None, ["seq_len=16", "seq_len.x=1"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(DistillError, match="does not exist"):
        load_run_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(DistillError, match="not valid YAML"):
        load_run_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(DistillError, match="mapping"):
        load_run_config(listy)


def test_apply_override_creates_sections():
    data = {}
    apply_override(data, "model.feature_map_kwargs.degree=3")
    assert data == {"model": {"feature_map_kwargs": {"degree": 3}}}


def test_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"demo-cpu.yaml", "ci-smoke.yaml"} <= names
    assert any("8b" in n for n in names)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert f"--config configs/{path.name}" in first
    cfg = load_run_config(path)
    assert cfg.calib_tokens >= cfg.seq_len


def test_every_key_is_documented():
    from distill.pipeline.run_config import describe_keys

    rows = describe_keys()
    assert len(rows) > 30
    missing = [key for key, _, text in rows if not text]
    assert not missing, f"undocumented config keys: {missing}"


def test_auto_threads_fall_to_one_only_on_a_small_busy_machine(monkeypatch):
    import os

    import torch

    from distill.pipeline import run as run_mod

    default = torch.get_num_threads()
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    try:
        monkeypatch.setattr(run_mod, "busy_cores", lambda: 1.0)
        assert run_mod.set_threads(0) == 1
        monkeypatch.setattr(run_mod, "busy_cores", lambda: 0.1)
        torch.set_num_threads(default)
        assert run_mod.set_threads(0) == default
        assert run_mod.set_threads(3) == 3  # an explicit setting always holds
    finally:
        torch.set_num_threads(default)


def test_busy_cores_sees_a_spinning_process():
    import subprocess
    import sys

    from distill.pipeline.run import busy_cores

    spin = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 20\nwhile time.time() < end: pass"])
    try:
        import time

        time.sleep(0.5)  # let it start spinning
        assert busy_cores(0.5) >= 0.5
    finally:
        spin.kill()
        spin.wait()
