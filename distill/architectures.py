"""Per-architecture facts, in one table keyed by the teacher's ``model_type``."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import DistillError


@dataclass(frozen=True)
class Architecture:
    """Where the attention modules live and what they hold.

    All supported decoders expose ``model.model.layers[i].self_attn`` with q/k/v/o projections,
    rotate-half RoPE and GQA; ``qk_norm`` marks per-head RMSNorms on q and k before RoPE (Qwen3).
    """

    qk_norm: bool = False

    @staticmethod
    def decoder_layers(model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    @staticmethod
    def embed_tokens(model: nn.Module) -> nn.Module:
        return model.model.embed_tokens

    @staticmethod
    def rotary_emb(model: nn.Module) -> nn.Module:
        """The module that returns RoPE (cos, sin) for ``(hidden, position_ids)``."""
        return model.model.rotary_emb

    @staticmethod
    def final_norm(model: nn.Module) -> nn.Module:
        return model.model.norm

    @staticmethod
    def attention_prefix(layer_idx: int) -> str:
        """State-dict name prefix of layer ``layer_idx``'s attention module."""
        return f"model.layers.{layer_idx}.self_attn."

    @staticmethod
    def teacher_sliding_window(config, layer_idx: int) -> int | None:
        """The teacher's own sliding window for this layer, if it has one."""
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            return window if layer_types[layer_idx] == "sliding_attention" else None
        return window


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(),
    "mistral": Architecture(),
    "qwen2": Architecture(),
    "qwen3": Architecture(qk_norm=True),
}

PREFIX = "distill_"


def base_model_type(model_type: str) -> str:
    return model_type[len(PREFIX):] if model_type.startswith(PREFIX) else model_type


def get_architecture(model_type: str) -> Architecture:
    arch = ARCHITECTURES.get(base_model_type(model_type))
    if arch is None:
        raise DistillError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return arch
