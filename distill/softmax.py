"""Exact softmax attention pieces shared by the teacher mode and the student's window.

The student's hybrid output mixes an exact part, Σ e^{s−m}(v, 1) over the keys it sees exactly,
with a linear part under one shared normalisation (see :mod:`distill.layer`).
"""
from __future__ import annotations

import torch
from torch import nn

QUERY_BLOCK = 256  # queries per block in the windowed softmax
NO_SCORE = -1e4  # shift floor for a query that sees no key (padding): keeps e^{s−m} at 0, not NaN


def cap_scores(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Attention-logit soft-capping (Gemma 2): s -> c·tanh(s/c); identity when ``softcap`` is None."""
    return scores if softcap is None else softcap * torch.tanh(scores / softcap)


def softmax_attention(q, k, v, mask, scaling: float, softcap: float | None = None) -> torch.Tensor:
    """Masked softmax attention: q [B,T,H,D], k/v [B,S,Hk,D], mask bool [B|1,1,T,S] (True = visible)
    -> y [B,T,H,D]. SDPA when the scores are not capped; else the plain quadratic form, with the
    softmax in fp32 as the teacher's eager attention does."""
    if softcap is None:
        y = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scaling, enable_gqa=True
        )  # (B, H, T, D)
        return y.transpose(1, 2)
    G = q.shape[2] // k.shape[2]
    kh, vh = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)  # (B, S, H, D)
    scores = cap_scores(torch.einsum("bthd,bshd->bhts", q, kh) * scaling, softcap)  # (B, H, T, S)
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")).float(), dim=-1).to(q.dtype)
    return torch.einsum("bhts,bshd->bthd", weights, vh)


def teacher_mask(T: int, valid: torch.Tensor | None, sliding_window: int | None, device) -> torch.Tensor:
    """Boolean [B|1, 1, T, T]: causal, inside the teacher's sliding window, and not padding.
    Each query always sees itself so that padded rows stay finite."""
    i = torch.arange(T, device=device)
    lag = i[:, None] - i[None, :]
    mask = lag >= 0
    if sliding_window:
        mask = mask & (lag < sliding_window)
    mask = mask[None, None]
    if valid is not None:
        mask = mask & (valid[:, None, None, :] | torch.eye(T, dtype=torch.bool, device=device))
    return mask


def window_softmax(q, k_all, v_all, valid_all, window: int, scaling: float, softcap: float | None = None):
    """Unnormalised softmax over a sliding window.

    q [B,T,H,D]; k_all, v_all [B,w+T,Hk,D]; valid_all [B,w+T]. Query t sees k_all[t+1 : t+w+1]
    (itself and the w−1 keys before it); scores are capped as the teacher caps them (``softcap``).
    Returns num [B,T,H,D], den [B,T,H] and the shift m [B,T,H] = the largest visible score
    (``NO_SCORE`` if none), with num/den = Σ e^{s−m}(v, 1).
    """
    B, T, H, D = q.shape
    Hk = k_all.shape[2]
    if T == 1:  # decoding: the one query sees all w keys; no block loop, no position mask
        qg = q.float().reshape(B, Hk, H // Hk, D)  # (B, Hk, G, D)
        kw, vw = k_all[:, 1:].float(), v_all[:, 1:].float()  # (B, w, Hk, D)
        scores = cap_scores(torch.einsum("bigd,bsid->bigs", qg, kw) * scaling, softcap)  # (B, Hk, G, w)
        scores = scores.masked_fill(~valid_all[:, None, None, 1:], float("-inf"))
        m = scores.amax(dim=-1).clamp(min=NO_SCORE)  # (B, Hk, G)
        e = torch.exp(scores - m[..., None])
        num = torch.einsum("bigs,bsid->bigd", e, vw)  # (B, Hk, G, D)
        return num.reshape(B, 1, H, D), e.sum(-1).reshape(B, 1, H), m.reshape(B, 1, H)
    nums, dens, maxes = [], [], []
    for a in range(0, T, QUERY_BLOCK):
        b = min(T, a + QUERY_BLOCK)
        qb = q[:, a:b].float().reshape(B, b - a, Hk, H // Hk, D)  # (B, n, Hk, G, D)
        kb, vb = k_all[:, a + 1 : b + window].float(), v_all[:, a + 1 : b + window].float()  # (B, n+w-1, Hk, D)
        scores = cap_scores(torch.einsum("btigd,bsid->bigts", qb, kb) * scaling, softcap)  # (B, Hk, G, n, n+w-1)
        rel = torch.arange(kb.shape[1], device=q.device)[None, :] - torch.arange(b - a, device=q.device)[:, None]
        visible = (rel >= 0) & (rel < window)  # (n, n+w-1)
        visible = visible[None, None, None] & valid_all[:, None, None, None, a + 1 : b + window]
        scores = scores.masked_fill(~visible, float("-inf"))
        m = scores.amax(dim=-1).clamp(min=NO_SCORE)  # (B, Hk, G, n)
        e = torch.exp(scores - m[..., None])
        nums.append(torch.einsum("bigts,bsid->btigd", e, vb).reshape(B, b - a, H, D))
        dens.append(e.sum(-1).permute(0, 3, 1, 2).reshape(B, b - a, H))
        maxes.append(m.permute(0, 3, 1, 2).reshape(B, b - a, H))
    return torch.cat(nums, 1), torch.cat(dens, 1), torch.cat(maxes, 1)


def mix_exact_linear(num, den, m, lin_num, lin_den, log_mix, eps: float):
    """The hybrid's one normalisation: exact part num [B,T,H,D], den [B,T,H] under shift m [B,T,H];
    linear part lin_num [B,T,H,D], lin_den [B,T,H] (unshifted) weighted by g_h = exp(log_mix [H]).
    The shift is the larger of m and log(g_h lin_den), so the larger part is 1 and no factor
    overflows. -> y [B,T,H,D] fp32."""
    log_mix = log_mix.float()[None, None, :]  # (1, 1, H)
    shift = torch.maximum(m, log_mix + torch.log(lin_den.clamp(min=1e-30)))  # (B, T, H)
    exact, linear = torch.exp(m - shift), torch.exp(log_mix - shift)  # (B, T, H) each, ≤ 1 and ≤ 1/lin_den
    return (exact[..., None] * num + linear[..., None] * lin_num) / (exact * den + linear * lin_den + eps)[..., None]
