"""Linear-attention ops on tensors, installed as ``distill_kernels``.

Public entry points pick an implementation by ``DISTILL_BACKEND`` (``auto|torch|triton|fla``):
``auto`` is Triton on CUDA tensors and PyTorch elsewhere.

    chunk_linear_attn(q, k, v, log_decay=None, initial_state=None) -> (o, final_state)
    recurrent_linear_attn(q, k, v, log_decay=None, initial_state=None) -> (o, final_state)

Shapes: q [B,T,H,F], k [B,T,Hk,F], v [B,T,Hk,Dv], log_decay [Hk], state [B,Hk,F,Dv] (fp32).
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from .chunk import chunk_linear_attn as torch_chunk_linear_attn
from .naive import naive_linear_attn
from .recurrent import recurrent_linear_attn as torch_recurrent_linear_attn

BACKENDS = ("auto", "torch", "triton", "fla")

# backend name -> (chunk fn, recurrent fn); filled lazily so importing this package stays cheap.
_IMPLS: dict[str, Callable[[], tuple[Callable, Callable]]] = {
    "torch": lambda: (torch_chunk_linear_attn, torch_recurrent_linear_attn),
}


def register_backend(name: str, loader: Callable[[], tuple[Callable, Callable]]) -> None:
    """Register ``loader() -> (chunk_fn, recurrent_fn)`` under ``name``."""
    _IMPLS[name] = loader


def resolve_backend(device: torch.device) -> str:
    name = os.environ.get("DISTILL_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"DISTILL_BACKEND={name!r} is unknown; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "triton" if device.type == "cuda" and "triton" in _IMPLS else "torch"
    if name not in _IMPLS:
        raise ValueError(f"DISTILL_BACKEND={name!r} is not available in this build; use DISTILL_BACKEND=torch")
    return name


def chunk_linear_attn(q, k, v, log_decay=None, initial_state=None):
    return _IMPLS[resolve_backend(q.device)]()[0](q, k, v, log_decay=log_decay, initial_state=initial_state)


def recurrent_linear_attn(q, k, v, log_decay=None, initial_state=None):
    return _IMPLS[resolve_backend(q.device)]()[1](q, k, v, log_decay=log_decay, initial_state=initial_state)


__all__ = [
    "BACKENDS",
    "chunk_linear_attn",
    "recurrent_linear_attn",
    "naive_linear_attn",
    "torch_chunk_linear_attn",
    "torch_recurrent_linear_attn",
    "register_backend",
    "resolve_backend",
]
