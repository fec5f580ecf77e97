"""Independent references for causal linear attention, written for clarity, not speed.

Layout everywhere: ``[B, T, H, D]``. Query heads ``H`` share key/value heads ``Hk``
(GQA): query head ``h`` reads kv head ``h // (H // Hk)``.

The rule (unnormalised; callers append a ones column to ``v`` to get the normaliser):

    S_t = g * S_{t-1} + k_t v_t^T        S_{-1} = initial_state,  g = exp(log_decay)
    o_t = q_t^T S_t
"""
from __future__ import annotations

import torch


def _group(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, T, H, F] -> [B, T, Hk, G, F]."""
    B, T, H, F = q.shape
    return q.reshape(B, T, num_kv_heads, H // num_kv_heads, F)


def naive_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked quadratic form. q [B,T,H,F], k [B,T,Hk,F], v [B,T,Hk,Dv], log_decay [Hk],
    initial_state [B,Hk,F,Dv]. Returns o [B,T,H,Dv] fp32 and the final state [B,Hk,F,Dv] fp32."""
    B, T, Hk, F = k.shape
    qg = _group(q.float(), Hk)  # (B, T, Hk, G, F)
    k, v = k.float(), v.float()
    pos = torch.arange(T, device=q.device, dtype=torch.float32)
    lag = pos[:, None] - pos[None, :]  # (T, T) t - s
    causal = lag >= 0
    ld = torch.zeros(Hk, device=q.device) if log_decay is None else log_decay.float()
    weight = torch.where(causal, torch.exp(ld[:, None, None] * lag.clamp(min=0)), 0.0)  # (Hk, T, T)
    scores = torch.einsum("btigf,bsif->bigts", qg, k) * weight[None, :, None]  # (B, Hk, G, T, T)
    o = torch.einsum("bigts,bsid->btigd", scores, v)  # (B, T, Hk, G, Dv)
    decay_to_end = torch.exp(ld[None, :] * (T - 1 - pos)[:, None])  # (T, Hk)
    final = torch.einsum("bsif,bsid->bifd", k * decay_to_end[None, :, :, None], v)
    if initial_state is not None:
        s0 = initial_state.float()
        carry = torch.exp(ld[None, :] * (pos + 1)[:, None])  # (T, Hk)
        o = o + torch.einsum("btigf,bifd->btigd", qg * carry[None, :, :, None, None], s0)
        final = final + torch.exp(ld * T)[None, :, None, None] * s0
    return o.reshape(B, T, -1, v.shape[-1]), final
