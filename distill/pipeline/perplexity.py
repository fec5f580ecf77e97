"""Held-out perplexity of the teacher (``distill_mode="teacher"``) or the student (``parallel``)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..distributed import Comm, is_sharded


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, mode: str, batch: int, progress=None, desc: str = "eval", comm: Comm | None = None) -> float:
    """exp(mean next-token NLL) over ids [M, T] (every window scored from its first token). With
    several ranks (``comm``) each scores the windows ``rank::world`` and the sums are combined.
    The ranks of a sharded model run the same number of forwards (a rank short of windows runs
    the first window again and drops it)."""
    comm = comm or Comm()
    forwards = -(-len(range(0, len(ids), comm.world)) // batch) if is_sharded(model) else 0
    spare = ids[:1]
    ids = ids[comm.shard(len(ids))]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    bar = progress(total=len(ids), desc=desc, unit="seq") if progress else None
    for i in range(0, len(ids), batch):
        x = ids[i : i + batch].to(device)
        logits = model(input_ids=x, distill_mode=mode, use_cache=False).logits  # (B, T, V)
        forwards -= 1
        nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
        total += float(nll)
        count += x[:, 1:].numel()
        if bar is not None:
            bar.set_postfix(ppl=f"{math.exp(total / count):.2f}")
            bar.update(len(x))
    for _ in range(forwards):
        model(input_ids=spare.to(device), distill_mode=mode, use_cache=False)
    if bar is not None:
        bar.close()
    total, count = comm.sum(total, count)
    return math.exp(total / max(count, 1))
