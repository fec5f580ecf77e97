"""Recurrent (token-by-token) causal linear attention in plain PyTorch: the decode path.

Same contract as :func:`distill_kernels.naive.naive_linear_attn`; see that module for the rule.
"""
from __future__ import annotations

import torch


def recurrent_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B,T,H,F], k [B,T,Hk,F], v [B,T,Hk,Dv] -> o [B,T,H,Dv] fp32, state [B,Hk,F,Dv] fp32.

    Loops over T; meant for decoding (T=1) and as a second reference."""
    B, T, H, F = q.shape
    Hk, Dv = k.shape[2], v.shape[-1]
    state = (
        torch.zeros(B, Hk, F, Dv, device=q.device, dtype=torch.float32)
        if initial_state is None
        else initial_state.float()
    )
    decay = None if log_decay is None else torch.exp(log_decay.float())[None, :, None, None]  # (1, Hk, 1, 1)
    qg = q.float().reshape(B, T, Hk, H // Hk, F)
    k, v = k.float(), v.float()
    outs = []
    for t in range(T):
        if decay is not None:
            state = state * decay
        state = state + k[:, t, :, :, None] * v[:, t, :, None, :]  # (B, Hk, F, Dv)
        outs.append(qg[:, t] @ state)  # (B, Hk, G, Dv)
    o = torch.stack(outs, dim=1) if outs else qg.new_zeros(B, 0, Hk, H // Hk, Dv)
    return o.reshape(B, T, H, Dv), state
