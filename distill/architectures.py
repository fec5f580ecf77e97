"""Per-family facts, in one table keyed by the teacher's ``model_type``.

Every supported teacher is a decoder of the common shape: ``model.model.layers[i].self_attn``
with q/k/v/o projections, rotate-half RoPE, GQA, a pre-attention norm ``input_layernorm``, an
attention scale ``self_attn.scaling``, and a sliding window per layer given by ``sliding_window``
(all layers) or ``layer_types`` (the layers marked ``sliding_attention``). Each family's
:class:`Architecture` states only what differs from that; :class:`distill.layer.LinearAttention`
reads the facts (``layer_options``), never the family's name. MLPs (dense or mixture-of-experts)
are not touched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import DistillError

QK_NORMS = (None, "head", "flat")


@dataclass(frozen=True)
class Architecture:
    """What one family does differently from the common decoder.

    qk_norm: ``"head"`` = RMSNorms of size D on q and k per head before RoPE (Qwen3, Gemma 3);
        ``"flat"`` = RMSNorms over all heads, on the flat projections before the head reshape
        (OLMo-2); None = no q/k norm.
    fused_qkv: one ``qkv_proj`` whose output rows are [q | k | v] (Phi-3); it is shared and split
        per call, never copied into three projections.
    softcap_key: config key of attention-logit soft-capping, scores → c·tanh(scores/c) (Gemma 2).
    rope_per_layer_type: the rotary module takes the layer type and layers of different types use
        different RoPE bases (Gemma 3: local vs global).
    no_rope_key: config key of a per-layer list, 0 = this layer has no RoPE (SmolLM3).
    embedding_multiplier_key: config key of a factor the model applies to the token embeddings in
        its forward, outside ``embed_tokens`` (Granite). Gemma's √hidden scale lives inside
        ``embed_tokens`` and needs nothing here.
    pre_attention_norm: False when the decoder layer feeds its raw input to attention and
        normalises after it instead (OLMo-2).
    """

    qk_norm: str | None = None
    fused_qkv: bool = False
    softcap_key: str | None = None
    rope_per_layer_type: bool = False
    no_rope_key: str | None = None
    embedding_multiplier_key: str | None = None
    pre_attention_norm: bool = True

    def __post_init__(self) -> None:
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")

    # ---- where things live -------------------------------------------------------------------

    @staticmethod
    def decoder_layers(model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    @staticmethod
    def embed_tokens(model: nn.Module) -> nn.Module:
        return model.model.embed_tokens

    @staticmethod
    def rotary_emb(model: nn.Module) -> nn.Module:
        """The module that returns RoPE (cos, sin) for ``(hidden, position_ids[, layer_type])``."""
        return model.model.rotary_emb

    @staticmethod
    def final_norm(model: nn.Module) -> nn.Module:
        return model.model.norm

    @classmethod
    def logits(cls, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on the last layer's output [B,T,hidden] -> [B,T,V], with the final norm and
        any logit scaling the family's forward applies (Granite's ``logits_scaling`` divides,
        Gemma's ``final_logit_softcapping`` caps)."""
        logits = model.get_output_embeddings()(cls.final_norm(model)(hidden))
        scale = getattr(model.config, "logits_scaling", None)
        if scale:
            logits = logits / scale
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            logits = cap * torch.tanh(logits / cap)
        return logits

    @staticmethod
    def attention_prefix(layer_idx: int) -> str:
        """State-dict name prefix of layer ``layer_idx``'s attention module."""
        return f"model.layers.{layer_idx}.self_attn."

    # ---- per-layer facts ---------------------------------------------------------------------

    @staticmethod
    def teacher_sliding_window(config, layer_idx: int) -> int | None:
        """The teacher's own sliding window for this layer (as its forward builds the mask), if any."""
        window = getattr(config, "sliding_window", None) or None
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            return window if layer_types[layer_idx] == "sliding_attention" else None
        return window

    def softcap(self, config) -> float | None:
        return getattr(config, self.softcap_key, None) if self.softcap_key else None

    def uses_rope(self, config, layer_idx: int) -> bool:
        return bool(getattr(config, self.no_rope_key)[layer_idx]) if self.no_rope_key else True

    def rope_key(self, config, layer_idx: int) -> str | None:
        """Key of this layer's (cos, sin) in :meth:`position_embeddings`' mapping, if it gives one."""
        return config.layer_types[layer_idx] if self.rope_per_layer_type else None

    def embedding_multiplier(self, config) -> float:
        return float(getattr(config, self.embedding_multiplier_key)) if self.embedding_multiplier_key else 1.0

    def attention_input(self, decoder_layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """What the layer's attention reads: hidden [B,T,hidden] after the pre-attention norm, if any."""
        return decoder_layer.input_layernorm(hidden) if self.pre_attention_norm else hidden

    def position_embeddings(self, model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor):
        """RoPE for positions [1,T]: (cos, sin) [1,T,R] each (R ≤ D; R < D is partial rotary), or
        with ``rope_per_layer_type`` a dict of them keyed by layer type."""
        rotary = self.rotary_emb(model)
        if self.rope_per_layer_type:
            return {t: rotary(hidden, positions, t) for t in sorted(set(model.config.layer_types))}
        return rotary(hidden, position_ids=positions)

    def layer_rope(self, rope, config, layer_idx: int):
        """This layer's (cos, sin) out of :meth:`position_embeddings`' result."""
        key = self.rope_key(config, layer_idx)
        return rope[key] if key is not None else rope

    def layer_options(self, config, layer_idx: int) -> dict:
        """The facts :class:`distill.layer.LinearAttention` reads for layer ``layer_idx``."""
        return dict(
            teacher_sliding_window=self.teacher_sliding_window(config, layer_idx),
            qk_norm=self.qk_norm,
            fused_qkv=self.fused_qkv,
            softcap=self.softcap(config),
            use_rope=self.uses_rope(config, layer_idx),
            rope_key=self.rope_key(config, layer_idx),
        )

    def check(self, config, layers: nn.ModuleList) -> None:
        """Raise a one-line :class:`DistillError` if a layer's attention does not have what this
        adapter reads (the module layout, its scale)."""
        names = ("qkv_proj", "o_proj") if self.fused_qkv else ("q_proj", "k_proj", "v_proj", "o_proj")
        names += ("q_norm", "k_norm") if self.qk_norm else ()
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            missing = [n for n in names + ("head_dim",) if not hasattr(attn, n)]
            if missing:
                raise DistillError(
                    f"layer {i} attention ({type(attn).__name__}) has no {', '.join(missing)}; "
                    f"this transformers version lays out {config.model_type} differently than distill expects"
                )
            scaling = getattr(attn, "scaling", None)
            if not isinstance(scaling, (int, float)) or not scaling > 0:
                raise DistillError(
                    f"layer {i} attention ({type(attn).__name__}) has no positive float .scaling (got {scaling!r}); "
                    "distill needs the teacher's attention scale"
                )
        if getattr(config, "use_bidirectional_attention", False):
            raise DistillError("this model attends bidirectionally (use_bidirectional_attention=true); only causal LMs convert")


# In the order the unsupported-model_type error lists them (the first four are the original ones).
ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(),
    "mistral": Architecture(),
    "qwen2": Architecture(),
    "qwen3": Architecture(qk_norm="head"),
    "gemma2": Architecture(softcap_key="attn_logit_softcapping"),
    "gemma3_text": Architecture(qk_norm="head", rope_per_layer_type=True),
    "phi3": Architecture(fused_qkv=True),
    "olmo2": Architecture(qk_norm="flat", pre_attention_norm=False),
    "granite": Architecture(embedding_multiplier_key="embedding_multiplier"),
    "mixtral": Architecture(),
    "qwen2_moe": Architecture(),
    "qwen3_moe": Architecture(qk_norm="head"),
    "smollm3": Architecture(no_rope_key="no_rope_layers"),
}

PREFIX = "distill_"


def base_model_type(model_type: str) -> str:
    return model_type[len(PREFIX):] if model_type.startswith(PREFIX) else model_type


def get_architecture(model_type: str) -> Architecture:
    arch = ARCHITECTURES.get(base_model_type(model_type))
    if arch is None:
        raise DistillError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )
    return arch
