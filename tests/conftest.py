"""Tiny random causal LMs built in code (no downloads)."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run interpreted on CPU (DISTILL_BACKEND=triton tests). Triton reads this when it is
    # first imported, which torch._dynamo and distill do early, so it must be set before anything else.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    Phi3Config,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
    SmolLM3Config,
)

torch.set_num_threads(1)

VOCAB = 97

TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
    tie_word_embeddings=False,
)

# Gemma 2/3: layer 0 slides over 8 tokens, layer 1 is global, so ≥ 20-token inputs exercise both.
SLIDING_THEN_GLOBAL = dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"])
TINY_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)

CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY),
    "mistral": lambda: MistralConfig(**TINY, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**TINY),
    "qwen3": lambda: Qwen3Config(**TINY),
    # soft-capped logits (a cap the tiny scores reach) and a query_pre_attn_scalar scale
    "gemma2": lambda: Gemma2Config(**TINY, **SLIDING_THEN_GLOBAL, query_pre_attn_scalar=24, attn_logit_softcapping=2.0),
    # per-head q/k norms; local (10k) vs global (1M) RoPE bases
    "gemma3_text": lambda: Gemma3TextConfig(**TINY, **SLIDING_THEN_GLOBAL, query_pre_attn_scalar=24),
    # fused qkv_proj; RoPE on half of each head
    "phi3": lambda: Phi3Config(
        **TINY, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    ),
    "olmo2": lambda: Olmo2Config(**TINY),  # q/k norms over all heads; no pre-attention norm
    "granite": lambda: GraniteConfig(
        **TINY, attention_multiplier=0.2, embedding_multiplier=3.0, residual_multiplier=0.5, logits_scaling=2.0
    ),
    "mixtral": lambda: MixtralConfig(**TINY, num_local_experts=3, num_experts_per_tok=2),
    "qwen2_moe": lambda: Qwen2MoeConfig(**TINY, **TINY_MOE, num_experts=3, shared_expert_intermediate_size=32),
    "qwen3_moe": lambda: Qwen3MoeConfig(**TINY, **TINY_MOE, num_experts=3),
    "smollm3": lambda: SmolLM3Config(**TINY, no_rope_layers=[1, 0]),  # layer 1 has no RoPE
}


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # Bigger attention logits than the default init, so softmax and its stand-ins differ visibly.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name and "weight" in name:
                p.normal_(0, 0.15)
    return model.eval()


def perturb_new_parameters(model, seed: int = 1, scale: float = 0.1) -> None:
    """Move every parameter added by conversion off its initial value (e.g. w_o = 0), so tests
    exercise all of it. Teacher parameters are left alone."""
    from distill.layer import SHARED_MODULES, LinearAttention

    gen = torch.Generator().manual_seed(seed)
    shared = set(SHARED_MODULES)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LinearAttention):
                for name, p in module.named_parameters():
                    if name.split(".")[0] not in shared:
                        p.add_(torch.randn(p.shape, generator=gen) * scale)


def stepwise_logits(model, tokens, mask=None, cache=None):
    """Logits [B,T,V] of ``tokens`` fed one at a time through the recurrent cache (a fresh one, or
    ``cache``, which the caller can then inspect); ``mask`` is the 2D attention mask, if any."""
    cache = model.new_cache() if cache is None else cache
    outs = []
    for t in range(tokens.shape[1]):
        m = None if mask is None else mask[:, : t + 1]
        outs.append(model(tokens[:, t : t + 1], attention_mask=m, cache=cache, use_cache=True).logits)
    return torch.cat(outs, 1)


def greedy_uncached(model, prompt, steps: int):
    """``prompt`` [B,T] continued greedily by ``steps`` tokens, a full forward per token and no
    cache: the reference for cached ``generate``."""
    seq = prompt
    for _ in range(steps):
        seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


def assert_left_padded_batch_equals_one_by_one(model, max_new_tokens: int) -> None:
    """Greedy ``generate`` on a left-padded batch of three prompts equals each prompt alone; a row
    that stops early (EOS) is padded in the batch."""
    torch.manual_seed(7)
    prompts = [torch.randint(3, VOCAB, (n,)) for n in (11, 6, 3)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        for i, p in enumerate(prompts):
            alone = model.generate(p[None], max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)[0, len(p) :]
            assert torch.equal(batched[i, width : width + len(alone)], alone), f"prompt {i}"
            assert (batched[i, width + len(alone) :] == 0).all()


@pytest.fixture
def tokens():
    torch.manual_seed(123)
    return torch.randint(3, VOCAB, (2, 21))
