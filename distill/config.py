"""Conversion config: a dataclass that round-trips through YAML and ``key=value`` overrides."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import DistillError

DECAYS = ("none", "fixed", "learned")
SLIDING_LAYERS = ("convert", "keep")
DTYPES = ("float32", "bfloat16", "float16")  # weight dtypes a run or an eval may use


@dataclass
class ConvertConfig:
    """How each softmax attention layer is replaced.

    feature_map: registered name (``elu``, ``relu``, ``t2r``, ``hedgehog``, ``taylor``, ``poly``)
        or ``"package.module:ClassName"``.
    feature_map_kwargs: options passed to the feature map (e.g. ``{"feature_dim": 64}``,
        ``{"degree": 2, "rank": 16}``).
    depth: linear-RNN sublayers stacked per attention layer (>= 1).
    window: exact softmax over the last ``window`` tokens plus linear attention over older
        ones (LoLCATs-style hybrid); 0 = pure linear attention.
    decay: per-head state decay, ``none | fixed | learned``.
    recurrence: how each sublayer updates its state: ``linear`` (default), ``gla``, ``delta``,
        ``gated_delta``, a name registered with ``@register_recurrence``, or
        ``"package.module:ClassName"`` (see :mod:`distill.recurrence`).
    recurrence_kwargs: options of the recurrence (e.g. ``{gate_rank: 16}`` for gla).
    keep_softmax_layers: layer indices that keep the teacher's softmax attention.
    sliding_layers: what happens to the teacher's own sliding-window layers (Mistral's
        ``sliding_window``, the ``sliding_attention`` layers of Qwen2, Gemma 2/3, SmolLM3):
        ``convert`` (default, as every other layer) or ``keep`` (they keep their softmax
        attention, whose KV cache is already bounded by the window, like ``keep_softmax_layers``).
    sparse_cache: a constant-size sparse global cache (LoLA): per kv head, up to this many keys
        that have left the window stay exact, the ones the linear state recalls worst
        (:mod:`distill.sparse_cache`); 0 = off. Needs ``window`` > 0, the ``linear`` recurrence
        and no decay. Training-free: conversion trains without it and switches it on at the end.
    linear_rope: whether the feature maps read q and k after RoPE (true, as LoLCATs does) or
        before it (false): the linear part then sees no positions, so the student depends on
        relative positions only, as its teacher does, past its training length too (the window
        and sparse cache stay exact under RoPE). The cache then also keeps its window and sparse
        keys as the feature maps read them.
    eps: added to the normaliser.
    """

    feature_map: str = "hedgehog"
    feature_map_kwargs: dict[str, Any] = field(default_factory=dict)
    depth: int = 1
    window: int = 0
    decay: str = "none"
    recurrence: str = "linear"
    recurrence_kwargs: dict[str, Any] = field(default_factory=dict)
    keep_softmax_layers: list[int] = field(default_factory=list)
    eps: float = 1e-6
    sliding_layers: str = "convert"
    sparse_cache: int = 0
    linear_rope: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.feature_map, str) or not self.feature_map:
            raise DistillError("feature_map must be a registered name or 'package.module:Class'")
        if not isinstance(self.feature_map_kwargs, dict):
            raise DistillError("feature_map_kwargs must be a mapping, e.g. {feature_dim: 64}")
        if not isinstance(self.depth, int) or self.depth < 1:
            raise DistillError(f"depth must be an integer >= 1, got {self.depth!r}")
        if not isinstance(self.window, int) or self.window < 0:
            raise DistillError(f"window must be an integer >= 0, got {self.window!r}")
        if not isinstance(self.recurrence, str) or not self.recurrence:
            raise DistillError("recurrence must be a registered name (linear, gla, liger, delta, gated_delta) or 'package.module:Class'")
        if not isinstance(self.recurrence_kwargs, dict):
            raise DistillError("recurrence_kwargs must be a mapping, e.g. {gate_rank: 16}")
        if self.decay not in DECAYS:
            raise DistillError(f"decay must be one of {', '.join(DECAYS)}, got {self.decay!r}")
        if self.sliding_layers not in SLIDING_LAYERS:
            raise DistillError(f"sliding_layers must be one of {', '.join(SLIDING_LAYERS)}, got {self.sliding_layers!r}")
        if not isinstance(self.sparse_cache, int) or isinstance(self.sparse_cache, bool) or self.sparse_cache < 0:
            raise DistillError(f"sparse_cache must be an integer >= 0 (keys per kv head; 0 = off), got {self.sparse_cache!r}")
        if self.sparse_cache and (not self.window or self.recurrence != "linear" or self.decay != "none"):
            raise DistillError(
                "sparse_cache needs a softmax window, the linear recurrence and no decay "
                f"(got window={self.window}, recurrence={self.recurrence}, decay={self.decay}); set those or sparse_cache=0"
            )
        if not isinstance(self.linear_rope, bool):
            raise DistillError(f"linear_rope must be true or false, got {self.linear_rope!r}")
        if not self.eps > 0:
            raise DistillError(f"eps must be > 0, got {self.eps!r}")
        layers = list(self.keep_softmax_layers)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise DistillError(f"keep_softmax_layers must be a list of layer indices, got {layers!r}")
        self.keep_softmax_layers = sorted(set(layers))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ConvertConfig":
        return cls(**check_keys(cls, data))


def check_keys(cls: type, data: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Reject keys that are not fields of dataclass ``cls`` with a one-line error."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise DistillError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"
            f"{' in ' + where if where else ''}; valid keys: {', '.join(names)}"
        )
    return dict(data)


def parse_value(text: str) -> Any:
    """``key=value`` override values are read as YAML scalars/lists (``3``, ``[1, 2]``, ``none``)."""
    return yaml.safe_load(text)
