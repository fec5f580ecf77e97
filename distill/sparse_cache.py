"""A constant-size sparse global cache for a hybrid layer (LoLA, McDermott et al., 2025).

With ``sparse_cache: M`` (window w > 0, the ``linear`` recurrence, no decay), each kv head keeps
up to M keys that have left the softmax window exact: the ones that the linear state recalls worst.
Every other old key is in the linear part. Per kv head, with φ the key feature map:

    score_s = ‖v_s − Σ_{j<s} φ(k_j)·φ(k_s) v_j / (Σ_{j<s} φ(k_j)·φ(k_s) + ε)‖²

is how badly the state of all keys before s recalls v_s, computed once, when s arrives (−∞ on
padding). Key s is exact for query t ≥ s when t − s < w, or when s is among the M best keys of
those that have left the window ({j ≤ t − w}, ordered by score, then by position). A key that
drops out of that top M never comes back (the set only grows), so it enters the linear state once,
at f(s) = w + max(s, p_M(s)), where p_M(s) is the position of the M-th key that beats s. Query t:

    E_t = {s ≤ t : f(s) > t}    (the window and the sparse cache; at most w + M keys)
    y_t = (Σ_{s∈E_t} e^{σ_ts − m_t}(v_s, 1) + e^{log g_h − m_t} Σ_{s≤t, s∉E_t} φ(q_t)·φ(k_s)(v_s, 1))_v
          / (the same, ones column)

with σ_ts the teacher's (capped) scaled score and the shift m_t as in the plain hybrid. With M = 0
this is the plain hybrid (f(s) = s + w); with M ≥ the sequence length every key is exact and the
layer is the teacher's softmax attention. The linear part is read as φ(q_t)ᵀS_t − Σ_{s∈E_t}
φ(q_t)·φ(k_s)(v_s, 1), where S_t sums every key up to t: that is the state the cache keeps, with the
sparse keys, the window and their scores. Training never runs this path (the cache is training-free,
as in LoLA); it is switched on for evaluation, saving and generation.
"""
from __future__ import annotations

import torch

import distill_kernels as ops

from .recurrence import values_with_ones
from .softmax import NO_SCORE, QUERY_BLOCK, cap_scores, mix_exact_linear

FAR = 2**40  # "never": the eviction time of a key that fewer than M keys beat


def recall_scores(fm, k, v1, state, recurrent: bool, eps: float) -> torch.Tensor:
    """How badly the state of all earlier keys recalls each value: k [B,T,Hk,D], v1 [B,T,Hk,D+1]
    (values and a ones column, zero on padding), state [B,Hk,F,D+1] or None (keys before these)
    -> score [B,T,Hk] fp32. Key s reads the state of keys < s (an exclusive scan: the keys are
    shifted by one step, so s never reads itself)."""
    phi = fm.phi_k(k)  # (B, T, Hk, F)
    shifted_phi = torch.cat([torch.zeros_like(phi[:, :1]), phi[:, :-1]], 1)
    shifted_v1 = torch.cat([torch.zeros_like(v1[:, :1]), v1[:, :-1]], 1)
    op = ops.recurrent_linear_attn if recurrent else ops.chunk_linear_attn
    read, _ = op(phi, shifted_phi, shifted_v1, initial_state=state)  # (B, T, Hk, D+1)
    recalled = read[..., :-1] / (read[..., -1:] + eps)
    return (v1[..., :-1] - recalled).pow(2).sum(-1)


def eviction_times(score: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, window: int, keep: int) -> torch.Tensor:
    """f(s) = w + max(s, p_M(s)) (module docstring): score/valid [B,L,Hk], pos [L] ascending ->
    f [B,L,Hk] int64. j beats s when valid_j and (score_j, pos_j) > (score_s, pos_s)."""
    B, L, Hk = score.shape
    # rank 0 beats every other key: the highest score, then the latest position (a stable sort of
    # the keys in reverse order); a padded key gets rank L and beats nobody.
    order = L - 1 - torch.sort(score.permute(0, 2, 1).flip(-1), dim=-1, descending=True, stable=True).indices  # (B, Hk, L)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(L, device=score.device).expand_as(order))
    rank = rank.masked_fill(~valid.permute(0, 2, 1), L)  # (B, Hk, L)
    step = max(1, min(QUERY_BLOCK, 2**24 // max(1, B * Hk * L)))
    times = []
    for a in range(0, L, step):
        beats = rank[..., None, :] < rank[..., a : a + step, None]  # (B, Hk, n, L)
        # the first position at which M keys have beaten s: the count of positions before it
        first = (beats.cumsum(-1, dtype=torch.int32) < keep).sum(-1)  # (B, Hk, n); L = never
        p = torch.where(first < L, pos[first.clamp(max=L - 1)], FAR)
        times.append(window + torch.maximum(pos[a : a + step], p))
    return torch.cat(times, -1).permute(0, 2, 1)


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B,L,Hk,...], idx [B,K,Hk] -> x at those rows [B,K,Hk,...]."""
    idx = idx.reshape(*idx.shape, *([1] * (x.dim() - 3))).expand(*idx.shape, *x.shape[3:])
    return torch.gather(x, 1, idx)


def _first(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Indices [B,n,Hk] of the rows of mask [B,L,Hk] that are True, in order, then False ones."""
    return torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :n]


def _exact_and_overlap(layer, q, phi_q, kP, vP, phi_kP, posP, f, okP):
    """For each query t (local position 0..T−1) the exact part over E_t and what E_t adds to the
    plain linear readout: -> num [B,T,H,D], den [B,T,H], m [B,T,H], ov_num [B,T,H,D], ov_den [B,T,H]."""
    B, T, H, D = q.shape
    L, Hk = kP.shape[1], kP.shape[2]
    G = H // Hk
    v1P = values_with_ones(vP, None)  # (B, L, Hk, D+1): den rides along (padded keys are masked below)
    f = f.masked_fill(~okP, -1)  # a padded key is exact for no query
    parts = []
    for a in range(0, T, QUERY_BLOCK):
        b = min(T, a + QUERY_BLOCK)
        n = b - a
        cand = (posP[None, :, None] <= b - 1) & (f > a)  # (B, L, Hk): exact for some query here
        K = min(L, layer.sparse_cache + layer.window + n)  # no query block sees more keys than this
        if K < L:  # a prompt: trim the gather to this block's candidates (early blocks have few)
            K = max(1, min(K, int(cand.sum(1).max())))
        if K == L:  # decoding, short inputs: every key is a candidate, nothing to select
            k_u, v_u, phi_u = kP, v1P, phi_kP
            pos_u, f_u = posP[None, :, None].expand_as(f), f
        else:
            idx = _first(cand, K)  # (B, K, Hk)
            k_u, v_u, phi_u = _gather(kP, idx), _gather(v1P, idx), _gather(phi_kP, idx)
            pos_u, f_u = posP[idx], torch.gather(f, 1, idx)  # (B, K, Hk) each
        t = torch.arange(a, b, device=q.device)[:, None]  # (n, 1)
        pos_u, f_u = pos_u.permute(0, 2, 1)[:, :, None, None, :], f_u.permute(0, 2, 1)[:, :, None, None, :]  # (B, Hk, 1, 1, K)
        hidden = (pos_u > t) | (f_u <= t)  # (B, Hk, 1, n, K): not in E_t
        qb = q[:, a:b].float().reshape(B, n, Hk, G, D) * layer.scaling
        scores = cap_scores(torch.einsum("btigd,bsid->bigts", qb, k_u.float()), layer.softcap)  # (B, Hk, G, n, K)
        scores.masked_fill_(hidden, float("-inf"))
        m = scores.amax(-1).clamp(min=NO_SCORE)  # (B, Hk, G, n)
        e = scores.sub_(m[..., None]).exp_()  # in place: e^{s−m}, 0 where hidden
        kern = torch.einsum("btigf,bsif->bigts", phi_q[:, a:b].float().reshape(B, n, Hk, G, -1), phi_u.float())
        kern.masked_fill_(hidden, 0.0)
        exact = torch.einsum("bigts,bsid->btigd", e, v_u).reshape(B, n, H, D + 1)  # (num, den)
        overlap = torch.einsum("bigts,bsid->btigd", kern, v_u).reshape(B, n, H, D + 1)
        m = m.permute(0, 3, 1, 2).reshape(B, n, H)
        parts.append((exact[..., :D], exact[..., D], m, overlap[..., :D], overlap[..., D]))
    return [torch.cat(p, 1) for p in zip(*parts)]


def _empty_slots(k, v, n: int, unrotates: bool):
    """n empty sparse-cache slots per kv head for k/v [B,T,Hk,D]: keys, values [B,n,Hk,D], scores
    (−inf) and valid flags (False) [B,n,Hk], and the keys as the feature maps read them when those
    differ (``unrotates``)."""
    B, _, Hk, D = k.shape
    slots = (
        k.new_zeros(B, n, Hk, D),
        v.new_zeros(B, n, Hk, D),
        torch.full((B, n, Hk), float("-inf"), device=k.device),
        torch.zeros(B, n, Hk, dtype=torch.bool, device=k.device),
    )
    return slots + ((k.new_zeros(B, n, Hk, D),) if unrotates else ())


def sparse_hybrid(layer, q, k, v, valid, layer_cache, state, recurrent: bool, qf=None, kf=None):
    """The hybrid with a sparse global cache (module docstring). q [B,T,H,D], k/v [B,T,Hk,D],
    valid [B,T] or None; qf/kf: q and k as the feature maps read them (default q and k; see
    ``LinearAttention.feature_inputs``); ``layer_cache`` holds (after an earlier call) the sparse
    keys and the window (``sparse``, ``recent``), ``state`` the sum of every key so far
    [B,Hk,F,D+1]. -> y [B,T,H,D] fp32, state, recent (k, v [B,w,Hk,D], valid [B,w], score
    [B,w,Hk]), sparse (k, v [B,M,Hk,D], score, valid [B,M,Hk]); when the feature maps read other
    keys (``layer.unrotates``), recent and sparse end with those keys [B,w|M,Hk,D]."""
    B, T, H, D = q.shape
    Hk, w, M = layer.num_kv_heads, layer.window, layer.sparse_cache
    unrotates = layer.unrotates
    qf, kf = (q if qf is None else qf), (k if kf is None else kf)
    fm = layer.rnn.feature_map
    dev = q.device
    cur = valid if valid is not None else torch.ones(B, T, dtype=torch.bool, device=dev)
    if layer_cache is not None and layer_cache.sparse is not None:
        sk, sv, s_score, s_ok, *skf = layer_cache.sparse
        rk, rv, r_valid, r_score, *rkf = layer_cache.recent
    else:  # a fresh input: a prompt needs no empty sparse slots in front, a single token needs M
        sk, sv, s_score, s_ok, *skf = _empty_slots(k, v, M if T == 1 else 0, unrotates)
        rk, rv = k.new_zeros(B, w, Hk, D), v.new_zeros(B, w, Hk, D)
        rkf = [torch.zeros_like(rk)] if unrotates else []
        r_valid = torch.zeros(B, w, dtype=torch.bool, device=dev)
        r_score = q.new_full((B, w, Hk), float("-inf"), dtype=torch.float32)
    v1 = values_with_ones(v, valid)  # (B, T, Hk, D+1), zero on padding
    score = recall_scores(fm, kf, v1, state, recurrent, layer.eps).masked_fill(~cur[:, :, None], float("-inf"))
    o_all, state = layer.rnn.scan(qf, kf, v, valid, state, recurrent)  # (B, T, H, D+1): every key up to t
    phi_q = fm.phi_q(qf)
    if T == 1:  # decoding: the key leaving the window joins the cache, which drops its worst
        cand = (
            torch.cat([sk, rk[:, :1]], 1),
            torch.cat([sv, rv[:, :1]], 1),
            torch.cat([s_score, r_score[:, :1]], 1),
            torch.cat([s_ok, r_valid[:, :1, None].expand(B, 1, Hk)], 1),  # (B, M+1, Hk)
        ) + ((torch.cat([skf[0], rkf[0][:, :1]], 1),) if unrotates else ())
        drop = cand[2].argmin(1)  # (B, Hk): −inf (an empty slot) first, then the lowest score, then the oldest
        before = torch.arange(M, device=dev)[None, :, None] < drop[:, None, :]  # (B, M, Hk): slots before the dropped one
        sparse = tuple(
            torch.where(before.reshape(*before.shape, *([1] * (x.dim() - 3))), x[:, :M], x[:, 1:]) for x in cand
        )  # the dropped slot is closed up, so the slots stay in position order
        kE, vE = torch.cat([sparse[0], rk[:, 1:], k], 1), torch.cat([sparse[1], rv[:, 1:], v], 1)  # (B, M+w, Hk, D)
        kfE = torch.cat([sparse[4], rkf[0][:, 1:], kf], 1) if unrotates else kE
        okE = torch.cat([sparse[3], r_valid[:, 1:, None].expand(B, w - 1, Hk), cur[..., None].expand(B, 1, Hk)], 1)
        posE = torch.arange(1 - M - w, 1, device=dev)
        fE = torch.full(okE.shape, FAR, dtype=torch.long, device=dev)  # all exact for this query
        parts = _exact_and_overlap(layer, q, phi_q, kE, vE, fm.phi_k(kfE), posE, fE, okE)
        recent = (kE[:, -w:], vE[:, -w:], torch.cat([r_valid[:, 1:], cur], 1), torch.cat([r_score[:, 1:], score], 1))
        recent += (kfE[:, -w:],) if unrotates else ()
    else:
        # All keys that may still be exact, in position order: sparse (positions < −w), window, new.
        kP, vP = torch.cat([sk, rk, k], 1), torch.cat([sv, rv, v], 1)  # (B, L, Hk, D)
        kfP = torch.cat([skf[0], rkf[0], kf], 1) if unrotates else kP
        okP = torch.cat([s_ok, r_valid[..., None].expand(B, w, Hk), cur[..., None].expand(B, T, Hk)], 1)  # (B, L, Hk)
        scoreP = torch.cat([s_score, r_score, score], 1)
        posP = torch.arange(-sk.shape[1] - w, T, device=dev)  # (L,)
        f = eviction_times(scoreP, posP, okP, w, M)  # (B, L, Hk)
        parts = _exact_and_overlap(layer, q, phi_q, kP, vP, fm.phi_k(kfP), posP, f, okP)
        kept = okP & (posP[None, :, None] <= T - 1 - w) & (f > T - 1)  # (B, L, Hk): at most M per row and head
        idx = _first(kept, min(M, kept.shape[1]))
        kept_g = torch.gather(kept, 1, idx)
        sparse = (_gather(kP, idx), _gather(vP, idx), torch.gather(scoreP, 1, idx).masked_fill(~kept_g, float("-inf")), kept_g)
        sparse += (_gather(kfP, idx),) if unrotates else ()
        sparse = tuple(torch.cat(pair, 1) for pair in zip(sparse, _empty_slots(k, v, M - idx.shape[1], unrotates)))  # M slots
        recent = (kP[:, -w:], vP[:, -w:], torch.cat([r_valid, cur], 1)[:, -w:], scoreP[:, -w:])
        recent += (kfP[:, -w:],) if unrotates else ()
    num, den, m, ov_num, ov_den = parts
    lin_num, lin_den = o_all[..., :-1] - ov_num, (o_all[..., -1] - ov_den).clamp(min=0)
    y = mix_exact_linear(num, den, m, lin_num, lin_den, layer.log_mix, layer.eps)
    return y, state, recent, sparse
