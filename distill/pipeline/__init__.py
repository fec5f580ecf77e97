"""``distill convert``: fit, transfer and (optionally) finetune a converted model, with checkpoints.

Modules, in the order a run uses them: :mod:`.run_config` (the run config), :mod:`.data`
(calibration text), :mod:`.train` (what every stage shares: the stage context, the new
parameters, guarded optimizer steps), the stages :mod:`.fit`, :mod:`.transfer` and
:mod:`.finetune` (siblings: each imports :mod:`.train` and the helpers below it, never another
stage), :mod:`.perplexity`, :mod:`.checkpoint` (the run folder), :mod:`.report`, :mod:`.run` (the
stages top to bottom) and :mod:`.command` (the CLI). Helpers: :mod:`.layerwise` (run a model one
decoder layer at a time), :mod:`.attention_weights` (explicit teacher and student attention
weights), :mod:`.params` (the parameters conversion added).

The names below load on first use (PEP 562), so ``distill convert --help`` (which imports
:mod:`.command` and :mod:`.run_config`) does not import torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .run import run_convert
    from .run_config import FinetuneConfig, FitConfig, RunConfig, TransferConfig, load_run_config

_EXPORTS = {
    "FinetuneConfig": ".run_config",
    "FitConfig": ".run_config",
    "RunConfig": ".run_config",
    "TransferConfig": ".run_config",
    "load_run_config": ".run_config",
    "run_convert": ".run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the module behind a public name on first access (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
