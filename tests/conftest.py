"""Tiny random causal LMs built in code (no downloads)."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run interpreted on CPU (DISTILL_BACKEND=triton tests). Triton reads this when it is
    # first imported, which torch._dynamo and distill do early, so it must be set before anything else.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config  # noqa: E402

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

CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY),
    "mistral": lambda: MistralConfig(**TINY, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**TINY),
    "qwen3": lambda: Qwen3Config(**TINY),
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
    from distill.layer import LinearAttention

    gen = torch.Generator().manual_seed(seed)
    shared = {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"}
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LinearAttention):
                for name, p in module.named_parameters():
                    if name.split(".")[0] not in shared:
                        p.add_(torch.randn(p.shape, generator=gen) * scale)


@pytest.fixture
def tokens():
    torch.manual_seed(123)
    return torch.randint(3, VOCAB, (2, 21))
