"""How a linear-RNN sublayer updates and reads its state: a registry of recurrences.

Each recurrence turns feature-mapped queries and keys and the values into outputs and a state
``[B, Hk, F, Dv]`` through an op of ``distill_kernels``. With φ the sublayer's feature map, γ its
optional per-head decay (``decay``), and per token t:

- ``linear`` (default; Katharopoulos et al., 2020): ``S_t = γ S_{t−1} + φ(k_t) v_tᵀ``; the
  readout is normalised by ``z_t = γ z_{t−1} + φ(k_t)`` (a ones column appended to v).
- ``gla`` (gated linear attention, Yang et al., 2024): ``S_t = diag(α_t) S_{t−1} + φ(k_t) v_tᵀ``
  with a data-dependent forget gate per feature, ``log α_t = −c ⊙ σ(W_up W_down v_t + b) + log γ``.
  The gate reads the token's value projection (a linear map of the layer input that needs no
  RoPE undone); ``c`` ≥ 0 starts at 0, so a fresh ``gla`` sublayer equals ``linear``. Normalised
  like ``linear``, with z under the same gates.
- ``liger`` (Liger's gate, Lan et al., 2025): ``gla`` whose gate reuses the teacher's key instead
  of a projection of its own, ``log α_t = c ⊙ log σ(pool_F(ρ(k_t))) + log γ``: ρ takes the norm of
  each pair of channels that RoPE rotates together (so the gate does not move with the position),
  pool_F averages those D/2 norms into F bins, and ``c`` ≥ 0 (per kv head and feature, the only
  new parameters) starts at 0, so a fresh ``liger`` sublayer equals ``linear``.
- ``delta`` (DeltaNet, Schlag et al., 2021; Yang et al., 2024):
  ``S_t = γ (I − β_t k̂_t k̂_tᵀ) S_{t−1} + β_t k̂_t v_tᵀ``, ``k̂ = φ(k)/‖φ(k)‖``, readout
  ``S_tᵀ q̂_t`` (``q̂ = φ(q)/‖φ(q)‖``) with ``β_t = σ(w_β · v_t + b_β)`` per kv head (starts at
  0.5). It overwrites an association instead of adding to it. Its readout is already a value
  estimate; it enters the normalisation weighted by the keys' kernel mass ``φ(q_t)·z_t``, the
  normaliser ``linear`` would have over the same keys and decay (``z_t = α_t z_{t−1} + φ(k_t)``,
  kept as a last column of the state). Alone it is read as ``S_tᵀ q̂_t``; in a softmax-window
  hybrid the evicted keys weigh what they would in ``linear``, and so grow with their number.
- ``gated_delta`` (Gated DeltaNet, Yang et al., 2025): ``delta`` under a data-dependent decay
  ``log α_t = −c σ(w_α · v_t + b_α) + log γ`` per kv head; ``c`` starts at 0, so a fresh
  ``gated_delta`` sublayer equals ``delta``.

Padding tokens never change the state: their value rows (``linear``, ``gla``) and their β are
zero and their gates are open. Custom recurrences register with ``@register_recurrence("name")``
or load from ``"package.module:ClassName"``.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

import distill_kernels as ops

from .errors import DistillError
from .feature_maps import FeatureMap
from .fp32 import KeepFloat32
from .registry import Registry

class Recurrence(KeepFloat32):
    """Base class: owns the recurrence's own parameters (gates, β) and runs the scan.

    Subclasses implement :meth:`scan`. ``head_dim`` D, ``num_kv_heads`` Hk and the feature size F
    of the sublayer's map are given; gate parameters are per kv head. :meth:`constrain_` is
    called after every training step.
    """

    name: ClassVar[str | None] = None

    def __init__(self, head_dim: int, num_kv_heads: int, feature_dim: int):
        super().__init__()
        self.head_dim, self.num_kv_heads, self.feature_dim = head_dim, num_kv_heads, feature_dim

    def scan(self, fm: FeatureMap, q, k, v, valid, log_decay, state, recurrent: bool):
        """q [B,T,H,D], k/v [B,T,Hk,D] (before φ), valid [B,T] bool or None, log_decay [Hk] or None,
        state or None -> (o [B,T,H,D+1] fp32: numerator, then normaliser; state)."""
        raise NotImplementedError

    @torch.no_grad()
    def constrain_(self) -> None:
        """Project the parameters back inside their constraints (after each optimizer step)."""

    @classmethod
    def check(cls, **kwargs: Any) -> None:
        """Raise :class:`DistillError` if ``kwargs`` are not valid options of this recurrence."""


_REGISTRY: Registry = Registry("recurrence", Recurrence, "distill.recurrence.Recurrence", ("head_dim", "num_kv_heads", "feature_dim"))
RECURRENCES: dict[str, type[Recurrence]] = _REGISTRY.classes
register_recurrence = _REGISTRY.register  # ``@register_recurrence("mine")`` makes ``recurrence="mine"`` work


def check_recurrence(name: str, kwargs: dict[str, Any]) -> type[Recurrence]:
    """Resolve ``name`` (registered, or ``"package.module:ClassName"``) and check ``kwargs``."""
    cls = _REGISTRY.resolve(name)
    _REGISTRY.check_options(name, cls, kwargs)
    cls.check(**kwargs)
    return cls


def values_with_ones(v: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """v [B,T,Hk,D] -> [v, 1] [B,T,Hk,D+1] fp32, zero on padding (which then adds nothing)."""
    v1 = torch.cat([v.float(), v.new_ones(*v.shape[:-1], 1, dtype=torch.float32)], dim=-1)
    return v1 if valid is None else v1 * valid[:, :, None, None]


def _key_mass(pq, pk, valid, log_alpha, state, recurrent: bool):
    """The normaliser of ``linear`` over the same stream: φ(q_t)·z_t with z_t = α_t z_{t−1} + φ(k_t)
    (padding adds nothing). pq [B,T,H,F], pk [B,T,Hk,F] (features, not L2-normalised), log_alpha
    [B,T,Hk] or None, state z [B,Hk,F,1] or None -> ([B,T,H,1] fp32, z)."""
    ones = pk.new_ones(*pk.shape[:3], 1) if valid is None else valid[:, :, None, None].expand(*pk.shape[:3], 1).float()
    if log_alpha is None:
        op = ops.recurrent_linear_attn if recurrent else ops.chunk_linear_attn
        return op(pq, pk, ones, initial_state=state)
    if recurrent:
        return ops.recurrent_gla(pq, pk, ones, log_alpha[..., None].expand_as(pk).contiguous(), initial_state=state)
    return ops.chunk_head_gla(pq, pk, ones, log_alpha, initial_state=state)


class _PerHeadLowRank(nn.Module):
    """x [B,T,Hk,D] -> x W_down W_up + b [B,T,Hk,out]: a rank-r projection per kv head."""

    def __init__(self, heads: int, dim_in: int, dim_out: int, rank: int):
        super().__init__()
        self.down = nn.Parameter(torch.randn(heads, dim_in, rank) / dim_in**0.5)  # (Hk, D, r)
        self.up = nn.Parameter(torch.zeros(heads, rank, dim_out))  # (Hk, r, out)
        self.bias = nn.Parameter(torch.zeros(heads, dim_out))  # (Hk, out)

    def forward(self, x):
        h = torch.einsum("bthd,hdr->bthr", x.float(), self.down.float())
        return torch.einsum("bthr,hro->btho", h, self.up.float()) + self.bias.float()


@register_recurrence("linear")
class LinearRecurrence(Recurrence):
    """``S_t = γ S_{t−1} + φ(k_t) v_tᵀ``, normalised (see the module docstring)."""

    def scan(self, fm, q, k, v, valid, log_decay, state, recurrent):
        return fm.scan(q, k, values_with_ones(v, valid), log_decay=log_decay, initial_state=state, recurrent=recurrent)


@register_recurrence("gla")
class GatedLinearRecurrence(Recurrence):
    """Gated linear attention with a low-rank, data-dependent forget gate per feature (see the
    module docstring); ``gate_rank`` is r."""

    float32_tensors = ("gate_strength",)

    def __init__(self, head_dim: int, num_kv_heads: int, feature_dim: int, gate_rank: int = 16):
        super().__init__(head_dim, num_kv_heads, feature_dim)
        self.gate = _PerHeadLowRank(num_kv_heads, head_dim, feature_dim, gate_rank)
        self.gate_strength = nn.Parameter(torch.zeros(num_kv_heads, feature_dim, dtype=torch.float32))  # c ≥ 0

    @classmethod
    def check(cls, gate_rank: int = 16) -> None:
        if not isinstance(gate_rank, int) or isinstance(gate_rank, bool) or gate_rank < 1:
            raise DistillError(f"gla gate_rank must be a positive integer, got {gate_rank!r}")

    def log_gate(self, k, v) -> torch.Tensor:
        """The data-dependent part of log α: [B,T,Hk,F] ≤ 0."""
        return -self.gate_strength.float() * torch.sigmoid(self.gate(v))

    def log_alpha(self, k, v, valid, log_decay) -> torch.Tensor:
        """log α [B,T,Hk,F] ≤ 0: 0 (open) on padding."""
        la = self.log_gate(k, v)  # (B, T, Hk, F)
        if log_decay is not None:
            la = la + log_decay.float()[:, None]
        return la if valid is None else la * valid[:, :, None, None]

    def scan(self, fm, q, k, v, valid, log_decay, state, recurrent):
        op = ops.recurrent_gla if recurrent else ops.chunk_gla
        pq, pk = fm.phi_q(q).float(), fm.phi_k(k).float()  # (B,T,H,F), (B,T,Hk,F)
        return op(pq, pk, values_with_ones(v, valid), self.log_alpha(k, v, valid, log_decay), initial_state=state)

    @torch.no_grad()
    def constrain_(self) -> None:
        self.gate_strength.clamp_(min=0)


@register_recurrence("liger")
class KeyGatedLinearRecurrence(GatedLinearRecurrence):
    """``gla`` with Liger's gate from the teacher's key, no gate projection (see the module docstring)."""

    def __init__(self, head_dim: int, num_kv_heads: int, feature_dim: int):
        Recurrence.__init__(self, head_dim, num_kv_heads, feature_dim)
        self.gate_strength = nn.Parameter(torch.zeros(num_kv_heads, feature_dim, dtype=torch.float32))  # c ≥ 0

    @classmethod
    def check(cls) -> None:
        pass

    def log_gate(self, k, v) -> torch.Tensor:
        half = k.shape[-1] // 2
        k = k.float()
        rho = torch.sqrt(k[..., :half] ** 2 + k[..., half : 2 * half] ** 2)  # (B, T, Hk, D/2): RoPE-invariant
        pooled = F.adaptive_avg_pool1d(rho.flatten(0, 2)[:, None], self.feature_dim).view(*k.shape[:3], -1)  # (B, T, Hk, F)
        return self.gate_strength.float() * F.logsigmoid(pooled)


@register_recurrence("delta")
class DeltaRecurrence(Recurrence):
    """The delta rule over L2-normalised features, β per kv head and token (see the module docstring)."""

    def __init__(self, head_dim: int, num_kv_heads: int, feature_dim: int):
        super().__init__(head_dim, num_kv_heads, feature_dim)
        self.beta_weight = nn.Parameter(torch.zeros(num_kv_heads, head_dim))  # (Hk, D)
        self.beta_bias = nn.Parameter(torch.zeros(num_kv_heads))  # (Hk,), β = 0.5 at the start

    def beta(self, v, valid) -> torch.Tensor:
        """β [B,T,Hk] in (0, 1); 0 on padding."""
        b = torch.sigmoid((v.float() * self.beta_weight.float()).sum(-1) + self.beta_bias.float())
        return b if valid is None else b * valid[..., None]

    def log_alpha(self, v, valid, log_decay) -> torch.Tensor | None:
        """log α [B,T,Hk] ≤ 0, or None (no decay): 0 on padding."""
        if log_decay is None:
            return None
        la = log_decay.float().expand(*v.shape[:2], -1)
        return la if valid is None else la * valid[..., None]

    def scan(self, fm, q, k, v, valid, log_decay, state, recurrent):
        """State [B,Hk,F,D+1]: the delta rule's S, then the key mass z of :func:`_key_mass`."""
        op = ops.recurrent_delta_rule if recurrent else ops.chunk_delta_rule
        pq, pk = fm.phi_q(q).float(), fm.phi_k(k).float()  # (B, T, H, F), (B, T, Hk, F)
        log_alpha = self.log_alpha(v, valid, log_decay)
        s, z = (None, None) if state is None else (state[..., :-1].contiguous(), state[..., -1:].contiguous())
        o, s = op(F.normalize(pq, dim=-1), F.normalize(pk, dim=-1), v.float(), self.beta(v, valid), log_alpha, initial_state=s)
        mass, z = _key_mass(pq, pk, valid, log_alpha, z, recurrent)  # (B, T, H, 1)
        return torch.cat([o * mass, mass], -1), torch.cat([s, z], -1)


@register_recurrence("gated_delta")
class GatedDeltaRecurrence(DeltaRecurrence):
    """The delta rule under a data-dependent decay per kv head and token (see the module docstring)."""

    float32_tensors = ("gate_strength",)

    def __init__(self, head_dim: int, num_kv_heads: int, feature_dim: int):
        super().__init__(head_dim, num_kv_heads, feature_dim)
        self.gate_weight = nn.Parameter(torch.zeros(num_kv_heads, head_dim))  # (Hk, D)
        self.gate_bias = nn.Parameter(torch.zeros(num_kv_heads))  # (Hk,)
        self.gate_strength = nn.Parameter(torch.zeros(num_kv_heads, dtype=torch.float32))  # c ≥ 0

    def log_alpha(self, v, valid, log_decay) -> torch.Tensor:
        u = (v.float() * self.gate_weight.float()).sum(-1) + self.gate_bias.float()  # (B, T, Hk)
        la = -self.gate_strength.float() * torch.sigmoid(u)  # (B, T, Hk)
        if log_decay is not None:
            la = la + log_decay.float()
        return la if valid is None else la * valid[..., None]

    @torch.no_grad()
    def constrain_(self) -> None:
        self.gate_strength.clamp_(min=0)
