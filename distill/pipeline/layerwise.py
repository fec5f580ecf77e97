"""Run a converted causal LM one decoder layer at a time, in teacher or student mode.

The transfer stage trains layer i on the hidden states that enter it, then pushes those hidden
states through layer i to get the inputs of layer i+1; only one layer's activations are alive.
Hidden states are [N, T, hidden]; they are processed ``batch`` sequences at a time. What differs
between families (embedding multipliers, per-layer RoPE, the pre-attention norm, sliding-window
masks of layers kept as softmax) comes from :mod:`distill.architectures`. With a sharded model
(``fsdp=true``) each helper gathers the weights it reads (:func:`distill.distributed.gathered`), so
every rank must call it, in the same order.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from ..architectures import get_architecture
from ..distributed import gathered
from ..layer import LinearAttention


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return get_architecture(model.config.model_type).decoder_layers(model)


def position_embeddings(model: nn.Module, hidden: torch.Tensor, offset: int = 0):
    """RoPE for positions offset..offset+T-1 of ``hidden`` [B, T, hidden]: (cos, sin) [1, T, R] each,
    or a dict of them keyed by layer type (Gemma 3); :meth:`LinearAttention.project` takes either."""
    positions = torch.arange(offset, offset + hidden.shape[1], device=hidden.device)[None]  # (1, T)
    return get_architecture(model.config.model_type).position_embeddings(model, hidden, positions)


@torch.no_grad()
def embed(model: nn.Module, ids: torch.Tensor, batch: int) -> torch.Tensor:
    """ids [N, T] -> hidden states entering layer 0 [N, T, hidden], on the model's device."""
    arch = get_architecture(model.config.model_type)
    table = arch.embed_tokens(model)
    with gathered(model):
        hidden = torch.cat([table(ids[i : i + batch].to(table.weight.device)) for i in range(0, len(ids), batch)])
    multiplier = arch.embedding_multiplier(model.config)
    return hidden * multiplier if multiplier != 1.0 else hidden


def _softmax_mask(model: nn.Module, index: int, h: torch.Tensor, positions: torch.Tensor):
    """The attention mask a layer kept as softmax needs (causal, and sliding where the teacher's
    layer slides), built as the teacher's forward builds it for its attention implementation."""
    window = get_architecture(model.config.model_type).teacher_sliding_window(model.config, index)
    make = create_sliding_window_causal_mask if window else create_causal_mask
    return make(config=model.config, inputs_embeds=h, attention_mask=None, cache=None, position_ids=positions)


@torch.no_grad()
def run_layer(model: nn.Module, index: int, hidden: torch.Tensor, mode: str, batch: int) -> torch.Tensor:
    """Push hidden [N, T, hidden] through decoder layer ``index`` in ``mode`` (teacher | parallel)."""
    arch = get_architecture(model.config.model_type)
    layer = decoder_layers(model)[index]
    converted = isinstance(layer.self_attn, LinearAttention)
    out = []
    with gathered(layer):
        for i in range(0, len(hidden), batch):
            h = hidden[i : i + batch]
            positions = torch.arange(h.shape[1], device=h.device)[None]
            rope = arch.layer_rope(position_embeddings(model, h), model.config, index)
            mask = None if converted else _softmax_mask(model, index, h, positions)
            out.append(layer(h, attention_mask=mask, position_embeddings=rope, position_ids=positions, distill_mode=mode))
    return torch.cat(out) if out else hidden


def attention_input(model: nn.Module, index: int, hidden: torch.Tensor) -> torch.Tensor:
    """The hidden states that layer ``index``'s attention reads: [B, T, hidden] (normalised, unless
    the family normalises after attention)."""
    arch = get_architecture(model.config.model_type)
    layer = decoder_layers(model)[index]
    with gathered(layer):
        return arch.attention_input(layer, hidden)
