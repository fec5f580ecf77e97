"""The run folder: atomic checkpoints under ``DIR/state/`` with a manifest of sizes and hashes.

Each finished step is an *entry*: an optional safetensors file plus JSON metadata, recorded
in ``state/manifest.json`` in the order the steps finished. Files are written to a temporary
name, flushed to disk and renamed, and the manifest is rewritten the same way afterwards, so a
kill at any moment leaves either the old or the new entry, never half of one.

On ``--resume`` every entry is checked against its recorded size and sha256. The first bad one
and every entry after it (which may depend on it) are dropped, and the run restarts there.

In a run of several ranks only rank 0 writes; the others hold a :meth:`RunStore.follower` that
reads the same manifest and records what they ``save`` (metadata only) without writing.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file

from ..errors import DistillError
from ..files import atomic_save_tensors, atomic_write_text, sha256

log = logging.getLogger(__name__)

STATE = "state"
MANIFEST = "manifest.json"
RUN_MARKERS = (STATE, "report.json")  # a folder holding one of these is a distill run


class RunStore:
    """Checkpoint entries of one run (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.state = self.root / STATE
        self.manifest_path = self.state / MANIFEST
        self.entries: dict[str, dict[str, Any]] = {}
        self.header: dict[str, Any] = {}
        self.writes = True

    @classmethod
    def follower(cls, root: Path) -> "RunStore":
        """A non-writing view for ranks other than 0: the manifest as rank 0 left it; later saves
        record their metadata only."""
        store = cls(root)
        store.open()
        store.writes = False
        return store

    # -- manifest ---------------------------------------------------------------------------
    def _write_manifest(self) -> None:
        if not self.writes:
            return
        atomic_write_text(self.manifest_path, json.dumps({**self.header, "entries": self.entries}, indent=1))

    def set_header(self, key: str, value: Any) -> None:
        self.header[key] = value
        self._write_manifest()

    def create(self, header: dict[str, Any]) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        self.header, self.entries = dict(header), {}
        self._write_manifest()

    def open(self) -> dict[str, Any]:
        """Read the manifest; returns its header ({} if it is missing or unreadable)."""
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            entries = data.pop("entries")
            if not isinstance(entries, dict):
                raise ValueError("entries is not a mapping")
        except (OSError, ValueError, KeyError):
            return {}
        self.header, self.entries = data, entries
        return data

    # -- entries ----------------------------------------------------------------------------
    def _file(self, key: str) -> Path:
        return self.state / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return key in self.entries

    def meta(self, key: str) -> dict[str, Any]:
        return self.entries[key]["meta"]

    def save(self, key: str, tensors: dict[str, torch.Tensor] | None, meta: dict[str, Any]) -> None:
        """Write (or replace) entry ``key`` atomically."""
        record: dict[str, Any] = {"meta": meta}
        if tensors is not None and self.writes:
            path = self._file(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_save_tensors(path, tensors)
            record["file"] = str(path.relative_to(self.state))
            record["size"] = path.stat().st_size
            record["sha256"] = sha256(path)
        self.entries[key] = record  # dicts keep insertion order; a replaced key keeps its place
        self._write_manifest()

    def load(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        record = self.entries[key]
        tensors = load_file(str(self.state / record["file"])) if "file" in record else {}
        return tensors, record["meta"]

    def problem(self, key: str) -> str | None:
        """Why entry ``key`` cannot be trusted, or None."""
        record = self.entries[key]
        if "file" not in record:
            return None
        path = self.state / record["file"]
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != record["size"]:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {record['size']}"
        if sha256(path) != record["sha256"]:
            return f"{path} does not match its sha256 in the manifest"
        return None

    def verify(self) -> list[str]:
        """Drop the first bad entry and all later ones; returns the dropped keys."""
        keys = list(self.entries)
        for n, key in enumerate(keys):
            why = self.problem(key)
            if why is not None:
                dropped = keys[n:]
                log.warning("checkpoint %s is corrupt or partial (%s); resuming from before it", key, why)
                self.drop(dropped)
                return dropped
        return []

    def drop(self, keys: list[str]) -> None:
        for key in keys:
            record = self.entries.pop(key, None)
            if record and "file" in record and self.writes:
                (self.state / record["file"]).unlink(missing_ok=True)
        self._write_manifest()


def is_empty(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def check_run_dir(
    out: Path, header: dict[str, Any], resume: bool, overwrite: bool, upgrade: Callable[[dict], dict] | None = None
) -> str:
    """Validate ``--out`` and the flags without touching anything; returns what
    :func:`open_run_dir` will do: ``resume``, ``overwrite`` or ``create``. ``upgrade`` maps the
    header of the run in ``out`` to today's form before it is compared with ``header`` (a run
    written before a setting existed ran with that setting's default)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DistillError(f"--out {out} is a file; give a folder")
    if resume and overwrite:
        raise DistillError("--resume and --overwrite exclude each other; pick one")
    if is_empty(out):
        return "create"
    if not any((out / m).exists() for m in RUN_MARKERS):
        raise DistillError(f"--out {out} is not empty and was not written by distill convert; choose an empty folder")
    if resume:
        old = RunStore(out).open()
        if not old:
            return "overwrite"  # no readable manifest: nothing to resume
        _check_same_run(upgrade(old) if upgrade else old, header, out)
        return "resume"
    if overwrite:
        return "overwrite"
    raise DistillError(f"--out {out} is not empty; pass --resume to continue the run there, or --overwrite to replace it")


def open_run_dir(
    out: Path, header: dict[str, Any], resume: bool, overwrite: bool, upgrade: Callable[[dict], dict] | None = None
) -> RunStore:
    """Create, resume or overwrite the run folder ``out`` (see :func:`check_run_dir`)."""
    out = Path(out)
    action = check_run_dir(out, header, resume, overwrite, upgrade)
    store = RunStore(out)
    if action == "resume":
        store.open()
        dropped = store.verify()
        log.info("resuming %s: %d finished steps kept, %d dropped", out, len(store.entries), len(dropped))
        return store
    try:
        if action == "overwrite":
            if resume:
                log.warning("%s has no readable manifest; starting the run again", store.manifest_path)
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        store.create(header)
    except PermissionError as err:
        raise DistillError(f"cannot write the run folder {out} ({err.strerror}); choose a folder you can write") from None
    return store


def _check_same_run(old: dict[str, Any], new: dict[str, Any], out: Path) -> None:
    diffs = [key for key in sorted(new) if old.get(key) != new.get(key)]
    if diffs:
        detail = []
        for key in diffs:
            a, b = old.get(key), new.get(key)
            if isinstance(a, dict) and isinstance(b, dict):
                detail += [f"{key}.{k}" for k in diff_keys(a, b)]
            else:
                detail.append(key)
        raise DistillError(
            f"{out} holds a run with different settings ({', '.join(detail[:5])}); "
            "resume with the same model and config, or pass --overwrite to start again"
        )


def diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += diff_keys(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}")
    return out
