"""Recurrent causal linear attention in Triton: the decode step (T = 1) and short T.

One program owns a [F, BV] slab of one kv head's state and walks it in BK-row tiles: each tile
is read once, advanced through the T tokens (S = γ S + k_t v_tᵀ) and written once, and every
query head of the kv head adds q_tᵀ S over that tile to its output. At T = 1 the state is
therefore read and written exactly once, which is what bounds a decode step.

Same contract as :func:`distill_kernels.naive.naive_linear_attn`. With ``inplace=True`` and an
fp32 contiguous ``initial_state``, the state is updated in place and returned (no allocation),
which is what ``generate()`` wants. The kernel has no backward: when autograd is recording and
an input needs a gradient, the call goes to the Triton chunked scan instead (and ``inplace`` is
ignored: a fresh state comes back).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_chunk
from .triton_chunk import check_device
from .validate import check_scan_args


@triton.jit
def _recurrent_kernel(
    q_ptr, k_ptr, v_ptr, ld_ptr, s0_ptr, st_ptr, o_ptr,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,
    T, H, Hk, F, DV,
    BK: tl.constexpr, BV: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_S0: tl.constexpr,
):
    """Grid (Dv blocks, B*Hk). s0 and st [B,Hk,F,Dv] fp32 (may alias); o [B,T,H,Dv] fp32 zeroed."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    b, hk = (i_bh // Hk).to(tl.int64), i_bh % Hk
    G = H // Hk
    cols = i_v * BV + tl.arange(0, BV)
    col_ok = cols < DV
    gamma = 1.0
    if HAS_DECAY:
        gamma = tl.exp(tl.load(ld_ptr + hk).to(tl.float32))
    state_head = (b * Hk + hk) * F * DV
    for f0 in range(0, F, BK):
        rows = f0 + tl.arange(0, BK)
        row_ok = rows < F
        tile_off = state_head + rows[:, None] * DV + cols[None, :]
        tile_ok = row_ok[:, None] & col_ok[None, :]
        state = tl.zeros([BK, BV], tl.float32)
        if HAS_S0:
            state += tl.load(s0_ptr + tile_off, mask=tile_ok, other=0.0)
        for t in range(T):
            kt = tl.load(k_ptr + b * skb + t * skt + hk * skh + rows, mask=row_ok, other=0.0).to(tl.float32)
            vt = tl.load(v_ptr + b * svb + t * svt + hk * svh + cols, mask=col_ok, other=0.0).to(tl.float32)
            state = state * gamma + kt[:, None] * vt[None, :]
            for g in range(G):
                h = hk * G + g
                qt = tl.load(q_ptr + b * sqb + t * sqt + h * sqh + rows, mask=row_ok, other=0.0).to(tl.float32)
                o_at = o_ptr + ((b * T + t) * H + h) * DV + cols
                # this program alone owns these outputs, so read-add-write needs no atomics
                tl.store(o_at, tl.load(o_at, mask=col_ok, other=0.0) + tl.sum(qt[:, None] * state, axis=0), mask=col_ok)
        tl.store(st_ptr + tile_off, state, mask=tile_ok)


def recurrent_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B,T,H,F], k [B,T,Hk,F], v [B,T,Hk,Dv], log_decay [Hk] or None, initial_state [B,Hk,F,Dv]
    or None -> o [B,T,H,Dv] fp32, state [B,Hk,F,Dv] fp32 (``initial_state`` itself if ``inplace``).
    Checks its arguments, then runs :func:`recurrent_linear_attn_unchecked`."""
    check_scan_args(q, k, v, log_decay, initial_state, unit_stride=True)
    check_device(q.device)
    return recurrent_linear_attn_unchecked(q, k, v, log_decay, initial_state, inplace)


def recurrent_linear_attn_unchecked(q, k, v, log_decay=None, initial_state=None, inplace: bool = False):
    """:func:`recurrent_linear_attn` for a caller that has already run ``check_scan_args(...,
    unit_stride=True)`` and ``check_device`` (``distill_kernels`` dispatch)."""
    B, T, H, F = q.shape
    Hk, Dv = k.shape[2], v.shape[3]
    tensors = (q, k, v, log_decay, initial_state)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors):
        return triton_chunk.chunk_linear_attn_unchecked(q, k, v, log_decay, initial_state)
    s0 = None if initial_state is None else initial_state.float().contiguous()
    if inplace and s0 is not None and s0.data_ptr() != initial_state.data_ptr():
        raise ValueError(
            f"inplace=True needs initial_state as contiguous float32 [B, Hk, F, Dv] = [{B}, {Hk}, {F}, {Dv}], "
            f"got {initial_state.dtype} with strides {initial_state.stride()}"
        )
    state = s0 if inplace and s0 is not None else q.new_empty(B, Hk, F, Dv, dtype=torch.float32)
    o = q.new_zeros(B, T, H, Dv, dtype=torch.float32)
    if T == 0:
        return o, (s0 if s0 is not None else state.zero_())
    BK, BV = min(64, triton.next_power_of_2(F)), min(64, triton.next_power_of_2(Dv))
    _recurrent_kernel[(triton.cdiv(Dv, BV), B * Hk)](
        q, k, v, state if log_decay is None else log_decay.float(), state if s0 is None else s0, state, o,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        T, H, Hk, F, Dv, BK=BK, BV=BV, HAS_DECAY=log_decay is not None, HAS_S0=s0 is not None,
        num_warps=4,
    )
    return o, state
