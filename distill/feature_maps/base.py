"""Feature-map base class and registry.

A feature map φ is applied per head to queries and keys so that φ(q)·φ(k) stands in for the
softmax kernel exp(q·k/√d). Queries have ``num_heads`` heads, keys ``num_kv_heads`` (GQA).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

import distill_kernels as ops

from ..registry import Registry

class FeatureMap(nn.Module):
    """Base class. Subclasses set ``self.feature_dim`` and implement :meth:`phi_q` / :meth:`phi_k`.

    phi_q: [B, T, H, D] -> [B, T, H, F];  phi_k: [B, T, Hk, D] -> [B, T, Hk, F].
    ``positive`` promises φ(q)·φ(k) > 0 for all inputs (a safe normaliser);
    ``nonnegative_features`` promises every feature is ≥ 0. A map owns what is
    particular to it: :meth:`scan` (which linear-attention op runs it) and :meth:`constrain_`
    (what training must keep true after each optimizer step). ``name`` is the registered name.
    """

    positive: ClassVar[bool] = True
    nonnegative_features: ClassVar[bool] = False
    name: ClassVar[str | None] = None
    feature_dim: int

    def __init__(self, head_dim: int, num_heads: int, num_kv_heads: int):
        super().__init__()
        self.head_dim, self.num_heads, self.num_kv_heads = head_dim, num_heads, num_kv_heads

    @classmethod
    def check(cls, head_dim: int, **kwargs: Any) -> None:
        """Raise :class:`DistillError` if this map with ``kwargs`` cannot serve ``head_dim``."""

    def phi_q(self, q: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def phi_k(self, k: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def scan(self, q, k, v, log_decay=None, initial_state=None, recurrent: bool = False):
        """Causal linear attention with this map: q [B,T,H,D], k [B,T,Hk,D] (before φ), v [B,T,Hk,Dv],
        log_decay [Hk] -> (o [B,T,H,Dv] fp32, state [B,Hk,F,Dv] fp32); ``recurrent`` steps token by
        token (decoding), else the chunked form (training, prefill)."""
        op = ops.recurrent_linear_attn if recurrent else ops.chunk_linear_attn
        return op(self.phi_q(q), self.phi_k(k), v, log_decay=log_decay, initial_state=initial_state)

    @torch.no_grad()
    def constrain_(self) -> None:
        """Project the parameters back inside the map's constraints (after each optimizer step)."""


_REGISTRY: Registry = Registry("feature map", FeatureMap, "distill.feature_maps.FeatureMap", ("head_dim", "num_heads", "num_kv_heads"))
FEATURE_MAPS: dict[str, type[FeatureMap]] = _REGISTRY.classes
register_feature_map = _REGISTRY.register  # ``@register_feature_map("mine")`` makes ``feature_map="mine"`` work
resolve_feature_map = _REGISTRY.resolve  # a registered name, or ``"package.module:ClassName"``


def check_feature_map(name: str, kwargs: dict[str, Any], head_dim: int) -> type[FeatureMap]:
    """Resolve ``name`` and check that the map takes ``kwargs`` and can serve ``head_dim``; returns
    the class. The one place a feature-map choice is validated (conversion calls it once)."""
    cls = resolve_feature_map(name)
    _REGISTRY.check_options(name, cls, kwargs)
    cls.check(head_dim, **kwargs)
    return cls


def build_feature_map(name: str, kwargs: dict[str, Any], head_dim: int, num_heads: int, num_kv_heads: int) -> FeatureMap:
    """A checked feature map for one layer (tests and benchmarks; conversion checks once, then builds)."""
    cls = check_feature_map(name, kwargs, head_dim)
    return cls(head_dim=head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads, **kwargs)
