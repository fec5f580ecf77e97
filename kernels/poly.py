"""Polynomial-kernel linear attention in plain PyTorch: the reference for the fused Triton scan.

With projected queries/keys q̃ [B,T,H,r], k̃ [B,T,Hk,r] and per-query-head coefficients
c [H, p+1], the kernel is  φ(q)·φ(k) = Σ_i c_{h,i} (q̃·k̃)^i  (Based, Arora et al. 2024, for the
Taylor case c = 1, 1, 1/2). The expanded features, and hence the state rows, are laid out as

    F = Σ_{i=0..p} C(r+i-1, i) rows:  [1 | x_1..x_r | w_m x_i x_j for i <= j | ...]

degree by degree; within degree i the monomials run in ``itertools.combinations_with_replacement``
order (for degree 2 that is ``torch.triu_indices(r, r)`` row-major) with weights
w = sqrt(i! / Π multiplicity!). Coefficients scale only the query side, so the state
``[B, Hk, F, Dv]`` holds unweighted key features and is shared by every query head of a kv head.
"""
from __future__ import annotations

import itertools
import math
from functools import lru_cache

import torch

from .chunk import chunk_linear_attn
from .validate import check_scan_args


def poly_feature_dim(rank: int, degree: int) -> int:
    """F = Σ_{i<=degree} C(rank+i-1, i)."""
    return sum(math.comb(rank + i - 1, i) for i in range(degree + 1))


@lru_cache(maxsize=None)
def _monomials(rank: int, degree: int) -> tuple[tuple[tuple[int, ...], ...], tuple[float, ...]]:
    combos = tuple(itertools.combinations_with_replacement(range(rank), degree))
    weights = tuple(
        math.sqrt(math.factorial(degree) / math.prod(math.factorial(c.count(i)) for i in set(c))) for c in combos
    )
    return combos, weights


def poly_features(x: torch.Tensor, degree: int, coeffs: torch.Tensor | None = None) -> torch.Tensor:
    """x [B,T,H,r] -> features [B,T,H,F] (fp32, or fp64 for fp64 x) in the layout above;
    coeffs [H, degree+1] scales degree block i of head h by c_{h,i} (query side) or is None (key side)."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    blocks = [x.new_ones(*x.shape[:-1], 1), x]
    for i in range(2, degree + 1):
        combos, weights = _monomials(x.shape[-1], i)
        index = torch.tensor(combos, device=x.device)  # (M, i)
        blocks.append(x[..., index].prod(-1) * x.new_tensor(weights))  # (B, T, H, M)
    blocks = blocks[: degree + 1]
    if coeffs is not None:
        c = coeffs.to(x.dtype)  # (H, p+1)
        blocks = [b * c[:, i, None] for i, b in enumerate(blocks)]
    return torch.cat(blocks, dim=-1)


def check_poly_args(q_proj, k_proj, v, coeffs, log_decay=None, initial_state=None, unit_stride=False) -> int:
    """Validate the polynomial-scan arguments; returns the degree p."""
    if not isinstance(coeffs, torch.Tensor) or coeffs.dim() != 2 or coeffs.shape[1] < 1:
        shape = tuple(coeffs.shape) if isinstance(coeffs, torch.Tensor) else type(coeffs).__name__
        raise ValueError(f"coeffs must be [H, p+1] (per query head, degree 0 first), got {shape}")
    degree = coeffs.shape[1] - 1
    r = q_proj.shape[-1] if isinstance(q_proj, torch.Tensor) and q_proj.dim() == 4 else None  # None: fails below
    state_dim = None if r is None else poly_feature_dim(r, degree)
    check_scan_args(
        q_proj, k_proj, v, log_decay, initial_state,
        state_dim=state_dim, unit_stride=unit_stride, names=("q_proj", "k_proj"),
    )
    if coeffs.shape[0] != q_proj.shape[2]:
        raise ValueError(f"coeffs must be [H, p+1] = [{q_proj.shape[2]}, p+1], got {tuple(coeffs.shape)}")
    if coeffs.device != q_proj.device:
        raise ValueError(f"coeffs must be on q_proj's device {q_proj.device}, got {coeffs.device}")
    return degree


def chunk_poly_attn(
    q_proj: torch.Tensor,
    k_proj: torch.Tensor,
    v: torch.Tensor,
    coeffs: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    scan=chunk_linear_attn,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialise φ(q̃), φ(k̃) and run ``scan`` (the torch chunked scan by default).

    q_proj [B,T,H,r], k_proj [B,T,Hk,r], v [B,T,Hk,Dv], coeffs [H,p+1], log_decay [Hk],
    initial_state [B,Hk,F,Dv] -> o [B,T,H,Dv] fp32, final state [B,Hk,F,Dv] fp32.
    Trusts its caller, like the other references: :func:`check_poly_args` is the check."""
    degree = coeffs.shape[1] - 1
    phi_q = poly_features(q_proj, degree, coeffs)  # (B, T, H, F)
    phi_k = poly_features(k_proj, degree)  # (B, T, Hk, F)
    return scan(phi_q, phi_k, v, log_decay=log_decay, initial_state=initial_state)
