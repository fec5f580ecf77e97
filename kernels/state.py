"""What the gated and delta-rule torch forms share: their compute dtype and initial state."""
from __future__ import annotations

import torch


def compute_dtype(q: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs (the tests' tight references), float32 otherwise."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def initial_state_or_zeros(initial_state, B, Hk, F, Dv, dtype, device) -> torch.Tensor:
    """The given state [B,Hk,F,Dv] in ``dtype``, or zeros."""
    if initial_state is None:
        return torch.zeros(B, Hk, F, Dv, dtype=dtype, device=device)
    return initial_state.to(dtype)
