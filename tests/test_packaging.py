"""Packaging: the wheel works outside the repository, and assets are fetched once, atomically.

The wheel test builds distill from a copy of the sources, installs it into a fresh virtualenv
(which borrows torch & co. from this one through a ``.pth`` path), and runs ``distill eval`` on
a shipped offline task from a folder outside the repository.
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from pipeline_tiny import save_tiny_model

from distill import assets
from distill.errors import DistillError
from distill.eval import tasks as eval_tasks

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


def build_wheel(tmp: Path) -> Path:
    """Build the wheel from a copy of the sources, so that the build leaves nothing in the repository."""
    src = tmp / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in ("distill", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", tmp / "dist", src], cwd=tmp)
    (wheel,) = (tmp / "dist").glob("distill-*.whl")
    return wheel


def install(wheel: Path, tmp: Path) -> Path:
    """A fresh virtualenv holding only the wheel; everything else resolves from this virtualenv.

    The ``.pth`` file adds this virtualenv's site-packages as a plain path, so its own ``.pth``
    files (among them the editable install of the repository) are not run.
    """
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).stdout.strip())
    ours = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    (site / "borrowed.pth").write_text("\n".join(sorted(ours)) + "\n")
    # this virtualenv's pip, run by the new interpreter, installs there; -I: never touch the editable install
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-I", "-q", wheel], cwd=tmp)
    return venv


@pytest.mark.slow
def test_wheel_runs_distill_eval_outside_the_repository(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if n.startswith("distill/eval/task_configs/")}
    assert shipped == {p.name for p in eval_tasks.TASKS_DIR.iterdir()} and "_bigbench_mc_template" in shipped
    assert "distill_kernels/__init__.py" in names and not any(n.startswith("kernels/") for n in names)

    venv = install(wheel, tmp_path)
    work = tmp_path / "work"  # outside the repository; nothing of it is on the path
    work.mkdir()
    cache = tmp_path / "cache"  # the wiki asset, faked: 20 summaries, of which 2 are held out
    cache.mkdir()
    summaries = {str(i): {"title": f"t{i:02d}", "extract": f"the cat sat on mat number {i}."} for i in range(20)}
    (cache / "summaries_en-us.json").write_text(json.dumps(summaries))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env |= {"DISTILL_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONNOUSERSITE": "1"}

    where = run([venv / "bin" / "python", "-c", "import distill.cli, distill.eval.tasks as t; print(distill.cli.__file__); "
                 "print(t.TASKS_DIR)"], cwd=work, env=env).stdout.split()
    for path in map(Path, where):
        assert path.is_relative_to(venv) and not path.is_relative_to(ROOT), where

    assert "--tasks" in run([venv / "bin" / "distill", "eval", "--help"], cwd=work, env=env).stdout

    model = save_tiny_model(tmp_path / "model")
    out = work / "report.json"
    run([venv / "bin" / "distill", "eval", model, "--tasks", "wiki_heldout_ppl", "--batch-size", "2",
         "--max-length", "64", "--out", out], cwd=work, env=env)
    report = json.loads(out.read_text())
    assert report["tasks"] == ["wiki_heldout_ppl"]
    rows = {r["metric"]: r for r in report["rows"]}
    assert math.isfinite(rows["word_perplexity"]["student"]) and rows["word_perplexity"]["student"] > 1
    assert report["lm_eval"]["student"]["n-samples"]["wiki_heldout_ppl"]["effective"] == 2
    assert out.with_suffix(".md").is_file()


# --- fetching assets once -------------------------------------------------------------------------


def fake_sdist(dest: Path, files: dict[str, str]) -> Path:
    """``dest/bigbench-1.0.0.tar.gz`` holding ``files`` (path -> text) under its root folder."""
    archive = dest / "bigbench-1.0.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/{path}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


@pytest.fixture
def fake_pip(monkeypatch, tmp_path):
    """``pip_download`` replaced by a copy of a fake BIG-bench sdist, without the task ``drop`` if set;
    ``calls`` records each (requirement, sdist) asked for."""
    fake = SimpleNamespace(calls=[], drop=None)
    members = {name: f"bigbench/benchmark_tasks/{folder}/task.json" for name, folder in eval_tasks.BIGBENCH_TASKS.items()}

    def pip_download(requirement, dest, *, sdist=False):
        fake.calls.append((requirement, sdist))
        files = {path: json.dumps({"examples": [], "name": name}) for name, path in members.items() if name != fake.drop}
        return fake_sdist(Path(dest), files)

    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "pip_download", pip_download)
    return fake


def test_bigbench_sdist_is_fetched_once_and_replaces_an_incomplete_copy(fake_pip):
    target = eval_tasks.bigbench_dir()
    target.mkdir(parents=True)
    (target / "timedial.json").write_text("{}")  # an earlier, incomplete fetch
    assert eval_tasks.fetch_bigbench() == target
    assert sorted(p.name for p in target.iterdir()) == sorted(f"{n}.json" for n in eval_tasks.BIGBENCH_TASKS)
    assert json.loads((target / "timedial.json").read_text())["name"] == "timedial"
    eval_tasks.fetch_bigbench()
    assert fake_pip.calls == [(eval_tasks.BIGBENCH_REQUIREMENT, True)]
    assert list(target.parent.iterdir()) == [target]  # no temporary folders left


def test_a_failed_fetch_leaves_nothing_under_the_final_name(fake_pip):
    fake_pip.drop = "social_iqa"
    with pytest.raises(DistillError, match="lacks the task files of social_iqa"):
        eval_tasks.fetch_bigbench()
    target = eval_tasks.bigbench_dir()
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_unknown_asset_is_bad_input():
    with pytest.raises(DistillError, match="known: smollm2, wiki"):
        assets.fetch("nope")
