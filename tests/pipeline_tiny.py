"""A tiny random Llama and a character-level tokenizer, built in code (no downloads)."""
from __future__ import annotations

import random
import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHARS = string.ascii_lowercase + string.digits + " .,\n"
WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "to", "park", "and", "then", "slept", "in", "sun"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<eos>": 1} | {c: i + 2 for i, c in enumerate(CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def tiny_config(layers: int = 2) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(CHARS) + 2,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        eos_token_id=1,
        pad_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=True,
    )


def tiny_model(layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(layers))
    with torch.no_grad():  # peaked attention and confident logits, unlike a fresh random init
        model.model.embed_tokens.weight.mul_(10.0)  # tied with lm_head
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.q_proj.weight.mul_(4.0)
            attn.k_proj.weight.mul_(4.0)
            attn.v_proj.weight.mul_(20.0)  # attention matters next to the residual stream
            attn.o_proj.weight.mul_(20.0)
    return model.eval()


def save_tiny_model(path: Path, layers: int = 2) -> Path:
    tiny_model(layers).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def sentences(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) + "." for _ in range(count)]


def write_text(path: Path, count: int = 200, seed: int = 0) -> Path:
    path.write_text("\n\n".join(sentences(count, seed)), encoding="utf-8")
    return path


def make_assets(root: Path) -> dict[str, str]:
    """A tiny model folder and a calibration text file under ``root``, as the paths
    ``distill convert`` takes: {"model": MODEL, "data": data=...}."""
    root.mkdir(parents=True, exist_ok=True)
    return {"model": str(save_tiny_model(root / "model")), "data": str(write_text(root / "text.txt"))}


# Small enough for seconds per run: 8 calibration and 2 held-out windows of 32 tokens.
TINY_OVERRIDES = [
    "seq_len=32",
    "calib_tokens=256",
    "heldout_tokens=64",
    "batch_size_eval=2",
    "threads=1",
    "fit.sequences=2",
    "fit.queries=16",
    "transfer.steps=6",
    "transfer.batch_size=2",
    "transfer.eval_sequences=2",
]


class NoBar:
    """A silent stand-in for tqdm: pass the class where a stage takes ``progress``."""

    def __init__(self, **kwargs):
        pass

    def update(self, n=1):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


class MemoryStore:
    """The RunStore interface, in memory."""

    def __init__(self):
        self.entries = {}

    def has(self, key):
        return key in self.entries

    def save(self, key, tensors, meta):
        self.entries[key] = ({k: v.detach().clone() for k, v in (tensors or {}).items()}, meta)

    def load(self, key):
        return self.entries[key]

    def meta(self, key):
        return self.entries[key][1]
