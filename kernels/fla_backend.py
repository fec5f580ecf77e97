"""flash-linear-attention's simple-GLA kernels behind our contract, for comparison (``DISTILL_BACKEND=fla``).

fla is not trusted blindly: its GQA path is silently wrong, so k, v and the initial state are
repeated to H heads here (the final state is read back from the first query head of each
group, identical across the group); its chunk kernels need a GPU; and its outputs are checked
against the torch reference by the benchmark runner before anything is timed. The per-head decay
goes in as ``g_gamma`` (fla's data-independent log decay); fla does not return a gradient for it.
The public functions check their arguments; their ``*_unchecked`` twins are what dispatch calls.
"""
from __future__ import annotations

import torch

from .validate import check_scan_args


def _check_args(q, k, v, log_decay=None, initial_state=None) -> None:
    """Our contract (:func:`check_scan_args`), plus what fla needs: CUDA tensors."""
    check_scan_args(q, k, v, log_decay, initial_state)
    if q.device.type != "cuda":
        raise ValueError(f"DISTILL_BACKEND=fla needs CUDA tensors (fla's kernels do not run on {q.device})")


def _prepare(q, k, v, log_decay, initial_state):
    B, T, H, F = q.shape
    Hk, Dv = k.shape[2], v.shape[3]
    G = H // Hk
    dtype = q.dtype if v.dtype == q.dtype else torch.float32  # fla wants one dtype for q, k, v
    k, v = (x.to(dtype).repeat_interleave(G, dim=2) for x in (k, v))  # (B, T, H, *)
    h0 = None if initial_state is None else initial_state.float().repeat_interleave(G, dim=1)  # (B, H, F, Dv)
    g_gamma = None if log_decay is None else log_decay.float().repeat_interleave(G)  # (H,)
    return q.to(dtype), k, v, g_gamma, h0, (B, Hk, G, F, Dv)


def _finish(o, ht, dims):
    B, Hk, G, F, Dv = dims
    return o.float(), ht.float().view(B, Hk, G, F, Dv)[:, :, 0]


def chunk_linear_attn(q, k, v, log_decay=None, initial_state=None):
    """Same contract as :func:`distill_kernels.naive.naive_linear_attn`, via fla's chunk_simple_gla."""
    _check_args(q, k, v, log_decay, initial_state)
    return chunk_linear_attn_unchecked(q, k, v, log_decay, initial_state)


def chunk_linear_attn_unchecked(q, k, v, log_decay=None, initial_state=None):
    """:func:`chunk_linear_attn` for a caller that has already checked its arguments (dispatch)."""
    from fla.ops.simple_gla import chunk_simple_gla

    q, k, v, g_gamma, h0, dims = _prepare(q, k, v, log_decay, initial_state)
    o, ht = chunk_simple_gla(q, k, v, g_gamma=g_gamma, scale=1.0, initial_state=h0, output_final_state=True)
    return _finish(o, ht, dims)


def recurrent_linear_attn(q, k, v, log_decay=None, initial_state=None):
    """Same contract, via fla's fused_recurrent_simple_gla."""
    _check_args(q, k, v, log_decay, initial_state)
    return recurrent_linear_attn_unchecked(q, k, v, log_decay, initial_state)


def recurrent_linear_attn_unchecked(q, k, v, log_decay=None, initial_state=None):
    """:func:`recurrent_linear_attn` for a caller that has already checked its arguments (dispatch)."""
    from fla.ops.simple_gla import fused_recurrent_simple_gla

    q, k, v, g_gamma, h0, dims = _prepare(q, k, v, log_decay, initial_state)
    o, ht = fused_recurrent_simple_gla(q, k, v, g_gamma=g_gamma, scale=1.0, initial_state=h0, output_final_state=True)
    return _finish(o, ht, dims)
