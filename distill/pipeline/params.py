"""The parameters that conversion added (feature maps, mixing factors, decays, stack sublayers).

The teacher's projections and norms are shared modules inside each :class:`LinearAttention`;
everything else in it is new and trainable. Checkpoints of the fit and transfer stages hold
only these, keyed by their names in the model's state dict.
"""
from __future__ import annotations

import torch
from torch import nn

from ..architectures import get_architecture
from ..errors import DistillError
from ..layer import SHARED_MODULES as SHARED
from ..layer import LinearAttention
from .layerwise import decoder_layers


def converted_layers(model: nn.Module) -> list[int]:
    """Indices of the decoder layers whose attention is a :class:`LinearAttention`."""
    return [i for i, layer in enumerate(decoder_layers(model)) if isinstance(layer.self_attn, LinearAttention)]


def new_parameters(attn: LinearAttention) -> dict[str, nn.Parameter]:
    """Name (relative to ``attn``) -> parameter, for the parameters conversion added."""
    return {name: p for name, p in attn.named_parameters() if name.split(".")[0] not in SHARED}


def layer_state(model: nn.Module, index: int) -> dict[str, torch.Tensor]:
    """Detached copies of layer ``index``'s new parameters, keyed by full state-dict name."""
    attn = decoder_layers(model)[index].self_attn
    prefix = get_architecture(model.config.model_type).attention_prefix(index)
    return {prefix + n: p.detach().clone().contiguous() for n, p in new_parameters(attn).items()}


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for i in converted_layers(model):
        state.update(layer_state(model, i))
    return state


@torch.no_grad()
def load_state(model: nn.Module, state: dict[str, torch.Tensor], layers: list[int] | None = None) -> None:
    """Copy ``state`` into the new parameters of ``layers`` (default: all converted); strict."""
    layers = converted_layers(model) if layers is None else layers
    arch = get_architecture(model.config.model_type)
    expected = {}
    for i in layers:
        attn = decoder_layers(model)[i].self_attn
        expected.update({arch.attention_prefix(i) + n: p for n, p in new_parameters(attn).items()})
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise DistillError(
            f"checkpoint does not match the converted model (missing: {missing[:3]}, unexpected: {unexpected[:3]}); "
            "was it written with another config? use --overwrite to start again"
        )
    for name, p in expected.items():
        if p.shape != state[name].shape:
            raise DistillError(f"checkpoint tensor {name} has shape {tuple(state[name].shape)}, expected {tuple(p.shape)}")
        p.copy_(state[name])
