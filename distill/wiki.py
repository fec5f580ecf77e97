"""Calibration text: the offline Wikipedia summaries, with a fixed held-out split.

The split is deterministic: extracts sorted by title, every 10th one (index % 10 == 0) is held
out and never trained on.
"""
from __future__ import annotations

import json
from pathlib import Path

from .assets import fetch

HELDOUT_EVERY = 10  # every 10th document is held out, here and in distill convert's own files


def wiki_texts(split: str = "train", path: str | Path | None = None) -> list[str]:
    """Wikipedia summaries (``split`` = "train" or "heldout"), in title order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    raw = json.loads(Path(path or fetch("wiki")).read_text(encoding="utf-8"))
    items = sorted(raw.values(), key=lambda item: item["title"])
    keep = (lambda i: i % HELDOUT_EVERY == 0) if split == "heldout" else (lambda i: i % HELDOUT_EVERY != 0)
    return [item["extract"].strip() for i, item in enumerate(items) if keep(i) and item.get("extract", "").strip()]
