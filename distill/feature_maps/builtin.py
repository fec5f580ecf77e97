"""Built-in feature maps. Shapes: x [B, T, h, D] -> [B, T, h, F], h = heads of that side."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import distill_kernels as ops
from distill_kernels import poly_feature_dim, poly_features

from ..errors import DistillError
from ..fp32 import KeepFloat32
from .base import FeatureMap, register_feature_map


@register_feature_map("elu")
class EluFeatureMap(FeatureMap):
    """φ(x) = elu(x) + 1 (Katharopoulos et al., 2020, "Transformers are RNNs")."""

    nonnegative_features = True

    def __init__(self, head_dim: int, num_heads: int, num_kv_heads: int):
        super().__init__(head_dim, num_heads, num_kv_heads)
        self.feature_dim = head_dim

    def phi_q(self, q):
        return F.elu(q) + 1

    phi_k = phi_q


@register_feature_map("relu")
class ReluFeatureMap(FeatureMap):
    """φ(x) = relu(x). φ(q)·φ(k) can be 0; the normaliser's eps keeps it finite."""

    nonnegative_features = True

    positive = False  # only non-negative

    def __init__(self, head_dim: int, num_heads: int, num_kv_heads: int):
        super().__init__(head_dim, num_heads, num_kv_heads)
        self.feature_dim = head_dim

    def phi_q(self, q):
        return F.relu(q)

    phi_k = phi_q


class _PerHeadLinear(nn.Module):
    """x [B, T, h, D] -> x W_h + b_h [B, T, h, F]; initialised to the identity (padded/cut to F)."""

    def __init__(self, heads: int, dim_in: int, dim_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(dim_in, dim_out).repeat(heads, 1, 1))  # (h, D, F)
        self.bias = nn.Parameter(torch.zeros(heads, dim_out))  # (h, F)

    def forward(self, x):
        return torch.einsum("bthd,hdf->bthf", x, self.weight.to(x.dtype)) + self.bias.to(x.dtype)


def _check_feature_dim(feature_dim: int | None) -> None:
    if feature_dim is not None and (not isinstance(feature_dim, int) or feature_dim < 1):
        raise DistillError(f"feature_dim must be a positive integer, got {feature_dim!r}")


@register_feature_map("t2r")
class T2RFeatureMap(FeatureMap):
    """φ(x) = relu(W x + b), learned per head (Kasai et al., 2021, "Finetuning Pretrained
    Transformers into RNNs"). F = ``feature_dim`` (default: head_dim)."""

    nonnegative_features = True

    positive = False  # non-negative

    def __init__(self, head_dim: int, num_heads: int, num_kv_heads: int, feature_dim: int | None = None):
        super().__init__(head_dim, num_heads, num_kv_heads)
        self.feature_dim = feature_dim or head_dim
        self.proj_q = _PerHeadLinear(num_heads, head_dim, self.feature_dim)
        self.proj_k = _PerHeadLinear(num_kv_heads, head_dim, self.feature_dim)

    @classmethod
    def check(cls, head_dim, feature_dim=None):
        _check_feature_dim(feature_dim)

    def phi_q(self, q):
        return F.relu(self.proj_q(q))

    def phi_k(self, k):
        return F.relu(self.proj_k(k))


@register_feature_map("hedgehog")
class HedgehogFeatureMap(FeatureMap):
    """φ(x) = [softmax(W x), softmax(−W x)], learned per head (Zhang et al., 2024, "The Hedgehog &
    the Porcupine"). F = 2 · ``feature_dim`` (default feature_dim: head_dim). Each half sums to 1."""

    nonnegative_features = True

    def __init__(self, head_dim: int, num_heads: int, num_kv_heads: int, feature_dim: int | None = None):
        super().__init__(head_dim, num_heads, num_kv_heads)
        width = feature_dim or head_dim
        self.feature_dim = 2 * width
        self.proj_q = _PerHeadLinear(num_heads, head_dim, width)
        self.proj_k = _PerHeadLinear(num_kv_heads, head_dim, width)

    @classmethod
    def check(cls, head_dim, feature_dim=None):
        _check_feature_dim(feature_dim)

    @staticmethod
    def _both_signs(x):
        return torch.cat([torch.softmax(x, dim=-1), torch.softmax(-x, dim=-1)], dim=-1)

    def phi_q(self, q):
        return self._both_signs(self.proj_q(q))

    def phi_k(self, k):
        return self._both_signs(self.proj_k(k))


class PolynomialKernel(KeepFloat32, FeatureMap):
    """Maps whose kernel is a polynomial of projected dot products,

        q̃ = Pᵀq / d^¼,  k̃ = Pᵀk / d^¼,   φ(q)·φ(k) = Σ_i c_{h,i} (q̃·k̃)^i,

    with the feature layout of :mod:`distill_kernels.poly` (coefficients on the query side).
    Such maps run the polynomial scan, which on Triton never writes the expanded features to
    memory. Subclasses set ``degree``, ``rank``, ``coeffs`` [H, p+1] and ``proj`` ([Hk, D, r], or
    None for the identity). ``coeffs`` stays float32 when the model is cast: bf16 would round a
    positive polynomial's constant term below its bound."""

    degree: int
    rank: int
    proj: torch.Tensor | None
    float32_tensors = ("coeffs",)

    def scan(self, q, k, v, log_decay=None, initial_state=None, recurrent: bool = False):
        op = ops.recurrent_poly_attn if recurrent else ops.chunk_poly_attn
        return op(self.project_q(q), self.project_k(k), v, self.coeffs, log_decay=log_decay, initial_state=initial_state)

    def project_q(self, q):
        """q [B,T,H,D] -> q̃ [B,T,H,r] (each query head uses its kv head's projection)."""
        if self.proj is None:
            return q * self.scale
        proj = self.proj.to(q.dtype).repeat_interleave(self.num_heads // self.num_kv_heads, dim=0)  # (H, D, r)
        return torch.einsum("bthd,hdr->bthr", q, proj) * self.scale

    def project_k(self, k):
        """k [B,T,Hk,D] -> k̃ [B,T,Hk,r]."""
        if self.proj is None:
            return k * self.scale
        return torch.einsum("bthd,hdr->bthr", k, self.proj.to(k.dtype)) * self.scale

    def phi_q(self, q):
        return poly_features(self.project_q(q), self.degree, self.coeffs)

    def phi_k(self, k):
        return poly_features(self.project_k(k), self.degree)


@register_feature_map("taylor")
class TaylorFeatureMap(PolynomialKernel):
    """Second-order Taylor map of exp (Arora et al., 2024, "Based"):
    φ(q)·φ(k) = 1 + s + s²/2 exactly, s = q·k/√d. F = 1 + D + D(D+1)/2. No parameters."""

    def __init__(self, head_dim: int, num_heads: int, num_kv_heads: int):
        super().__init__(head_dim, num_heads, num_kv_heads)
        self.degree, self.rank, self.proj = 2, head_dim, None
        self.feature_dim = poly_feature_dim(head_dim, 2)
        self.scale = head_dim**-0.25
        self.register_buffer("coeffs", torch.tensor([1.0, 1.0, 0.5], dtype=torch.float32).repeat(num_heads, 1))  # (H, 3)


@register_feature_map("poly")
class PolyFeatureMap(PolynomialKernel):
    """Degree-p polynomial kernel with per-query-head coefficients c [H, p+1] and an optional
    learned projection P [Hk, D, r] shared by a kv head and its query heads (see
    :class:`PolynomialKernel`). The degree is even (2 or 4): an odd polynomial is negative
    somewhere, and the normaliser must stay positive. The fit stage enforces p > 0 on the observed
    scores; :meth:`constrain_` keeps p > 0 on all of ℝ after every training step. Starts at
    c_i = 1/i! (the Taylor series of exp) and P = the first r coordinates. F = Σ_i C(r+i−1, i).
    """

    positive = False  # depends on the fitted coefficients

    def __init__(self, head_dim: int, num_heads: int, num_kv_heads: int, degree: int = 2, rank: int | None = None):
        super().__init__(head_dim, num_heads, num_kv_heads)
        self.degree, self.rank = degree, rank or head_dim
        self.feature_dim = poly_feature_dim(self.rank, degree)
        self.scale = head_dim**-0.25
        coeffs = torch.tensor([1 / math.factorial(i) for i in range(degree + 1)], dtype=torch.float32)
        self.coeffs = nn.Parameter(coeffs.repeat(num_heads, 1))  # (H, p+1)
        self.proj = nn.Parameter(torch.eye(head_dim, self.rank).repeat(num_kv_heads, 1, 1)) if rank else None  # (Hk, D, r)

    @classmethod
    def check(cls, head_dim, degree=2, rank=None):
        if degree not in POLY_DEGREES or isinstance(degree, bool):
            raise DistillError(
                f"poly degree must be 2 or 4, got {degree!r}: an odd polynomial is negative somewhere, "
                "which would make the normaliser cross zero"
            )
        if rank is not None and (not isinstance(rank, int) or not 1 <= rank <= head_dim):
            raise DistillError(f"poly rank must be an integer in 1..head_dim={head_dim}, got {rank!r}")

    @torch.no_grad()
    def constrain_(self) -> None:
        """Project the coefficients back to a polynomial that is positive on all of ℝ.

        Degree 2: c_2 ≥ ε and c_0 ≥ c_1²/(4 c_2) + ε. Degree 4, with a = c_3²/(4 c_4) + ε:
        p = x²(c_4 x² + c_3 x + a) + ((c_2 − a) x² + c_1 x + c_0), both parts ≥ 0 once
        c_4 ≥ ε, c_2 ≥ a + ε and c_0 ≥ c_1²/(4 (c_2 − a)) + ε (a sufficient condition). The slack ε
        is relative to the largest coefficient and large enough to survive float32 rounding.
        """
        c = self.coeffs  # (H, p+1), float32
        eps = POSITIVE_SLACK * c.abs().amax(dim=1).clamp(min=1e-6)  # (H,)
        c[:, -1] = torch.maximum(c[:, -1], eps)
        if self.degree == 4:
            a = c[:, 3] ** 2 / (4 * c[:, 4]) + eps
            c[:, 2] = torch.maximum(c[:, 2], a + eps)
            c[:, 0] = torch.maximum(c[:, 0], c[:, 1] ** 2 / (4 * (c[:, 2] - a)) + eps)
        else:
            c[:, 0] = torch.maximum(c[:, 0], c[:, 1] ** 2 / (4 * c[:, 2]) + eps)


POLY_DEGREES = (2, 4)
POSITIVE_SLACK = 1e-3  # relative margin of the positivity projection (float32 resolves ~1e-7)
