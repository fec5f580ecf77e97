"""flash-linear-attention's simple-GLA kernels behind our contract, for comparison (``DISTILL_BACKEND=fla``).

fla is not trusted blindly: its GQA path is silently wrong, so k, v and the initial state are
repeated to H heads here (the final state is read back from the first query head of each
group, identical across the group); its chunk kernels need a GPU; and its outputs are checked
against the torch reference by the benchmark runner before anything is timed. The per-head decay
goes in as ``g_gamma`` (fla's data-independent log decay); fla does not return a gradient for it.
The public functions check their arguments; their ``*_unchecked`` twins are what dispatch calls.

The gated recurrences (GLA; delta rule and gated delta rule) go the same way: k, v, the gates,
beta and the initial state are repeated per query head by index (fla's own GVA/GQA handling is
not used), fla runs H independent heads whose states stay identical within each GQA group, and
the state of the group's first query head is returned as the kv head's [B, Hk, F, Dv] state.
The gradients come out right: repeat_interleave sums each copy's gradient back into its kv head,
and only the copy that is returned carries the final state's cotangent. scale=1.0 throughout
(the caller scales). The log-gates go in as fp32, beta in the dtype of q, k, v. fla's
chunk_delta_rule refuses fp32, so the ungated delta rule on fp32 inputs runs
chunk_gated_delta_rule with a zero log-gate (the same recurrence).
"""
from __future__ import annotations

import torch

from .validate import check_delta_args, check_gla_args, check_scan_args


def _check_args(q, k, v, log_decay=None, initial_state=None) -> None:
    """Our contract (:func:`check_scan_args`), plus what fla needs: CUDA tensors."""
    check_scan_args(q, k, v, log_decay, initial_state)
    _check_cuda(q)


def _check_cuda(q) -> None:
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


# ------------------------------------------------------------------ GLA, delta rule, gated delta rule


def _per_query_head(x, G: int, dtype=None):
    """[B, T, Hk, ...] -> [B, T, H, ...]: each kv head's gate / beta repeated for its G query heads."""
    return (x if dtype is None else x.to(dtype)).repeat_interleave(G, dim=2)


def chunk_gla(q, k, v, log_alpha, initial_state=None):
    """Same contract as :func:`distill_kernels.gated.naive_gla`, via fla's chunk_gla."""
    check_gla_args(q, k, v, log_alpha, initial_state)
    _check_cuda(q)
    return chunk_gla_unchecked(q, k, v, log_alpha, initial_state)


def chunk_gla_unchecked(q, k, v, log_alpha, initial_state=None):
    """:func:`chunk_gla` for a caller that has already checked its arguments (dispatch)."""
    from fla.ops.gla import chunk_gla as fla_chunk_gla

    q, k, v, _, h0, dims = _prepare(q, k, v, None, initial_state)
    g = _per_query_head(log_alpha, dims[2], torch.float32)  # (B, T, H, F)
    o, ht = fla_chunk_gla(q, k, v, g, scale=1.0, initial_state=h0, output_final_state=True)
    return _finish(o, ht, dims)


def recurrent_gla(q, k, v, log_alpha, initial_state=None):
    """Same contract, via fla's fused_recurrent_gla."""
    check_gla_args(q, k, v, log_alpha, initial_state)
    _check_cuda(q)
    return recurrent_gla_unchecked(q, k, v, log_alpha, initial_state)


def recurrent_gla_unchecked(q, k, v, log_alpha, initial_state=None):
    """:func:`recurrent_gla` for a caller that has already checked its arguments (dispatch)."""
    from fla.ops.gla import fused_recurrent_gla

    q, k, v, _, h0, dims = _prepare(q, k, v, None, initial_state)
    g = _per_query_head(log_alpha, dims[2], torch.float32)  # (B, T, H, F)
    o, ht = fused_recurrent_gla(q, k, v, gk=g, scale=1.0, initial_state=h0, output_final_state=True)
    return _finish(o, ht, dims)


def chunk_delta_rule(q, k, v, beta, log_alpha=None, initial_state=None):
    """Same contract as :func:`distill_kernels.delta.naive_delta_rule`, via fla's chunk_delta_rule
    (``log_alpha`` None, 16-bit inputs) or chunk_gated_delta_rule."""
    check_delta_args(q, k, v, beta, log_alpha, initial_state)
    _check_cuda(q)
    return chunk_delta_rule_unchecked(q, k, v, beta, log_alpha, initial_state)


def chunk_delta_rule_unchecked(q, k, v, beta, log_alpha=None, initial_state=None):
    """:func:`chunk_delta_rule` for a caller that has already checked its arguments (dispatch)."""
    q, k, v, _, h0, dims = _prepare(q, k, v, None, initial_state)
    G = dims[2]
    beta = _per_query_head(beta, G, q.dtype)  # (B, T, H)
    if log_alpha is None and q.dtype != torch.float32:
        from fla.ops.delta_rule import chunk_delta_rule as fla_chunk_delta_rule

        o, ht = fla_chunk_delta_rule(q, k, v, beta, scale=1.0, initial_state=h0, output_final_state=True)
    else:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        if log_alpha is None:  # fla's chunk_delta_rule takes no fp32: the gated kernel with alpha = 1
            g = torch.zeros(beta.shape, dtype=torch.float32, device=q.device)
        else:
            g = _per_query_head(log_alpha, G, torch.float32)  # (B, T, H)
        o, ht = chunk_gated_delta_rule(q, k, v, g, beta, scale=1.0, initial_state=h0, output_final_state=True)
    return _finish(o, ht, dims)


def recurrent_delta_rule(q, k, v, beta, log_alpha=None, initial_state=None):
    """Same contract, via fla's fused_recurrent_delta_rule / fused_recurrent_gated_delta_rule."""
    check_delta_args(q, k, v, beta, log_alpha, initial_state)
    _check_cuda(q)
    return recurrent_delta_rule_unchecked(q, k, v, beta, log_alpha, initial_state)


def recurrent_delta_rule_unchecked(q, k, v, beta, log_alpha=None, initial_state=None):
    """:func:`recurrent_delta_rule` for a caller that has already checked its arguments (dispatch)."""
    q, k, v, _, h0, dims = _prepare(q, k, v, None, initial_state)
    G = dims[2]
    beta = _per_query_head(beta, G, q.dtype)  # (B, T, H)
    if log_alpha is None:
        from fla.ops.delta_rule import fused_recurrent_delta_rule

        o, ht = fused_recurrent_delta_rule(q, k, v, beta, scale=1.0, initial_state=h0, output_final_state=True)
    else:
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

        g = _per_query_head(log_alpha, G, torch.float32)  # (B, T, H)
        o, ht = fused_recurrent_gated_delta_rule(
            q, k, v, g=g, beta=beta, scale=1.0, initial_state=h0, output_final_state=True
        )
    return _finish(o, ht, dims)
