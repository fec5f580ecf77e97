"""Gated linear attention (GLA): linear attention whose state forgets per key feature, at a rate
the data sets token by token. Yang et al. 2024, "Gated Linear Attention Transformers with
Hardware-Efficient Training" (the chunked form with a secondary, finer chunking follows its §4).

Layout everywhere ``[B, T, H, D]``. Query heads ``H`` share key/value heads ``Hk`` (GQA): query
head ``h`` reads kv head ``h // (H // Hk)``. Per kv head, with the F x Dv state
``S_{-1} = initial_state`` (zeros when None):

    S_t = diag(alpha_t) S_{t-1} + k_t v_t^T        alpha_t = exp(log_alpha_t) in (0, 1]^F
    o_t = S_t^T q_t

q [B,T,H,F], k [B,T,Hk,F], v [B,T,Hk,Dv], log_alpha [B,T,Hk,F] (<= 0), initial_state [B,Hk,F,Dv].
Every form returns o [B,T,H,Dv] and the final state [B,Hk,F,Dv], in fp32 (float64 when q is
float64, which the tests use for tight tolerances). Nothing is scaled here: the caller scales q.
A padding token (k = 0, log_alpha = 0) leaves the state as it was.

    naive_gla      the reference: one Python step per token, written for clarity
    chunk_gla      training / prefill: Python loops over chunks (and sub-chunks for strong gates), never tokens
    recurrent_gla  decode: token by token on the kv-head state
    chunk_head_gla training / prefill with one gate per kv head and token (log_alpha [B,T,Hk])
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F_

from .state import compute_dtype as _compute_dtype
from .state import initial_state_or_zeros as _initial


def naive_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step reference. q [B,T,H,F], k [B,T,Hk,F], v [B,T,Hk,Dv], log_alpha [B,T,Hk,F],
    initial_state [B,Hk,F,Dv] or None -> o [B,T,H,Dv], final state [B,Hk,F,Dv]."""
    B, T, H, F = q.shape
    Hk, Dv = k.shape[2], v.shape[-1]
    dtype = _compute_dtype(q)
    q, k, v, log_alpha = (x.to(dtype) for x in (q, k, v, log_alpha))
    kv_head = torch.arange(H, device=q.device) // (H // Hk)  # (H,) the kv head each query head reads
    state = _initial(initial_state, B, Hk, F, Dv, dtype, q.device)  # (B, Hk, F, Dv)
    outs = []
    for t in range(T):
        alpha = torch.exp(log_alpha[:, t])  # (B, Hk, F)
        write = torch.einsum("bif,bid->bifd", k[:, t], v[:, t])  # (B, Hk, F, Dv)
        state = alpha[..., None] * state + write
        outs.append(torch.einsum("bhf,bhfd->bhd", q[:, t], state[:, kv_head]))  # (B, H, Dv)
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, H, Dv)
    return o, state


def recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode path, token by token on the [B,Hk,F,Dv] state. Same contract as :func:`naive_gla`."""
    B, T, H, F = q.shape
    Hk, Dv = k.shape[2], v.shape[-1]
    G = H // Hk
    dtype = _compute_dtype(q)
    qg = q.to(dtype).reshape(B, T, Hk, G, F)
    k, v = k.to(dtype), v.to(dtype)
    alpha = torch.exp(log_alpha.to(dtype))  # (B, T, Hk, F)
    state = _initial(initial_state, B, Hk, F, Dv, dtype, q.device)
    outs = []
    for t in range(T):
        state = alpha[:, t, :, :, None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]  # (B, Hk, F, Dv)
        outs.append(qg[:, t] @ state)  # (B, Hk, G, Dv)
    o = torch.stack(outs, dim=1) if outs else qg.new_zeros(B, 0, Hk, G, Dv)
    return o.reshape(B, T, H, Dv), state


# chunk_gla factors a chunk's gates at its start when no feature decays by more than exp(-40) within
# it: every exp(±b) then stays far inside fp32's range (about exp(±87)), with room for small features.
FACTORED_SPREAD = 40.0


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 32,
    sub_chunk: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked form; same contract as :func:`naive_gla`.

    With b_t the log-gate summed from the chunk's start through t, a query t and a key s <= t of
    one chunk interact through sum_f q_tf k_sf exp(b_tf - b_sf), and the state carried into the
    chunk reaches t decayed by exp(b_t). Two ways to compute the first:

    * factored, when every feature of every chunk keeps -b_last <= ``FACTORED_SPREAD``: the scores
      are (q_t exp(b_t)) . (k_s exp(-b_s)), one masked [C, C] matrix product per chunk, as in
      linear attention. Trained gates are far from the limit (the demo student's strongest gate,
      -0.28 per token, spreads 9 over a 32-token chunk).
    * sub-chunked otherwise (GLA §4): keys in an earlier sub-chunk (``sub_chunk`` tokens) than the
      query are factored at the start r of the query's sub-chunk, exp(b_t - b_r) * exp(b_r - b_s),
      both exponents <= 0; keys in the query's own sub-chunk use exp(b_t - b_s) directly, a
      [c, c, F] tensor per sub-chunk and kv head. Every exponent is <= 0 whatever the gates.

    The choice is made once per call (reading the spread syncs a CUDA device); the sizes were the
    fastest of those tried on a CPU at layer sizes (T = 2048, F = 128). The state is carried from
    chunk to chunk with exp(b_last) and exp(b_last - b_s). Padding appended to reach a whole
    number of chunks is k = 0, log_alpha = 0: it neither writes nor decays."""
    B, T, H, F = q.shape
    Hk, Dv = k.shape[2], v.shape[-1]
    G, C = H // Hk, chunk_size
    c = min(sub_chunk, C)
    if C % c:
        raise ValueError(f"chunk_size must be a multiple of sub_chunk, got {C} and {sub_chunk}")
    N = max(1, -(-T // C))
    pad = N * C - T
    dtype = _compute_dtype(q)
    q, k, v, g = (F_.pad(x.to(dtype), (0, 0, 0, 0, 0, pad)) for x in (q, k, v, log_alpha))
    qc = q.view(B, N, C, Hk, G, F)
    kc = k.view(B, N, C, Hk, F)
    vc = v.view(B, N, C, Hk, Dv)
    b = g.view(B, N, C, Hk, F).cumsum(2)  # (B, N, C, Hk, F) log-gate from the chunk's start through t
    b_last = b[:, :, -1]  # (B, N, Hk, F)
    chunk_decay = torch.exp(b_last)  # (B, N, Hk, F) what a chunk does to the state it got
    q_in = qc * torch.exp(b)[:, :, :, :, None]  # (B, N, C, Hk, G, F) decayed from the chunk's start

    if -b_last.min() <= FACTORED_SPREAD:
        k_in = kc * torch.exp(-b)  # (B, N, C, Hk, F)
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()  # (C_t, C_s)
        scores = torch.einsum("bncigf,bnsif->bnigcs", q_in, k_in).masked_fill(~causal, 0)  # (B, N, Hk, G, C, C)
        o = torch.einsum("bnigcs,bnsid->bncigd", scores, vc)  # (B, N, C, Hk, G, Dv)
        kv = chunk_decay[..., None] * torch.einsum("bnsif,bnsid->bnifd", k_in, vc)  # (B, N, Hk, F, Dv)
    else:
        o = _sub_chunk_scores(qc, kc, vc, b, c).reshape(B, N, C, Hk, G, Dv)
        kv = torch.einsum("bnsif,bnsid->bnifd", kc * torch.exp(b_last[:, :, None] - b), vc)  # (B, N, Hk, F, Dv)

    # Across chunks: kv is what each chunk adds to the state.
    state = _initial(initial_state, B, Hk, F, Dv, dtype, q.device)
    starts = []  # the state entering each chunk
    for n in range(N):
        starts.append(state)
        state = chunk_decay[:, n, :, :, None] * state + kv[:, n]
    starts = torch.stack(starts, dim=1)  # (B, N, Hk, F, Dv)
    o = o + torch.einsum("bncigf,bnifd->bncigd", q_in, starts)
    return o.reshape(B, N * C, H, Dv)[:, :T], state


def _sub_chunk_scores(qc, kc, vc, b, c: int) -> torch.Tensor:
    """The within-chunk part of :func:`chunk_gla` by sub-chunks of ``c`` tokens, every exponent <= 0.
    qc [B,N,C,Hk,G,F], kc [B,N,C,Hk,F], vc [B,N,C,Hk,Dv], b [B,N,C,Hk,F] -> [B,N,J,c,Hk,G,Dv]."""
    B, N, C, Hk, G, F = qc.shape
    J = C // c  # sub-chunks per chunk
    b_sub = b.view(B, N, J, c, Hk, F)
    b_end = b_sub[:, :, :, -1]  # (B, N, J, Hk, F) through each sub-chunk's last token
    b_start = torch.cat([torch.zeros_like(b_end[:, :, :1]), b_end[:, :, :-1]], dim=2)  # (B, N, J, Hk, F) before it

    # Queries against keys of earlier sub-chunks of the same chunk, factored at the query's sub-chunk
    # start; sub-chunk j reads the j·c keys before it (a loop over J sub-chunks, not a masked [J, C]).
    q_off = qc.view(B, N, J, c, Hk, G, F) * torch.exp(b_sub - b_start[:, :, :, None])[:, :, :, :, :, None]
    outs = [vc.new_zeros(B, N, c, Hk, G, vc.shape[-1])]  # sub-chunk 0 has no earlier key
    for j in range(1, J):
        k_off = torch.exp(b_start[:, :, j, None] - b[:, :, : j * c]) * kc[:, :, : j * c]  # (B, N, j·c, Hk, F)
        scores = torch.einsum("bntigf,bnsif->bnigts", q_off[:, :, j], k_off)  # (B, N, Hk, G, c, j·c)
        outs.append(torch.einsum("bnigts,bnsid->bntigd", scores, vc[:, :, : j * c]))  # (B, N, c, Hk, G, Dv)
    o = torch.stack(outs, dim=2)  # (B, N, J, c, Hk, G, Dv)

    # Queries against keys of their own sub-chunk: exp(b_t - b_s) per feature, masked before exp.
    causal = torch.ones(c, c, dtype=torch.bool, device=qc.device).tril()  # (c_t, c_s)
    lag = torch.where(causal[:, :, None, None], b_sub[:, :, :, :, None] - b_sub[:, :, :, None], float("-inf"))
    k_diag = torch.exp(lag) * kc.view(B, N, J, 1, c, Hk, F)  # (B, N, J, c_t, c_s, Hk, F)
    scores = torch.einsum("bnjtigf,bnjtsif->bnjigts", qc.view(B, N, J, c, Hk, G, F), k_diag)  # (B, N, J, Hk, G, c, c)
    return o + torch.einsum("bnjigts,bnjsid->bnjtigd", scores, vc.view(B, N, J, c, Hk, vc.shape[-1]))


class HeadChunks(NamedTuple):
    """The chunked pieces of a recurrence whose gate is one scalar per kv head and token (shared by
    :func:`chunk_head_gla` and the gated delta rule). b: the log-gate summed from each chunk's start."""

    qh: torch.Tensor  # (B, N, Hk, G, C, F)
    kh: torch.Tensor  # (B, N, Hk, C, F)
    vh: torch.Tensor  # (B, N, Hk, C, Dv)
    b: torch.Tensor  # (B, N, Hk, C)
    decay: torch.Tensor  # (B, N, Hk, C, C) exp(b_t - b_s) for s <= t, else 0
    attn: torch.Tensor  # (B, N, Hk, G, C, C) (Q K^T) ⊙ decay
    q_in: torch.Tensor  # (B, N, Hk, G, C, F) queries decayed from the chunk's start
    k_out: torch.Tensor  # (B, N, Hk, C, F) keys decayed to the chunk's end
    chunk_decay: torch.Tensor  # (B, N, Hk) exp(b_last)


def head_gated_chunks(q, k, v, log_alpha, chunk_size: int) -> HeadChunks:
    """q [B,T,H,F], k [B,T,Hk,F], v [B,T,Hk,Dv], log_alpha [B,T,Hk] (<= 0) -> :class:`HeadChunks`
    in the compute dtype, padded to whole chunks of ``chunk_size`` (padding: k = v = 0, gate 1).
    Every exponent is <= 0."""
    B, T, H, F = q.shape
    Hk, Dv = k.shape[2], v.shape[-1]
    G, C = H // Hk, chunk_size
    N = max(1, -(-T // C))
    pad = N * C - T
    dtype = _compute_dtype(q)
    q, k, v = (F_.pad(x.to(dtype), (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
    g = F_.pad(log_alpha.to(dtype), (0, 0, 0, pad))  # (B, N*C, Hk)
    # Heads before time, so that chunks are batches of [C, *] matrices.
    qh = q.view(B, N, C, Hk, G, F).permute(0, 1, 3, 4, 2, 5)
    kh = k.view(B, N, C, Hk, F).transpose(2, 3)
    vh = v.view(B, N, C, Hk, Dv).transpose(2, 3)
    b = g.view(B, N, C, Hk).transpose(2, 3).cumsum(-1)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = torch.exp(torch.where(causal, b[..., :, None] - b[..., None, :], float("-inf")))
    attn = (qh @ kh[:, :, :, None].transpose(-1, -2)) * decay[:, :, :, None]
    q_in = qh * torch.exp(b)[:, :, :, None, :, None]
    k_out = kh * torch.exp(b[..., -1:] - b)[..., None]
    return HeadChunks(qh, kh, vh, b, decay, attn, q_in, k_out, torch.exp(b[..., -1]))


def chunk_head_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GLA with one gate per kv head and token, shared by all key features (fla's "simple GLA",
    Mamba-2's scalar decay): :func:`naive_gla` with ``log_alpha [B,T,Hk]`` broadcast over F.
    Chunked; with one gate per token the decay between a query t and a key s of one chunk is the
    scalar exp(b_t - b_s) (b: the log-gate summed from the chunk's start), a [C, C] matrix per kv
    head, so no sub-chunks are needed and every exponent is <= 0:

        o     = diag(exp(b)) Q S + ((Q K^T) ⊙ D) V,   D[t, s] = exp(b_t - b_s) for s <= t, else 0
        S_new = exp(b_last) S + (K ⊙ exp(b_last - b))^T V

    q [B,T,H,F], k [B,T,Hk,F], v [B,T,Hk,Dv], log_alpha [B,T,Hk] (<= 0), initial_state [B,Hk,F,Dv]
    -> o [B,T,H,Dv], final state [B,Hk,F,Dv] (fp32; float64 for float64 q)."""
    B, T, H, F = q.shape
    Hk, Dv = k.shape[2], v.shape[-1]
    c = head_gated_chunks(q, k, v, log_alpha, chunk_size)
    N = c.b.shape[1]
    state = _initial(initial_state, B, Hk, F, Dv, c.b.dtype, q.device)
    starts = []  # the state entering each chunk
    for n in range(N):
        starts.append(state)
        state = c.chunk_decay[:, n, :, None, None] * state + c.k_out[:, n].transpose(-1, -2) @ c.vh[:, n]
    starts = torch.stack(starts, dim=1)[:, :, :, None]  # (B, N, Hk, 1, F, Dv)
    o = c.q_in @ starts + c.attn @ c.vh[:, :, :, None]  # (B, N, Hk, G, C, Dv)
    return o.permute(0, 1, 4, 2, 3, 5).reshape(B, N * chunk_size, H, Dv)[:, :T], state
