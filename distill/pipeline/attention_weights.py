"""Explicit attention weights of a layer's teacher and of its student (the quadratic reference).

For a few queries ``idx`` [n] of a sequence, every key is scored. Layout: weights [B, H, n, T].
The student's weights are those of its first sublayer (the one that reads q, k, v):

    window = 0:  w_ts ∝ γ^{t−s} φ(q_t)·φ(k_s)                                   (s ≤ t)
    window = w:  w_ts ∝ e^{s_ts − m_t}                      for t−w < s ≤ t
                 w_ts ∝ e^{log g_h − m_t} γ^{t−s} φ(q_t)·φ(k_s)   for s ≤ t−w

exactly as :class:`distill.layer.LinearAttention` computes them (see its module docstring).
"""
from __future__ import annotations

import torch

from ..layer import LinearAttention
from ..softmax import NO_SCORE, cap_scores


def query_index(T: int, n: int, start: int = 0, device=None) -> torch.Tensor:
    """``n`` evenly spaced query positions in [start, T−1] (fewer if T is short)."""
    start = min(max(start, 0), T - 1)
    return torch.linspace(start, T - 1, min(n, T - start), device=device).round().long().unique()


def _lags(idx: torch.Tensor, T: int) -> torch.Tensor:
    return idx[:, None] - torch.arange(T, device=idx.device)[None, :]  # (n, T); ≥ 0 is causal


def teacher_scores(layer: LinearAttention, q: torch.Tensor, k: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """q [B,T,H,D], k [B,T,Hk,D] -> scaled (and, as the teacher does, soft-capped) scores
    s [B,H,n,T], −inf where the teacher cannot look."""
    G = layer.num_heads // layer.num_kv_heads
    kh = k.float().repeat_interleave(G, dim=2)  # (B, T, H, D)
    s = cap_scores(torch.einsum("bnhd,bshd->bhns", q[:, idx].float(), kh) * layer.scaling, layer.softcap)
    lag = _lags(idx, q.shape[1])
    visible = lag >= 0
    if layer.teacher_sliding_window:
        visible = visible & (lag < layer.teacher_sliding_window)
    return s.masked_fill(~visible, float("-inf"))


def student_kernel(layer: LinearAttention, q: torch.Tensor, k: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """κ_ts = γ^{t−s} φ(q_t)·φ(k_s) [B,H,n,T] for causal pairs, 0 elsewhere."""
    G = layer.num_heads // layer.num_kv_heads
    fm = layer.rnn.feature_map
    pq = fm.phi_q(q[:, idx]).float()  # (B, n, H, F)
    pk = fm.phi_k(k).float().repeat_interleave(G, dim=2)  # (B, T, H, F)
    kappa = torch.einsum("bnhf,bshf->bhns", pq, pk)
    lag = _lags(idx, q.shape[1])
    log_decay = layer.rnn.log_decay()
    if log_decay is not None:
        rate = log_decay.float().repeat_interleave(G)  # (H,)
        kappa = kappa * torch.exp(rate[None, :, None, None] * lag.clamp(min=0))
    return kappa.masked_fill(lag < 0, 0.0)


def linear_keys(layer: LinearAttention, idx: torch.Tensor, T: int) -> torch.Tensor:
    """Bool [n, T]: keys that the linear part (not the exact window) covers."""
    lag = _lags(idx, T)
    return lag >= layer.window


def student_weights(layer: LinearAttention, q, k, idx, scores=None, kappa=None) -> torch.Tensor:
    """Normalised student attention weights [B,H,n,T]; ``scores`` (from :func:`teacher_scores`) and
    ``kappa`` (from :func:`student_kernel`) are reused when given."""
    if kappa is None:
        kappa = student_kernel(layer, q, k, idx)
    if not layer.window:
        return kappa / (kappa.sum(-1, keepdim=True) + layer.eps)
    if scores is None:
        scores = teacher_scores(layer, q, k, idx)
    lag = _lags(idx, q.shape[1])
    in_window = (lag >= 0) & (lag < layer.window)
    s = scores.masked_fill(~in_window, float("-inf"))
    m = s.amax(-1, keepdim=True).clamp(min=NO_SCORE)  # (B, H, n, 1)
    log_mix = layer.log_mix.float()[None, :, None, None]
    linear = kappa * (lag >= layer.window)  # (B, H, n, T)
    shift = torch.maximum(m, log_mix + torch.log(linear.sum(-1, keepdim=True).clamp(min=1e-30)))  # as the layer's
    num = torch.exp(s - shift) + torch.exp(log_mix - shift) * linear
    return num / (num.sum(-1, keepdim=True) + layer.eps)


def attention_kl(teacher_logits: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Mean over batch and queries of KL(teacher softmax || student weights), per head [H]."""
    logp = torch.log_softmax(teacher_logits, dim=-1)
    p = logp.exp()
    logq = torch.log(student.clamp(min=1e-12))
    kl = (p * (logp - logq)).nan_to_num(0.0).sum(-1)  # (B, H, n); 0·log0 terms are 0
    return kl.mean(dim=(0, 2))


def attention_xent(teacher_logits: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Cross-entropy −Σ p log w, averaged over batch, heads and queries (Hedgehog's loss)."""
    p = torch.softmax(teacher_logits, dim=-1)
    return -(p * torch.log(student.clamp(min=1e-12))).sum(-1).mean()
