"""Stage 2b, select (optional): keep as softmax the layers whose linearisation hurts most.

After transfer, each converted layer i is scored by how much the next-token loss on held-out text
rises when i alone runs as the student and every other layer as the teacher:

    score_i = NLL(only layer i converted) − NLL(teacher),   over positions ≥ ``from_position``

Only late positions count, so a layer is judged by what its linear part must carry from beyond
the window (the largest transfer error picks other layers: see the README). The ``keep_softmax``
highest-scoring layers get their teacher's softmax attention back (:func:`distill.convert.restore_softmax`),
which costs their KV cache; the result records the scores, the choice and those bytes.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..architectures import get_architecture
from ..cache import RecurrentLayer
from ..convert import restore_softmax
from ..distributed import gathered, is_sharded
from ..errors import DistillError
from .layerwise import decoder_layers, embed, run_layer
from .params import converted_layers
from .run_config import SelectConfig
from .train import StageContext

log = logging.getLogger(__name__)

KEY = "select"
CONTEXT = 8192  # the context length at which the memory cost of the choice is reported


@dataclass
class SelectResult:
    """Per-layer scores (nats per token at positions ≥ from_position), the layers kept as
    softmax, and the memory at ``CONTEXT`` tokens: the recurrent states, the kept layers' KV cache,
    and the teacher's whole KV cache for comparison (bytes)."""

    scores: dict[str, float]
    kept: list[int]
    teacher_nll: float
    state_bytes: int
    kept_kv_bytes: int
    teacher_kv_bytes: int
    seconds: float
    context: int = CONTEXT
    notes: list[str] = field(default_factory=list)


@torch.no_grad()
def long_range_nll(model, ids: torch.Tensor, student_layers: set[int], from_position: int, batch: int = 1) -> float:
    """Mean next-token NLL over positions ≥ ``from_position`` of ids [N, T], with the layers in
    ``student_layers`` in student (parallel) mode and all others in teacher mode."""
    arch = get_architecture(model.config.model_type)
    hidden = embed(model, ids, batch)
    for i in range(len(decoder_layers(model))):
        hidden = run_layer(model, i, hidden, "parallel" if i in student_layers else "teacher", batch)
    total, count = 0.0, 0
    with gathered(model):
        for a in range(0, len(ids), batch):
            logits = arch.logits(model, hidden[a : a + batch, from_position - 1 : -1]).float()  # (b, T−p, V)
            target = ids[a : a + batch, from_position:].to(logits.device)
            total += float(F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum"))
            count += target.numel()
    return total / max(count, 1)


def _memory(model, kept: list[int]) -> tuple[int, int, int]:
    """(recurrent state bytes, kept layers' KV bytes at CONTEXT, teacher KV bytes at CONTEXT)."""
    config, device = model.config, next(model.parameters()).device
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long, device=device), cache=cache, use_cache=True)
    state = sum(layer.nbytes() for layer in cache.layers if isinstance(layer, RecurrentLayer))
    head_dim = decoder_layers(model)[0].self_attn.head_dim
    per_layer = 2 * config.num_key_value_heads * head_dim * CONTEXT * next(model.parameters()).element_size()
    return state, per_layer * len(kept), per_layer * len(decoder_layers(model))


def run_select(model, data, cfg: SelectConfig, ctx: StageContext) -> SelectResult:
    """Score the converted layers on ``data.heldout``, restore the ``cfg.keep_softmax`` worst to
    softmax attention (in place), checkpointed as one entry (re-applied on resume)."""
    converted = converted_layers(model)
    if cfg.keep_softmax >= len(converted):
        raise DistillError(
            f"select.keep_softmax (auto:K) = {cfg.keep_softmax} must be less than the {len(converted)} converted layers"
        )
    if ctx.store.has(KEY):
        result = SelectResult(**ctx.store.meta(KEY))
        restore_softmax(model, result.kept)
        return result
    start = time.time()
    ids = data.heldout[: cfg.sequences]
    if cfg.from_position >= ids.shape[1]:
        raise DistillError(f"select.from_position={cfg.from_position} is not inside the {ids.shape[1]}-token held-out sequences")
    teacher = long_range_nll(model, ids, set(), cfg.from_position)
    scores = {}
    # With several ranks each scores its share; a sharded model's ranks go through every layer together.
    mine = converted if is_sharded(model) else converted[ctx.comm.shard(len(converted))]
    bar = ctx.progress(total=len(mine), desc="select", unit="layer")
    try:
        for i in mine:
            scores[str(i)] = long_range_nll(model, ids, {i}, cfg.from_position) - teacher
            bar.set_postfix(layer=i, score=f"{scores[str(i)]:.4f}")
            bar.update(1)
    finally:
        bar.close()
    scores = {k: v for part in ctx.comm.gather(scores) for k, v in part.items()}
    scores = {str(i): scores[str(i)] for i in converted}
    kept = sorted(sorted(converted, key=lambda i: scores[str(i)], reverse=True)[: cfg.keep_softmax])
    restore_softmax(model, kept)
    state, kept_kv, teacher_kv = _memory(model, kept)
    result = SelectResult(scores, kept, teacher, state, kept_kv, teacher_kv, time.time() - start)
    log.info(
        "select: kept layers %s as softmax (scores %s); state + kept KV cache at %d tokens: %.1f MiB vs the teacher's %.1f MiB",
        kept, ", ".join(f"{scores[str(i)]:.4f}" for i in kept), CONTEXT, (state + kept_kv) / 2**20, teacher_kv / 2**20,
    )
    ctx.store.save(KEY, None, asdict(result))
    return result
