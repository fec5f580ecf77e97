"""Chunked causal linear attention in Triton: forward and backward as one autograd Function.

Two entry points share the kernels:

* :func:`chunk_linear_attn` scans given features: q [B,T,H,F], k [B,T,Hk,F].
* :func:`chunk_poly_attn` scans the polynomial kernel φ(q)·φ(k) = Σ_i c_{h,i} (q̃·k̃)^i from the
  projections q̃ [B,T,H,r], k̃ [B,T,Hk,r] (degree p <= 2). Within a chunk the scores are p(q̃·k̃),
  computed directly; across chunks the expanded state [F, Dv], F = 1 + r + r(r+1)/2 in the
  layout of :mod:`distill_kernels.poly`, is built tile by tile in registers. The features
  [B,T,H,F] never reach memory.

Each checks its arguments (``check_scan_args(..., unit_stride=True)``, the device, the block
sizes) and then calls its ``*_unchecked`` twin, which trusts its caller: ``distill_kernels``
dispatch validates once at its own entry point and calls the twins directly.

The rule is that of :mod:`distill_kernels.naive` (S_t = γ S_{t-1} + k_t v_tᵀ, o_t = q_tᵀ S_t).
Sequences are cut into chunks of C tokens (the chunkwise form of Yang et al., 2024, "Gated
Linear Attention"). Forward: one kernel scans the chunks and stores the state entering each
chunk, h [B,Hk,N,F,Dv] fp32; a second computes o = q h + (q kᵀ ⊙ M) v per chunk in parallel,
with M the causal decay mask. Backward recomputes h, runs the state gradient scan in reverse
and computes dq, dk, dv per chunk. The feature dim is cut into tiles of BK rows (the polynomial
scan uses one tile for degree 0, one for degree 1 and one per row i of the degree-2 block).

GQA: query head h reads kv head h // (H // Hk) by index; k and v are never repeated. The dk and
dv kernels loop over a kv head's query heads, so there are no atomics.

Precision: the state and all accumulators are fp32. Matmul operands are fp32 (TF32 on a GPU
unless the inputs are fp32 and ``torch.get_float32_matmul_precision() == "highest"``), except
that on a GPU, when q, k and v are all bf16, operands are cast to bf16 (state included).

Gradients: q, k, v, initial_state, log_decay, and the polynomial coefficients. The log-decay
gradient uses dG_t = Σ_heads do_t·o_t − v_t·dv_t (+ <dS_T, S_T> at the last token), with
G_t = (t+1) log γ, so it costs a few torch reductions and no kernel.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .poly import check_poly_args, poly_feature_dim
from .validate import check_scan_args

# Triton decides when a function is decorated whether it is interpreted: its own library (tl.zeros,
# ...) when triton is first imported, our kernels when this module is. Both must agree.
try:
    INTERPRETED = bool(triton.knobs.runtime.interpret)
except AttributeError:  # triton < 3.4 has no knobs
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")
_LIBRARY_INTERPRETED = type(tl.zeros).__name__ == "InterpretedFunction"
MAX_POLY_DEGREE = 2


def _autotune(key: list[str]):
    """A small sweep of warps on a GPU; one config under the interpreter (more need a driver) or
    with DISTILL_TRITON_AUTOTUNE=0 (fast compiles, e.g. for tests on a GPU). Every tuned kernel
    only stores (never accumulates), so re-running it while tuning is safe."""
    if INTERPRETED or os.environ.get("DISTILL_TRITON_AUTOTUNE", "1") == "0":
        configs = [triton.Config({}, num_warps=4, num_stages=2)]
    else:
        configs = [triton.Config({}, num_warps=w, num_stages=2) for w in (4, 8)]
    return triton.autotune(configs=configs, key=key)


TUNE_KEY = ["F", "DV", "R", "C", "BK", "BV"]


@triton.jit
def _mm(a, b, LOWP: tl.constexpr, PREC: tl.constexpr):
    """a @ b with fp32 accumulation."""
    if LOWP:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _tile_rows(tile, F, R, BK: tl.constexpr, POLY: tl.constexpr):
    """State rows of feature tile ``tile``: (rows [BK], valid [BK], degree).

    Plain features: rows tile*BK ... Polynomial: tile 0 = degree 0 (row 0), tile 1 = degree 1
    (rows 1..r), tile 2+i = degree-2 pairs (i, j >= i), whose rows are contiguous in triu order."""
    j = tl.arange(0, BK)
    if POLY:
        deg = tl.minimum(tile, 2)
        i = tl.maximum(tile - 2, 0)
        rows = tl.where(deg == 0, j, tl.where(deg == 1, 1 + j, 1 + R + i * R - (i * (i - 1)) // 2 + j - i))
        ok = tl.where(deg == 0, j < 1, tl.where(deg == 1, j < R, (j >= i) & (j < R)))
    else:
        deg = tile * 0 + 1
        rows = tile * BK + j
        ok = rows < F
    return rows, ok, deg


@triton.jit
def _poly_tile(x, xi, tile, ok, t_ok, BK: tl.constexpr):
    """Unweighted polynomial features of one tile [C, BK] from x [C, BK] (r used) and x_i [C]."""
    j = tl.arange(0, BK)
    deg = tl.minimum(tile, 2)
    i = tl.maximum(tile - 2, 0)
    w = tl.where(j == i, 1.0, 1.4142135623730951)  # sqrt(2!/1!1!) off the diagonal
    f = tl.where(deg == 0, 1.0, tl.where(deg == 1, x, xi[:, None] * x * w[None, :]))
    return tl.where(t_ok[:, None] & ok[None, :], f, 0.0)


@triton.jit
def _poly_tile_bwd(df, x, xi, tile, ok, BK: tl.constexpr):
    """Gradient of one polynomial tile: df [C, BK] w.r.t. its features -> dx [C, BK]."""
    j = tl.arange(0, BK)
    deg = tl.minimum(tile, 2)
    i = tl.maximum(tile - 2, 0)
    df = tl.where(ok[None, :], df, 0.0)
    g = df * tl.where(j == i, 1.0, 1.4142135623730951)[None, :]
    # f_ij = w x_i x_j: d/dx_j = w x_i df_ij, and column i also collects Σ_j w x_j df_ij
    dx2 = xi[:, None] * g + tl.where(j[None, :] == i, tl.sum(g * x, axis=1)[:, None], 0.0)
    return tl.where(deg == 0, 0.0, tl.where(deg == 1, df, dx2))


@triton.jit
def _load_rank(x_head, t, t_ok, stride_t, R, BR: tl.constexpr):
    """Projected rows x̃ [C, BR] fp32 (columns >= r are zero)."""
    j = tl.arange(0, BR)
    return tl.load(x_head + t[:, None] * stride_t + j[None, :], mask=t_ok[:, None] & (j < R)[None, :], other=0.0).to(
        tl.float32
    )


@triton.jit
def _load_feats(x_head, t, t_ok, stride_t, tile, rows, ok, R, BK: tl.constexpr, POLY: tl.constexpr):
    """Feature tile [C, BK] fp32 of tokens t for one head (x_head points at that head)."""
    if POLY:
        x = _load_rank(x_head, t, t_ok, stride_t, R, BK)
        xi = tl.load(x_head + t * stride_t + tl.maximum(tile - 2, 0), mask=t_ok, other=0.0).to(tl.float32)
        f = _poly_tile(x, xi, tile, ok, t_ok, BK)
    else:
        mask = t_ok[:, None] & ok[None, :]
        f = tl.load(x_head + t[:, None] * stride_t + rows[None, :], mask=mask, other=0.0).to(tl.float32)
    return f


@triton.jit
def _poly_eval(s, c_head, P: tl.constexpr):
    """p(s) = Σ_i c_i s^i and p'(s) by Horner; c_head points at one head's P+1 coefficients."""
    p = tl.zeros_like(s) + tl.load(c_head + P).to(tl.float32)
    dp = tl.zeros_like(s)
    for j in tl.static_range(P):
        dp = dp * s + p
        p = p * s + tl.load(c_head + P - 1 - j).to(tl.float32)
    return p, dp


@triton.jit
def _decay_mask(lam, offs_c, HAS_DECAY: tl.constexpr):
    """M [C, C]: γ^(t-s) for s <= t, else 0."""
    lag = offs_c[:, None] - offs_c[None, :]
    if HAS_DECAY:
        m = tl.exp(tl.where(lag >= 0, lam * lag.to(tl.float32), float("-inf")))
    else:
        m = tl.where(lag >= 0, 1.0, 0.0)
    return m


@triton.jit
def _scores(q_head, k_head, c_head, t, t_ok, sqt, skt, R, NF, F, C: tl.constexpr, BK: tl.constexpr, P: tl.constexpr,
            POLY: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr):
    """Within-chunk scores φ(q_t)·φ(k_s) [C, C] (before the mask) and, for the polynomial
    scan, p'(q̃·k̃) and q̃·k̃."""
    if POLY:
        s = _mm(_load_rank(q_head, t, t_ok, sqt, R, BK), tl.trans(_load_rank(k_head, t, t_ok, skt, R, BK)), LOWP, PREC)
        p, dp = _poly_eval(s, c_head, P)
    else:
        p = tl.zeros([C, C], tl.float32)
        for tile in range(NF):
            rows, ok, deg = _tile_rows(tile, F, R, BK, POLY)
            qf = _load_feats(q_head, t, t_ok, sqt, tile, rows, ok, R, BK, POLY)
            kf = _load_feats(k_head, t, t_ok, skt, tile, rows, ok, R, BK, POLY)
            p += _mm(qf, tl.trans(kf), LOWP, PREC)
        s = p
        dp = p * 0.0 + 1.0
    return p, dp, s


@_autotune(TUNE_KEY)
@triton.jit
def _fwd_state_kernel(
    k_ptr, v_ptr, ld_ptr, h0_ptr, h_ptr, ht_ptr,
    skb, skt, skh, svb, svt, svh,
    T, Hk, F, DV, R, N,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    POLY: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_H0: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr,
):
    """Grid (feature tiles, Dv blocks, B*Hk). Scans the chunks in order; stores the state entering
    each chunk into h [B,Hk,N,F,Dv] and the final state into ht [B,Hk,F,Dv]."""
    i_f, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hk = (i_bh // Hk).to(tl.int64), i_bh % Hk
    bhk = b * Hk + hk
    rows, ok, deg = _tile_rows(i_f, F, R, BK, POLY)
    offs_c = tl.arange(0, C)
    cols = i_v * BV + tl.arange(0, BV)
    tile_off = rows[:, None] * DV + cols[None, :]
    tile_ok = ok[:, None] & (cols < DV)[None, :]
    lam = 0.0
    if HAS_DECAY:
        lam = tl.load(ld_ptr + hk).to(tl.float32)
    state = tl.zeros([BK, BV], tl.float32)
    if HAS_H0:
        state += tl.load(h0_ptr + bhk * F * DV + tile_off, mask=tile_ok, other=0.0)
    k_head = k_ptr + b * skb + hk * skh
    v_head = v_ptr + b * svb + hk * svh
    for n in range(N):
        tl.store(h_ptr + (bhk * N + n) * F * DV + tile_off, state, mask=tile_ok)
        t = n * C + offs_c
        t_ok = t < T
        kf = _load_feats(k_head, t, t_ok, skt, i_f, rows, ok, R, BK, POLY)  # (C, BK)
        vv = tl.load(v_head + t[:, None] * svt + cols[None, :], mask=t_ok[:, None] & (cols < DV)[None, :], other=0.0)
        if HAS_DECAY:
            L = tl.minimum(T - n * C, C)
            kf = kf * tl.where(t_ok, tl.exp(lam * (L - 1 - offs_c).to(tl.float32)), 0.0)[:, None]
            state = state * tl.exp(lam * L.to(tl.float32))
        state += _mm(tl.trans(kf), vv.to(tl.float32), LOWP, PREC)
    tl.store(ht_ptr + bhk * F * DV + tile_off, state, mask=tile_ok)


@_autotune(TUNE_KEY)
@triton.jit
def _fwd_out_kernel(
    q_ptr, k_ptr, v_ptr, c_ptr, ld_ptr, h_ptr, o_ptr,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,
    T, H, Hk, F, DV, R, N, NF,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, P: tl.constexpr,
    POLY: tl.constexpr, HAS_DECAY: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr,
):
    """Grid (Dv blocks, N, B*H). o_chunk = (φ(q) ⊙ γ^(t+1)) h_n + (scores ⊙ M) v."""
    i_v, n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = (i_bh // H).to(tl.int64), i_bh % H
    hk = h // (H // Hk)
    offs_c = tl.arange(0, C)
    t = n * C + offs_c
    t_ok = t < T
    cols = i_v * BV + tl.arange(0, BV)
    col_ok = cols < DV
    q_head = q_ptr + b * sqb + h * sqh
    k_head = k_ptr + b * skb + hk * skh
    c_head = c_ptr + h * (P + 1)
    h_chunk = h_ptr + ((b * Hk + hk) * N + n) * F * DV
    lam = 0.0
    if HAS_DECAY:
        lam = tl.load(ld_ptr + hk).to(tl.float32)
    o = tl.zeros([C, BV], tl.float32)
    p = tl.zeros([C, C], tl.float32)
    for tile in range(NF):
        rows, ok, deg = _tile_rows(tile, F, R, BK, POLY)
        qf = _load_feats(q_head, t, t_ok, sqt, tile, rows, ok, R, BK, POLY)  # (C, BK)
        if POLY:
            qf = qf * tl.load(c_head + deg).to(tl.float32)
        else:
            p += _mm(qf, tl.trans(_load_feats(k_head, t, t_ok, skt, tile, rows, ok, R, BK, POLY)), LOWP, PREC)
        hh = tl.load(h_chunk + rows[:, None] * DV + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
        o += _mm(qf, hh, LOWP, PREC)
    if HAS_DECAY:
        o = o * tl.exp(lam * (offs_c + 1).to(tl.float32))[:, None]
    if POLY:
        p, dp, s = _scores(q_head, k_head, c_head, t, t_ok, sqt, skt, R, NF, F, C, BK, P, POLY, LOWP, PREC)
    p = p * _decay_mask(lam, offs_c, HAS_DECAY)
    vv = tl.load(v_ptr + b * svb + hk * svh + t[:, None] * svt + cols[None, :], mask=t_ok[:, None] & col_ok[None, :],
                 other=0.0)
    o += _mm(p, vv.to(tl.float32), LOWP, PREC)
    tl.store(o_ptr + ((b * T + t[:, None]) * H + h) * DV + cols[None, :], o, mask=t_ok[:, None] & col_ok[None, :])


@_autotune(TUNE_KEY)
@triton.jit
def _bwd_state_kernel(
    q_ptr, c_ptr, ld_ptr, do_ptr, dht_ptr, dh_ptr, dh0_ptr,
    sqb, sqt, sqh,
    T, H, Hk, F, DV, R, N,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, P: tl.constexpr,
    POLY: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_DHT: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr,
):
    """Grid (feature tiles, Dv blocks, B*Hk). Reverse scan: dh [B,Hk,N,F,Dv] gets the gradient of
    the state leaving each chunk; dh0 [B,Hk,F,Dv] that of the initial state."""
    i_f, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hk = (i_bh // Hk).to(tl.int64), i_bh % Hk
    G = H // Hk
    bhk = b * Hk + hk
    rows, ok, deg = _tile_rows(i_f, F, R, BK, POLY)
    offs_c = tl.arange(0, C)
    cols = i_v * BV + tl.arange(0, BV)
    col_ok = cols < DV
    tile_off = rows[:, None] * DV + cols[None, :]
    tile_ok = ok[:, None] & col_ok[None, :]
    lam = 0.0
    if HAS_DECAY:
        lam = tl.load(ld_ptr + hk).to(tl.float32)
    dh = tl.zeros([BK, BV], tl.float32)
    if HAS_DHT:
        dh += tl.load(dht_ptr + bhk * F * DV + tile_off, mask=tile_ok, other=0.0)
    for j in range(N):
        n = N - 1 - j
        tl.store(dh_ptr + (bhk * N + n) * F * DV + tile_off, dh, mask=tile_ok)
        t = n * C + offs_c
        t_ok = t < T
        if HAS_DECAY:
            dh = dh * tl.exp(lam * tl.minimum(T - n * C, C).to(tl.float32))
        for g in range(G):
            h = hk * G + g
            qf = _load_feats(q_ptr + b * sqb + h * sqh, t, t_ok, sqt, i_f, rows, ok, R, BK, POLY)  # (C, BK)
            if POLY:
                qf = qf * tl.load(c_ptr + h * (P + 1) + deg).to(tl.float32)
            if HAS_DECAY:
                qf = qf * tl.exp(lam * (offs_c + 1).to(tl.float32))[:, None]
            do = tl.load(do_ptr + ((b * T + t[:, None]) * H + h) * DV + cols[None, :],
                         mask=t_ok[:, None] & col_ok[None, :], other=0.0)
            dh += _mm(tl.trans(qf), do, LOWP, PREC)
    tl.store(dh0_ptr + bhk * F * DV + tile_off, dh, mask=tile_ok)


@triton.jit
def _do_vt(do_ptr, v_head, b, h, t, t_ok, svt, T, H, DV, NV, C: tl.constexpr, BV: tl.constexpr,
           LOWP: tl.constexpr, PREC: tl.constexpr):
    """dA [C, C] = do_t · v_s for one query head, summed over Dv blocks."""
    dA = tl.zeros([C, C], tl.float32)
    for i_v in range(NV):
        cols = i_v * BV + tl.arange(0, BV)
        mask = t_ok[:, None] & (cols < DV)[None, :]
        do = tl.load(do_ptr + ((b * T + t[:, None]) * H + h) * DV + cols[None, :], mask=mask, other=0.0)
        vv = tl.load(v_head + t[:, None] * svt + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dA += _mm(do, tl.trans(vv), LOWP, PREC)
    return dA


@_autotune(TUNE_KEY)
@triton.jit
def _bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, c_ptr, ld_ptr, h_ptr, do_ptr, dq_ptr, dc_ptr,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,
    T, H, Hk, F, DV, R, N, NF, NV,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, P: tl.constexpr,
    POLY: tl.constexpr, HAS_DECAY: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr,
):
    """Grid (feature tiles, or 1 for the polynomial scan, N, B*H). dq = (do hᵀ) ⊙ γ^(t+1) + (dA ⊙ M) k;
    the polynomial scan chains that through the features into dq̃ [B,T,H,r] and also writes
    per-chunk coefficient gradients dc [B,H,N,P+1]."""
    i_f, n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = (i_bh // H).to(tl.int64), i_bh % H
    hk = h // (H // Hk)
    offs_c = tl.arange(0, C)
    t = n * C + offs_c
    t_ok = t < T
    q_head = q_ptr + b * sqb + h * sqh
    k_head = k_ptr + b * skb + hk * skh
    c_head = c_ptr + h * (P + 1)
    h_chunk = h_ptr + ((b * Hk + hk) * N + n) * F * DV
    lam = 0.0
    if HAS_DECAY:
        lam = tl.load(ld_ptr + hk).to(tl.float32)
    dA = _do_vt(do_ptr, v_ptr + b * svb + hk * svh, b, h, t, t_ok, svt, T, H, DV, NV, C, BV, LOWP, PREC)
    dA = dA * _decay_mask(lam, offs_c, HAS_DECAY)  # (C, C)
    if POLY:
        p, dp, s = _scores(q_head, k_head, c_head, t, t_ok, sqt, skt, R, NF, F, C, BK, P, POLY, LOWP, PREC)
        qx = _load_rank(q_head, t, t_ok, sqt, R, BK)
        dq = _mm(dA * dp, _load_rank(k_head, t, t_ok, skt, R, BK), LOWP, PREC)  # (C, BK)
        # dc_i = Σ_{t,s} dA_ts s_ts^i (within the chunk) + Σ unweighted features ⊙ their gradient
        d = tl.arange(0, 4)
        dc = tl.zeros([4], tl.float32)
        power = dA
        for i in tl.static_range(P + 1):
            dc += tl.where(d == i, tl.sum(tl.sum(power, axis=1), axis=0), 0.0)
            power = power * s
        tiles = NF
    else:
        tiles = 1
    for tile_i in range(tiles):
        tile = tile_i + i_f
        rows, ok, deg = _tile_rows(tile, F, R, BK, POLY)
        dfe = tl.zeros([C, BK], tl.float32)
        for i_v in range(NV):
            cols = i_v * BV + tl.arange(0, BV)
            col_ok = cols < DV
            do = tl.load(do_ptr + ((b * T + t[:, None]) * H + h) * DV + cols[None, :],
                         mask=t_ok[:, None] & col_ok[None, :], other=0.0)
            hh = tl.load(h_chunk + rows[:, None] * DV + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
            dfe += _mm(do, tl.trans(hh), LOWP, PREC)
        if HAS_DECAY:
            dfe = dfe * tl.exp(lam * (offs_c + 1).to(tl.float32))[:, None]
        if POLY:
            xi = tl.load(q_head + t * sqt + tl.maximum(tile - 2, 0), mask=t_ok, other=0.0).to(tl.float32)
            fraw = _poly_tile(qx, xi, tile, ok, t_ok, BK)
            dc += tl.where(d == deg, tl.sum(tl.sum(fraw * dfe, axis=1), axis=0), 0.0)
            dq += _poly_tile_bwd(dfe * tl.load(c_head + deg).to(tl.float32), qx, xi, tile, ok, BK)
        else:
            kf = _load_feats(k_head, t, t_ok, skt, tile, rows, ok, R, BK, POLY)
            dfe += _mm(dA, kf, LOWP, PREC)
            tl.store(dq_ptr + ((b * T + t[:, None]) * H + h) * F + rows[None, :], dfe, mask=t_ok[:, None] & ok[None, :])
    if POLY:
        j = tl.arange(0, BK)
        tl.store(dq_ptr + ((b * T + t[:, None]) * H + h) * R + j[None, :], dq, mask=t_ok[:, None] & (j < R)[None, :])
        tl.store(dc_ptr + ((b * H + h) * N + n) * (P + 1) + d, dc, mask=d < P + 1)


@_autotune(TUNE_KEY)
@triton.jit
def _bwd_dk_kernel(
    q_ptr, k_ptr, v_ptr, c_ptr, ld_ptr, dh_ptr, do_ptr, dk_ptr,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,
    T, H, Hk, F, DV, R, N, NF, NV,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, P: tl.constexpr,
    POLY: tl.constexpr, HAS_DECAY: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr,
):
    """Grid (feature tiles, or 1 for the polynomial scan, N, B*Hk).
    dk = (v dhᵀ) ⊙ γ^(L-1-s) + Σ_heads (dA ⊙ M)ᵀ q, chained into dk̃ for the polynomial scan."""
    i_f, n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hk = (i_bh // Hk).to(tl.int64), i_bh % Hk
    G = H // Hk
    offs_c = tl.arange(0, C)
    t = n * C + offs_c
    t_ok = t < T
    k_head = k_ptr + b * skb + hk * skh
    v_head = v_ptr + b * svb + hk * svh
    dh_chunk = dh_ptr + ((b * Hk + hk) * N + n) * F * DV
    lam = 0.0
    to_end = tl.where(t_ok, 1.0, 0.0)
    if HAS_DECAY:
        lam = tl.load(ld_ptr + hk).to(tl.float32)
        L = tl.minimum(T - n * C, C)
        to_end = tl.where(t_ok, tl.exp(lam * (L - 1 - offs_c).to(tl.float32)), 0.0)
    mask_cs = _decay_mask(lam, offs_c, HAS_DECAY)
    if POLY:
        kx = _load_rank(k_head, t, t_ok, skt, R, BK)
        tiles = NF
    else:
        tiles = 1
    dk = tl.zeros([C, BK], tl.float32)
    for tile_i in range(tiles):  # through the state leaving this chunk
        tile = tile_i + i_f
        rows, ok, deg = _tile_rows(tile, F, R, BK, POLY)
        dfe = tl.zeros([C, BK], tl.float32)
        for i_v in range(NV):
            cols = i_v * BV + tl.arange(0, BV)
            col_ok = cols < DV
            vv = tl.load(v_head + t[:, None] * svt + cols[None, :], mask=t_ok[:, None] & col_ok[None, :], other=0.0)
            dhh = tl.load(dh_chunk + rows[:, None] * DV + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
            dfe += _mm(vv.to(tl.float32), tl.trans(dhh), LOWP, PREC)
        dfe = dfe * to_end[:, None]
        if POLY:
            xi = tl.load(k_head + t * skt + tl.maximum(tile - 2, 0), mask=t_ok, other=0.0).to(tl.float32)
            dk += _poly_tile_bwd(dfe, kx, xi, tile, ok, BK)
        else:
            dk += dfe
    rows, ok, deg = _tile_rows(i_f, F, R, BK, POLY)
    for g in range(G):  # within the chunk, from every query head of this kv head
        h = hk * G + g
        q_head = q_ptr + b * sqb + h * sqh
        dA = _do_vt(do_ptr, v_head, b, h, t, t_ok, svt, T, H, DV, NV, C, BV, LOWP, PREC) * mask_cs  # (C, C)
        if POLY:
            c_head = c_ptr + h * (P + 1)
            p, dp, s = _scores(q_head, k_head, c_head, t, t_ok, sqt, skt, R, NF, F, C, BK, P, POLY, LOWP, PREC)
            dk += _mm(tl.trans(dA * dp), _load_rank(q_head, t, t_ok, sqt, R, BK), LOWP, PREC)
        else:
            dk += _mm(tl.trans(dA), _load_feats(q_head, t, t_ok, sqt, i_f, rows, ok, R, BK, POLY), LOWP, PREC)
    width = F
    if POLY:
        rows = tl.arange(0, BK)
        ok = rows < R
        width = R
    tl.store(dk_ptr + ((b * T + t[:, None]) * Hk + hk) * width + rows[None, :], dk, mask=t_ok[:, None] & ok[None, :])


@_autotune(TUNE_KEY)
@triton.jit
def _bwd_dv_kernel(
    q_ptr, k_ptr, c_ptr, ld_ptr, dh_ptr, do_ptr, dv_ptr,
    sqb, sqt, sqh, skb, skt, skh,
    T, H, Hk, F, DV, R, N, NF,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, P: tl.constexpr,
    POLY: tl.constexpr, HAS_DECAY: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr,
):
    """Grid (Dv blocks, N, B*Hk). dv = (φ(k) ⊙ γ^(L-1-s)) dh + Σ_heads (scores ⊙ M)ᵀ do."""
    i_v, n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hk = (i_bh // Hk).to(tl.int64), i_bh % Hk
    G = H // Hk
    offs_c = tl.arange(0, C)
    t = n * C + offs_c
    t_ok = t < T
    cols = i_v * BV + tl.arange(0, BV)
    col_ok = cols < DV
    k_head = k_ptr + b * skb + hk * skh
    dh_chunk = dh_ptr + ((b * Hk + hk) * N + n) * F * DV
    lam = 0.0
    to_end = tl.where(t_ok, 1.0, 0.0)
    if HAS_DECAY:
        lam = tl.load(ld_ptr + hk).to(tl.float32)
        L = tl.minimum(T - n * C, C)
        to_end = tl.where(t_ok, tl.exp(lam * (L - 1 - offs_c).to(tl.float32)), 0.0)
    dv = tl.zeros([C, BV], tl.float32)
    for tile in range(NF):
        rows, ok, deg = _tile_rows(tile, F, R, BK, POLY)
        kf = _load_feats(k_head, t, t_ok, skt, tile, rows, ok, R, BK, POLY) * to_end[:, None]
        dhh = tl.load(dh_chunk + rows[:, None] * DV + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
        dv += _mm(kf, dhh, LOWP, PREC)
    mask_cs = _decay_mask(lam, offs_c, HAS_DECAY)
    for g in range(G):
        h = hk * G + g
        q_head = q_ptr + b * sqb + h * sqh
        p, dp, s = _scores(q_head, k_head, c_ptr + h * (P + 1), t, t_ok, sqt, skt, R, NF, F, C, BK, P, POLY, LOWP, PREC)
        do = tl.load(do_ptr + ((b * T + t[:, None]) * H + h) * DV + cols[None, :],
                     mask=t_ok[:, None] & col_ok[None, :], other=0.0)
        dv += _mm(tl.trans(p * mask_cs), do, LOWP, PREC)
    tl.store(dv_ptr + ((b * T + t[:, None]) * Hk + hk) * DV + cols[None, :], dv, mask=t_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------------
# host side


@dataclass(frozen=True)
class _Plan:
    """Static launch parameters. F = state rows; R = projection rank (polynomial scan, else 0);
    NF = feature tiles of BK rows; P = polynomial degree (0 for plain features)."""

    poly: bool
    F: int
    R: int
    P: int
    C: int
    BK: int
    BV: int
    NF: int


def _pow2_at_least(x: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(x))


def default_block_v(dv: int) -> int:
    """Dv block: fewest padded columns, counting ~48 columns' worth of recomputed scores per block
    (Dv = 65 -> 128, Dv = 129 -> 64)."""
    return min((128, 64, 32, 16), key=lambda bv: (triton.cdiv(dv, bv) * (bv + 48), -bv))


def _check_blocks(chunk_size: int, **blocks: int | None) -> None:
    """The chunk size and the block sizes the caller gave (None: the default, always valid) must be
    powers of two >= 16."""
    sizes = {"chunk_size": chunk_size, **{name: x for name, x in blocks.items() if x is not None}}
    for name, x in sizes.items():
        if not isinstance(x, int) or x < 16 or x & (x - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot needs K >= 16), got {x!r}")


def check_device(device: torch.device) -> None:
    """The Triton kernels run on CUDA tensors, or on CPU tensors when interpreted."""
    device = torch.device(device)
    if INTERPRETED != _LIBRARY_INTERPRETED:
        raise ValueError(
            f"TRITON_INTERPRET changed between importing triton ({int(_LIBRARY_INTERPRETED)}) and importing "
            f"distill_kernels' Triton modules ({int(INTERPRETED)}); set it before Python starts (torch and "
            "distill import triton early), e.g. at the top of conftest.py"
        )
    if device.type == ("cpu" if INTERPRETED else "cuda"):
        return
    if device.type == "cpu":
        raise ValueError(
            "the Triton kernels got CPU tensors but were built for a GPU: set TRITON_INTERPRET=1 before "
            "distill_kernels' Triton modules are first imported, or use DISTILL_BACKEND=torch"
        )
    raise ValueError(f"the Triton kernels cannot run on device {device} (TRITON_INTERPRET={int(INTERPRETED)})")


def _precision(*xs: torch.Tensor) -> tuple[bool, str]:
    """(bf16 operands?, input_precision of fp32 operands). The interpreter gets bf16 dots wrong."""
    if INTERPRETED:
        return False, "ieee"
    lowp = all(x.dtype == torch.bfloat16 for x in xs)
    exact = all(x.dtype == torch.float32 for x in xs) and torch.get_float32_matmul_precision() == "highest"
    return lowp, "ieee" if exact else "tf32"


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _states(q, k, v, log_decay, h0, plan: _Plan, common: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """-> chunk-entry states h [B,Hk,N,F,Dv] fp32 and the final state [B,Hk,F,Dv] fp32."""
    B, T, _, _ = q.shape
    Hk, Dv = k.shape[2], v.shape[3]
    N = triton.cdiv(T, plan.C)
    h = q.new_empty(B, Hk, N, plan.F, Dv, dtype=torch.float32)
    ht = q.new_empty(B, Hk, plan.F, Dv, dtype=torch.float32)
    _fwd_state_kernel[(plan.NF, triton.cdiv(Dv, plan.BV), B * Hk)](
        k, v, ht if log_decay is None else log_decay, ht if h0 is None else h0, h, ht,
        *_strides(k), *_strides(v), T, Hk, plan.F, Dv, plan.R, N, HAS_H0=h0 is not None, **common,
    )
    return h, ht


def _launch_args(q, k, v, log_decay, plan: _Plan) -> dict:
    lowp, prec = _precision(q, k, v)
    return dict(C=plan.C, BK=plan.BK, BV=plan.BV, POLY=plan.poly, HAS_DECAY=log_decay is not None, LOWP=lowp, PREC=prec)


def _forward(q, k, v, coeffs, log_decay, h0, plan: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """-> o [B,T,H,Dv] fp32, final state [B,Hk,F,Dv] fp32."""
    B, T, H, _ = q.shape
    Hk, Dv = k.shape[2], v.shape[3]
    common = _launch_args(q, k, v, log_decay, plan)
    h, ht = _states(q, k, v, log_decay, h0, plan, common)
    o = q.new_empty(B, T, H, Dv, dtype=torch.float32)
    N = h.shape[2]
    _fwd_out_kernel[(triton.cdiv(Dv, plan.BV), N, B * H)](
        q, k, v, ht if coeffs is None else coeffs, ht if log_decay is None else log_decay, h, o,
        *_strides(q), *_strides(k), *_strides(v), T, H, Hk, plan.F, Dv, plan.R, N, plan.NF, P=plan.P, **common,
    )
    return o, ht


def _backward(q, k, v, coeffs, log_decay, h0, do, dht, plan: _Plan):
    """do [B,T,H,Dv] fp32 contiguous, dht [B,Hk,F,Dv] fp32 contiguous or None -> dq, dk (of the
    features, or of the projections for the polynomial scan), dv, dh0 [B,Hk,F,Dv], all fp32, and
    dc [H, P+1] fp32 (None for plain features)."""
    B, T, H, _ = q.shape
    Hk, Dv = k.shape[2], v.shape[3]
    common = _launch_args(q, k, v, log_decay, plan)
    h, ht = _states(q, k, v, log_decay, h0, plan, common)  # recomputed: cheaper than keeping them
    N, NV = h.shape[2], triton.cdiv(Dv, plan.BV)
    ld = ht if log_decay is None else log_decay
    c = ht if coeffs is None else coeffs
    sizes = (T, H, Hk, plan.F, Dv, plan.R, N)
    dh, dh0 = torch.empty_like(h), torch.empty_like(ht)
    _bwd_state_kernel[(plan.NF, NV, B * Hk)](
        q, c, ld, do, ht if dht is None else dht, dh, dh0, *_strides(q), *sizes,
        P=plan.P, HAS_DHT=dht is not None, **common,
    )
    tiles = 1 if plan.poly else plan.NF  # the polynomial gradient sums over all tiles in one program
    dq = torch.empty(q.shape, device=q.device, dtype=torch.float32)
    dc = q.new_empty(B, H, N, plan.P + 1, dtype=torch.float32) if plan.poly else ht
    _bwd_dq_kernel[(tiles, N, B * H)](
        q, k, v, c, ld, h, do, dq, dc, *_strides(q), *_strides(k), *_strides(v), *sizes, plan.NF, NV,
        P=plan.P, **common,
    )
    dk = torch.empty(k.shape, device=k.device, dtype=torch.float32)
    _bwd_dk_kernel[(tiles, N, B * Hk)](
        q, k, v, c, ld, dh, do, dk, *_strides(q), *_strides(k), *_strides(v), *sizes, plan.NF, NV,
        P=plan.P, **common,
    )
    dv = torch.empty(v.shape, device=v.device, dtype=torch.float32)
    _bwd_dv_kernel[(NV, N, B * Hk)](
        q, k, c, ld, dh, do, dv, *_strides(q), *_strides(k), *sizes, plan.NF, P=plan.P, **common,
    )
    return dq, dk, dv, dh0, (dc.sum((0, 2)) if plan.poly else None)


class ChunkScan(torch.autograd.Function):
    """(q, k, v, log_decay fp32 | None, h0 fp32 contiguous | None, coeffs fp32 contiguous | None, plan)
    -> (o [B,T,H,Dv] fp32, final state [B,Hk,F,Dv] fp32)."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, h0, coeffs, plan):
        o, ht = _forward(q, k, v, coeffs, log_decay, h0, plan)
        keep = ctx.needs_input_grad[3]  # o and ht feed the log-decay gradient
        ctx.save_for_backward(q, k, v, log_decay, h0, coeffs, o if keep else None, ht if keep else None)
        ctx.plan = plan
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, log_decay, h0, coeffs, o, ht = ctx.saved_tensors
        do = do.float().contiguous()
        dht = None if dht is None else dht.float().contiguous()
        dq, dk, dv, dh0, dc = _backward(q, k, v, coeffs, log_decay, h0, do, dht, ctx.plan)
        dld = None
        if o is not None:
            B, T, H, _ = q.shape
            Hk = k.shape[2]
            # G_t = (t+1) log γ. e^{G_t} scales all of o_t, e^{-G_s} every use of key s, and
            # e^{G_{T-1}} the final state, so dL/dG_t = do_t·o_t - v_t·dv_t (+ <dS_T, S_T> at T-1).
            dG = (do * o).sum(-1).view(B, T, Hk, H // Hk).sum(-1) - (v.float() * dv).sum(-1)  # (B, T, Hk)
            dld = torch.einsum("bti,t->i", dG, torch.arange(1, T + 1, device=q.device, dtype=torch.float32))
            if dht is not None:
                dld = dld + T * (dht * ht).sum((0, 2, 3))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dld, (dh0 if h0 is not None else None), dc, None


def _empty_result(q, v, Hk: int, F: int, initial_state) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, H, _ = q.shape
    o = q.new_zeros(B, T, H, v.shape[-1], dtype=torch.float32)
    if initial_state is not None:
        return o, initial_state.float()
    return o, q.new_zeros(B, Hk, F, v.shape[-1], dtype=torch.float32)


def chunk_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
    block_f: int | None = None,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B,T,H,F], k [B,T,Hk,F], v [B,T,Hk,Dv], log_decay [Hk] or None, initial_state [B,Hk,F,Dv]
    or None -> o [B,T,H,Dv] fp32, final state [B,Hk,F,Dv] fp32. Differentiable in every tensor.

    ``chunk_size`` (C), ``block_f`` (BK, default min(64, next pow2 of F)) and ``block_v`` (BV,
    default :func:`default_block_v`) are powers of two >= 16. Checks its arguments, then runs
    :func:`chunk_linear_attn_unchecked`."""
    check_scan_args(q, k, v, log_decay, initial_state, unit_stride=True)
    check_device(q.device)
    _check_blocks(chunk_size, block_f=block_f, block_v=block_v)
    return chunk_linear_attn_unchecked(q, k, v, log_decay, initial_state, chunk_size, block_f, block_v)


def chunk_linear_attn_unchecked(q, k, v, log_decay=None, initial_state=None, chunk_size=64, block_f=None, block_v=None):
    """:func:`chunk_linear_attn` for a caller that has already run ``check_scan_args(...,
    unit_stride=True)``, ``check_device`` and the block checks (``distill_kernels`` dispatch)."""
    B, T, H, F = q.shape
    Hk, Dv = k.shape[2], v.shape[3]
    BK, BV = block_f or min(64, _pow2_at_least(F)), block_v or default_block_v(Dv)
    if T == 0:
        return _empty_result(q, v, Hk, F, initial_state)
    plan = _Plan(poly=False, F=F, R=0, P=0, C=chunk_size, BK=BK, BV=BV, NF=triton.cdiv(F, BK))
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    ld = log_decay.float() if log_decay is not None else None
    return ChunkScan.apply(q, k, v, ld, h0, None, plan)


def chunk_poly_attn(
    q_proj: torch.Tensor,
    k_proj: torch.Tensor,
    v: torch.Tensor,
    coeffs: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused polynomial scan: φ(q)·φ(k) = Σ_i c_{h,i} (q̃·k̃)^i with p = coeffs.shape[1] - 1 <= 2.

    q_proj [B,T,H,r], k_proj [B,T,Hk,r], v [B,T,Hk,Dv], coeffs [H,p+1], log_decay [Hk] or None,
    initial_state [B,Hk,F,Dv] or None, F = Σ_{i<=p} C(r+i-1, i) rows laid out as in
    :mod:`distill_kernels.poly` -> o [B,T,H,Dv] fp32, final state [B,Hk,F,Dv] fp32.
    Differentiable in every tensor, coefficients included. Checks its arguments, then runs
    :func:`chunk_poly_attn_unchecked`."""
    degree = check_poly_args(q_proj, k_proj, v, coeffs, log_decay, initial_state, unit_stride=True)
    check_device(q_proj.device)
    if degree > MAX_POLY_DEGREE:
        raise ValueError(f"coeffs must be [H, p+1] with p <= {MAX_POLY_DEGREE} for the fused scan, got degree {degree}")
    _check_blocks(chunk_size, block_v=block_v)
    return chunk_poly_attn_unchecked(q_proj, k_proj, v, coeffs, log_decay, initial_state, chunk_size, block_v)


def chunk_poly_attn_unchecked(q_proj, k_proj, v, coeffs, log_decay=None, initial_state=None, chunk_size=64,
                              block_v=None):
    """:func:`chunk_poly_attn` for a caller that has already run ``check_poly_args(...,
    unit_stride=True)``, ``check_device`` and checked p <= :data:`MAX_POLY_DEGREE` and the blocks."""
    B, T, H, r = q_proj.shape
    Hk, Dv = k_proj.shape[2], v.shape[3]
    degree = coeffs.shape[1] - 1
    F = poly_feature_dim(r, degree)
    if T == 0:
        return _empty_result(q_proj, v, Hk, F, initial_state)
    tiles = 1 + (degree >= 1) + r * (degree >= 2)  # degree 0, degree 1, one per row of degree 2
    BV = block_v or default_block_v(Dv)
    plan = _Plan(poly=True, F=F, R=r, P=degree, C=chunk_size, BK=_pow2_at_least(r), BV=BV, NF=tiles)
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    ld = log_decay.float() if log_decay is not None else None
    return ChunkScan.apply(q_proj, k_proj, v, ld, h0, coeffs.float().contiguous(), plan)
