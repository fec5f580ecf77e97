"""Run a converted causal LM one decoder layer at a time, in teacher or student mode.

The transfer stage trains layer i on the hidden states that enter it, then pushes those hidden
states through layer i to get the inputs of layer i+1; only one layer's activations are alive.
Hidden states are [N, T, hidden]; they are processed ``batch`` sequences at a time.
"""
from __future__ import annotations

import torch
from torch import nn

from ..architectures import get_architecture


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return get_architecture(model.config.model_type).decoder_layers(model)


def position_embeddings(model: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (cos, sin) for positions 0..T-1 of ``hidden`` [B, T, hidden]."""
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None]  # (1, T)
    return get_architecture(model.config.model_type).rotary_emb(model)(hidden, position_ids=positions)


@torch.no_grad()
def embed(model: nn.Module, ids: torch.Tensor, batch: int) -> torch.Tensor:
    """ids [N, T] -> hidden states entering layer 0 [N, T, hidden], on the model's device."""
    table = get_architecture(model.config.model_type).embed_tokens(model)
    return torch.cat([table(ids[i : i + batch].to(table.weight.device)) for i in range(0, len(ids), batch)])


@torch.no_grad()
def run_layer(model: nn.Module, index: int, hidden: torch.Tensor, mode: str, batch: int) -> torch.Tensor:
    """Push hidden [N, T, hidden] through decoder layer ``index`` in ``mode`` (teacher | parallel)."""
    layer = decoder_layers(model)[index]
    out = []
    for i in range(0, len(hidden), batch):
        h = hidden[i : i + batch]
        positions = torch.arange(h.shape[1], device=h.device)[None]
        out.append(
            layer(h, position_embeddings=position_embeddings(model, h), position_ids=positions, distill_mode=mode)
        )
    return torch.cat(out)


def attention_input(model: nn.Module, index: int, hidden: torch.Tensor) -> torch.Tensor:
    """The normalised hidden states that layer ``index``'s attention reads: [B, T, hidden]."""
    return decoder_layers(model)[index].input_layernorm(hidden)
