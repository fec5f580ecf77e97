"""The delta rule (DeltaNet) and the gated delta rule (Gated DeltaNet): a state that overwrites the
value stored under a key instead of adding to it. Yang et al. 2024, "Parallelizing Linear
Transformers with the Delta Rule over Sequence Length" (the chunked WY form); Yang et al. 2025,
"Gated Delta Networks: Improving Mamba2 with Delta Rule" (the scalar gate).

Layout everywhere ``[B, T, H, D]``. Query heads ``H`` share key/value heads ``Hk`` (GQA): query
head ``h`` reads kv head ``h // (H // Hk)``. Per kv head, with the F x Dv state
``S_{-1} = initial_state`` (zeros when None):

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T      alpha_t = exp(log_alpha_t)
    o_t = S_t^T q_t

beta_t in (0, 1) and alpha_t in (0, 1] are scalars per kv head and token (``log_alpha=None`` is
alpha = 1: plain DeltaNet). k is expected L2-normalised by the caller; nothing is normalised or
scaled here. q [B,T,H,F], k [B,T,Hk,F], v [B,T,Hk,Dv], beta [B,T,Hk], log_alpha [B,T,Hk] or None,
initial_state [B,Hk,F,Dv]. Every form returns o [B,T,H,Dv] and the final state [B,Hk,F,Dv], in
fp32 (float64 when q is float64, which the tests use). A padding token (beta = 0, log_alpha = 0;
k = 0 too by convention) leaves the state as it was.

    naive_delta_rule      the reference: one step per token with the F x F transition, for clarity
    chunk_delta_rule      training / prefill (WY form): Python loops over chunks only
    recurrent_delta_rule  decode: token by token on the kv-head state
"""
from __future__ import annotations

import torch
import torch.nn.functional as F_

from .gated import head_gated_chunks
from .state import compute_dtype as _compute_dtype
from .state import initial_state_or_zeros as _initial


def naive_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_alpha: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step reference, the rule as written. q [B,T,H,F], k [B,T,Hk,F], v [B,T,Hk,Dv],
    beta [B,T,Hk], log_alpha [B,T,Hk] or None, initial_state [B,Hk,F,Dv] or None
    -> o [B,T,H,Dv], final state [B,Hk,F,Dv]."""
    B, T, H, F = q.shape
    Hk, Dv = k.shape[2], v.shape[-1]
    dtype = _compute_dtype(q)
    q, k, v, beta = (x.to(dtype) for x in (q, k, v, beta))
    alpha = torch.ones_like(beta) if log_alpha is None else torch.exp(log_alpha.to(dtype))  # (B, T, Hk)
    kv_head = torch.arange(H, device=q.device) // (H // Hk)  # (H,) the kv head each query head reads
    eye = torch.eye(F, dtype=dtype, device=q.device)
    state = _initial(initial_state, B, Hk, F, Dv, dtype, q.device)  # (B, Hk, F, Dv)
    outs = []
    for t in range(T):
        a, b = alpha[:, t, :, None, None], beta[:, t, :, None, None]  # (B, Hk, 1, 1)
        kt = k[:, t]  # (B, Hk, F)
        transition = a * (eye - b * kt[..., :, None] * kt[..., None, :])  # (B, Hk, F, F)
        state = transition @ state + b * kt[..., :, None] * v[:, t, :, None, :]  # (B, Hk, F, Dv)
        outs.append(torch.einsum("bhf,bhfd->bhd", q[:, t], state[:, kv_head]))  # (B, H, Dv)
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, H, Dv)
    return o, state


def recurrent_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_alpha: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode path: decay, read what the state holds under k_t, move it towards v_t by beta_t.
    Same contract as :func:`naive_delta_rule`; O(F Dv) per token and kv head."""
    B, T, H, F = q.shape
    Hk, Dv = k.shape[2], v.shape[-1]
    G = H // Hk
    dtype = _compute_dtype(q)
    qg = q.to(dtype).reshape(B, T, Hk, G, F)
    k, v, beta = k.to(dtype), v.to(dtype), beta.to(dtype)
    alpha = None if log_alpha is None else torch.exp(log_alpha.to(dtype))  # (B, T, Hk)
    state = _initial(initial_state, B, Hk, F, Dv, dtype, q.device)
    outs = []
    for t in range(T):
        if alpha is not None:
            state = alpha[:, t, :, None, None] * state
        kt = k[:, t]  # (B, Hk, F)
        stored = (kt[..., None, :] @ state)[..., 0, :]  # (B, Hk, Dv) what the state holds under k_t
        delta = beta[:, t, :, None] * (v[:, t] - stored)  # (B, Hk, Dv)
        state = state + kt[..., :, None] * delta[..., None, :]
        outs.append(qg[:, t] @ state)  # (B, Hk, G, Dv)
    o = torch.stack(outs, dim=1) if outs else qg.new_zeros(B, 0, Hk, G, Dv)
    return o.reshape(B, T, H, Dv), state


def chunk_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_alpha: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked (WY) form; same contract as :func:`naive_delta_rule`.

    Write S_t = alpha_t S_{t-1} + k_t u_t^T with u_t = beta_t (v_t - alpha_t S_{t-1}^T k_t), the
    value actually added. In a chunk entered with state S, let g_t be the log-gate summed from the
    chunk's start through t and D[t, s] = exp(g_t - g_s) for s <= t. Unrolling S_{t-1} gives one
    unit lower-triangular system for all u of the chunk:

        (I + A) U = diag(beta) V - diag(beta exp(g)) K S,   A[t, s] = beta_t (k_t . k_s) D[t, s], s < t

    so U = Ũ - W S with Ũ = (I + A)^-1 diag(beta) V and W = (I + A)^-1 diag(beta exp(g)) K, both
    independent of S: they are solved for every chunk at once. Then, chunk by chunk,

        o     = diag(exp(g)) Q S + ((Q K^T) ⊙ D) U      (D is zero above the diagonal)
        S_new = exp(g_last) S + (K ⊙ exp(g_last - g))^T U

    All exponents are <= 0. Padding appended to reach a whole number of chunks is k = 0, beta = 0,
    log_alpha = 0, so its u is 0 and it decays nothing."""
    B, T, H, F = q.shape
    Hk, Dv = k.shape[2], v.shape[-1]
    if log_alpha is None:
        log_alpha = beta.new_zeros(beta.shape)
    c = head_gated_chunks(q, k, v, log_alpha, chunk_size)
    N, dtype = c.b.shape[1], c.b.dtype
    bh = F_.pad(beta.to(dtype), (0, 0, 0, N * chunk_size - T)).view(B, N, chunk_size, Hk).transpose(2, 3)  # (B, N, Hk, C)
    A = (bh[..., :, None] * (c.kh @ c.kh.transpose(-1, -2)) * c.decay).tril(-1)  # (B, N, Hk, C, C) strictly lower
    eye = torch.eye(chunk_size, dtype=dtype, device=q.device)
    rhs = torch.cat([bh[..., None] * c.vh, (bh * torch.exp(c.b))[..., None] * c.kh], dim=-1)  # (B, N, Hk, C, Dv+F)
    u_free, w = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True).split([Dv, F], -1)

    state = _initial(initial_state, B, Hk, F, Dv, dtype, q.device)
    starts, added = [], []  # the state entering each chunk; each chunk's U
    for n in range(N):
        starts.append(state)
        u = u_free[:, n] - w[:, n] @ state  # (B, Hk, C, Dv)
        added.append(u)
        state = c.chunk_decay[:, n, :, None, None] * state + c.k_out[:, n].transpose(-1, -2) @ u
    starts = torch.stack(starts, dim=1)[:, :, :, None]  # (B, N, Hk, 1, F, Dv)
    added = torch.stack(added, dim=1)[:, :, :, None]  # (B, N, Hk, 1, C, Dv)
    o = c.q_in @ starts + c.attn @ added  # (B, N, Hk, G, C, Dv)
    return o.permute(0, 1, 4, 2, 3, 5).reshape(B, N * chunk_size, H, Dv)[:, :T], state
