"""Chunked causal linear attention in plain PyTorch: the training / prefill path on CPU.

Within a chunk of C tokens the output is a masked matrix product; across chunks a state
``[B, Hk, F, Dv]`` is carried. Python loops run over chunks only, never over tokens.
Same contract as :func:`distill_kernels.naive.naive_linear_attn`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F_


def chunk_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B,T,H,F], k [B,T,Hk,F], v [B,T,Hk,Dv], log_decay [Hk] or None,
    initial_state [B,Hk,F,Dv] or None -> o [B,T,H,Dv] fp32, final state [B,Hk,F,Dv] fp32."""
    B, T, H, F = q.shape
    Hk, Dv = k.shape[2], v.shape[-1]
    G, C = H // Hk, chunk_size
    N = max(1, -(-T // C))
    pad = N * C - T
    q, k, v = (F_.pad(x.float(), (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
    qc = q.view(B, N, C, Hk, G, F)
    kc = k.view(B, N, C, Hk, F)
    vc = v.view(B, N, C, Hk, Dv)

    ld = torch.zeros(Hk, device=q.device) if log_decay is None else log_decay.float()
    pos = torch.arange(C, device=q.device, dtype=torch.float32)
    lag = pos[:, None] - pos[None, :]  # (C, C)
    intra = torch.where(lag >= 0, torch.exp(ld[:, None, None] * lag.clamp(min=0)), 0.0)  # (Hk, C, C)
    # Tokens in a chunk: C everywhere but the last chunk, which holds C - pad.
    lengths = torch.full((N,), float(C), device=q.device)
    lengths[-1] = C - pad
    to_end = (lengths[:, None] - 1 - pos[None, :]).clamp(min=0)  # (N, C) steps to the chunk's last token
    k_to_end = torch.exp(ld[None, None, :] * to_end[:, :, None])  # (N, C, Hk)
    from_start = torch.exp(ld[None, :] * (pos + 1)[:, None])  # (C, Hk) decay applied to the carried state
    chunk_decay = torch.exp(ld[None, :] * lengths[:, None])  # (N, Hk)

    scores = torch.einsum("bncigf,bnsif->bnigcs", qc, kc) * intra[None, None, :, None]  # (B, N, Hk, G, C, C)
    o = torch.einsum("bnigcs,bnsid->bncigd", scores, vc)  # (B, N, C, Hk, G, Dv)
    kv = torch.einsum("bnsif,bnsid->bnifd", kc * k_to_end[None, :, :, :, None], vc)  # (B, N, Hk, F, Dv)

    state = q.new_zeros(B, Hk, F, Dv) if initial_state is None else initial_state.float()
    starts = []  # state entering each chunk
    for n in range(N):
        starts.append(state)
        state = state * chunk_decay[n][None, :, None, None] + kv[:, n]
    starts = torch.stack(starts, dim=1)  # (B, N, Hk, F, Dv)
    o = o + torch.einsum("bncigf,bnifd->bncigd", qc * from_start[None, None, :, :, None, None], starts)
    return o.reshape(B, N * C, H, Dv)[:, :T], state
