"""distill: turn a pretrained Hugging Face causal LM into a recurrent (linear-attention) model.

The public names below load on first use (PEP 562), so ``import distill`` and ``distill --help``
do not import torch or transformers. Importing :mod:`distill.convert`, which any of the model
functions does, registers the converted classes with the transformers Auto classes.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import ConvertConfig
    from .convert import convert_model, load_converted
    from .feature_maps import FeatureMap, register_feature_map
    from .recurrence import Recurrence, register_recurrence

# public name -> the module that defines it
_EXPORTS = {
    "ConvertConfig": "distill.config",
    "FeatureMap": "distill.feature_maps",
    "convert_model": "distill.convert",
    "load_converted": "distill.convert",
    "register_feature_map": "distill.feature_maps",
    "Recurrence": "distill.recurrence",
    "register_recurrence": "distill.recurrence",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Import the module behind a public name on first access (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'distill' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
