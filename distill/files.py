"""Atomic file writes and hashing: a reader sees the old file or the new one, never half of one.

Each write goes to a temporary name in the target's folder (so the rename stays on one file
system), is flushed to disk, then renamed over the target. If any of that fails, the temporary
file is removed and the target is left as it was. A full disk (ENOSPC) or an exhausted quota
(EDQUOT) is the user's to fix, not a bug, so it becomes a :class:`DistillError` that says so.
"""
from __future__ import annotations

import errno
import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import DistillError

# errno values that mean "no room left on this file system" (EDQUOT is missing on some platforms).
DISK_FULL = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_disk_full(err: BaseException) -> bool:
    """True for ENOSPC/EDQUOT, also when safetensors' Rust writer reports it (it raises
    ``SafetensorError("... (os error 28)")``, with the errno only in the message)."""
    if isinstance(err, OSError):
        return err.errno in DISK_FULL
    if type(err).__name__ == "SafetensorError":
        return any(f"(os error {code})" in str(err) for code in DISK_FULL)
    return False


def disk_full_error(path: Path, err: Exception) -> DistillError:
    """The one-line error for a write to ``path`` that ran out of space."""
    quota = getattr(errno, "EDQUOT", None)
    over_quota = quota is not None and (getattr(err, "errno", None) == quota or f"(os error {quota})" in str(err))
    reason = "the disk quota is exhausted" if over_quota else "the disk is full"
    return DistillError(
        f"{reason}: no space left to write {path}; free some space on that disk, "
        "then rerun the same command with --resume to continue from the last checkpoint"
    )


@contextmanager
def disk_full_is_user_error(path: Path) -> Iterator[None]:
    """Re-raise ENOSPC/EDQUOT from the block as :func:`disk_full_error` (for writes that do not
    go through this module, e.g. ``save_pretrained``); other errors pass unchanged."""
    try:
        yield
    except Exception as err:
        if is_disk_full(err):
            raise disk_full_error(Path(path), err) from err
        raise


def temp_path(path: Path) -> Path:
    """A hidden sibling of ``path`` unique to this process."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def commit(tmp: Path, path: Path) -> None:
    """Flush ``tmp`` to disk and rename it to ``path``; ``tmp`` is removed if that fails."""
    try:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` to fill a temporary file, then :func:`commit` it to ``path``.

    On any failure the temporary file is removed and ``path`` is untouched; a full disk raises
    :class:`DistillError` (see :func:`disk_full_error`).
    """
    path = Path(path)
    tmp = temp_path(path)
    with disk_full_is_user_error(path):
        try:
            write(tmp)
            commit(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_save_tensors(path: Path, tensors: dict) -> None:
    """Write ``tensors`` (name -> torch.Tensor) as safetensors."""
    from safetensors.torch import save

    # Serialised in memory and written from Python, so a full disk arrives as an OSError with
    # its errno; ``save_file``'s Rust writer reports it only inside a SafetensorError message.
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
