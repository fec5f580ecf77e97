"""One linear-RNN sublayer: feature map + optional decay over the shared ops in ``distill_kernels``.

Normalised causal linear attention (Katharopoulos et al., 2020):

    S_t = γ S_{t-1} + φ(k_t) v_tᵀ,   z_t = γ z_{t-1} + φ(k_t),   y_t = φ(q_t)ᵀS_t / (φ(q_t)ᵀz_t + ε)

S and z are kept as one state ``[B, Hk, F, D+1]``: a ones column appended to v carries z. That
is the ``linear`` recurrence; :mod:`distill.recurrence` holds the others (gated, delta rule),
which use the same feature map and decay. The decay is γ = 1, a fixed per-head schedule, or
learned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .feature_maps import FeatureMap
from .fp32 import KeepFloat32
from .recurrence import LinearRecurrence, Recurrence


@dataclass(frozen=True)
class RNNSpec:
    """What a sublayer is made of: a feature-map class and a recurrence class (resolved and
    checked once, by the caller) with their options, and the decay (``none | fixed | learned``)."""

    feature_map: type[FeatureMap]
    feature_map_kwargs: dict[str, Any] = field(default_factory=dict)
    decay: str = "none"
    recurrence: type[Recurrence] = LinearRecurrence
    recurrence_kwargs: dict[str, Any] = field(default_factory=dict)


def fixed_log_decay(num_heads: int) -> torch.Tensor:
    """Per-head γ spread geometrically from 1 − 1/32 to 1 − 1/512 (RetNet-like), as log γ [h] fp32."""
    gaps = torch.exp(torch.linspace(math.log(1 / 32), math.log(1 / 512), num_heads, dtype=torch.float32))
    return torch.log1p(-gaps)


class LinearRNN(KeepFloat32):
    """φ for queries (``num_heads``) and keys (``num_kv_heads``), and the decay of the state
    (kept in float32 when the model is cast)."""

    float32_tensors = ("fixed_log_decay", "decay_logit")

    def __init__(self, spec: RNNSpec, head_dim: int, num_heads: int, num_kv_heads: int):
        super().__init__()
        self.feature_map = spec.feature_map(
            head_dim=head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads, **spec.feature_map_kwargs
        )
        self.recurrence = spec.recurrence(
            head_dim=head_dim, num_kv_heads=num_kv_heads, feature_dim=self.feature_map.feature_dim, **spec.recurrence_kwargs
        )
        self.decay_mode = spec.decay
        if spec.decay == "fixed":
            self.register_buffer("fixed_log_decay", fixed_log_decay(num_kv_heads))
        elif spec.decay == "learned":
            # γ = sigmoid(logit); starts at the fixed schedule.
            gamma = fixed_log_decay(num_kv_heads).exp()
            self.decay_logit = nn.Parameter(torch.log(gamma) - torch.log1p(-gamma))

    def log_decay(self) -> torch.Tensor | None:
        """log γ per kv head [Hk] fp32, or None."""
        if self.decay_mode == "fixed":
            return self.fixed_log_decay
        if self.decay_mode == "learned":
            return nn.functional.logsigmoid(self.decay_logit.float())
        return None

    def scan(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        valid: torch.Tensor | None,
        state: torch.Tensor | None,
        recurrent: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B,T,H,D], k/v [B,T,Hk,D] (before φ), valid [B,T] bool (False = padding, which never
        enters the state) -> o [B,T,H,D+1] fp32 (numerator, then normaliser), state [B,Hk,F,·]."""
        return self.recurrence.scan(self.feature_map, q, k, v, valid, self.log_decay(), state, recurrent)
