"""lm-eval's HFLM, with the context of a multiple-choice question run once for all its choices.

lm-eval scores each choice as a separate sequence ``context + choice``, so a question with n
choices runs its context n times (timedial: 3 choices after a 257-token dialogue on average).
Here requests that share their context tokens are scored from one cache. A batch of questions
runs its contexts (all but the last token, left-padded) once; the cache rows are then repeated,
one per choice, and the continuations (the context's last token, then the choice without its
last token, right-padded) run as one batch on top. Positions are passed explicitly, so left
padding does not shift them, and right padding is never read by a causal model. The
log-probabilities equal lm-eval's own up to float rounding (tests/test_eval.py checks a softmax
teacher and converted students).

Rolling perplexity, lone requests and sequences longer than ``max_length`` (which lm-eval
truncates on the left) go through lm-eval's own code path unchanged.

Under ``torchrun`` (a joined ``torch.distributed`` process group) each rank scores its share of
the requests: lm-eval splits them by ``rank``/``world_size`` and gathers the metrics on rank 0
through :meth:`all_gather`, :meth:`gather_object` and :meth:`barrier`, which here use
``torch.distributed`` directly (HFLM would use accelerate, which a model instance never sets up).
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

Request = tuple[tuple[str, str] | None, list[int], list[int]]  # (strings, context ids, continuation ids)
Group = tuple[list[int], list[list[int]]]  # (context ids, continuation ids of each choice)


class SharedPrefixLM(HFLM):
    """HFLM whose loglikelihood runs each shared context once (causal models with a KV or recurrent cache)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if dist.is_available() and dist.is_initialized():  # data parallel over the torchrun ranks
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along dim 0 (a scalar counts as one row), in rank order."""
        if self.world_size <= 1:
            return tensor
        row = tensor.detach().cpu().reshape(-1) if tensor.dim() == 0 else tensor.detach().cpu()
        parts = [torch.empty_like(row) for _ in range(self.world_size)]
        dist.all_gather(parts, row)
        return torch.cat(parts).to(tensor.device)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        by_context: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (_, ctx, cont) in enumerate(requests):
            if len(ctx) > 1 and len(ctx) + len(cont) <= self.max_length + 1:
                by_context[tuple(ctx)].append(i)
        shared = sorted((idx for idx in by_context.values() if len(idx) > 1), key=lambda idx: -len(requests[idx[0]][1]))
        done = {i for idx in shared for i in idx}
        rest = [i for i in range(len(requests)) if i not in done]

        out: list[tuple[float, bool] | None] = [None] * len(requests)
        if rest:
            answers = super()._loglikelihood_tokens([requests[i] for i in rest], disable_tqdm, override_bs)
            for i, answer in zip(rest, answers, strict=True):
                out[i] = answer
        step = override_bs or (self.batch_size if isinstance(self.batch_size, int) else 8)
        bar = tqdm(total=len(done), disable=disable_tqdm or not shared or self.rank != 0, desc="Shared-context requests")
        for start in range(0, len(shared), step):
            batch = shared[start : start + step]  # longest contexts first, so little padding
            answers = self._score_groups([(requests[idx[0]][1], [requests[i][2] for i in idx]) for idx in batch])
            for i, answer in zip([i for idx in batch for i in idx], answers, strict=True):
                out[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(len(answers))
        bar.close()
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def _score_groups(self, groups: list[Group]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is the greedy one), choices in order."""
        dev, lens = self.device, [len(ctx) - 1 for ctx, _ in groups]
        P = max(lens)
        ids = torch.zeros(len(groups), P, dtype=torch.long, device=dev)  # (G, P) left-padded prefixes
        mask = torch.zeros(len(groups), P, dtype=torch.long, device=dev)
        for g, (ctx, _) in enumerate(groups):
            ids[g, P - lens[g] :] = torch.tensor(ctx[:-1])
            mask[g, P - lens[g] :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (G, P): each prefix starts at 0
        # only the cache is needed: logits_to_keep=1 skips the output projection for the prefix
        cache = self.model(ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1).cache

        rows = [(g, cont) for g, (_, conts) in enumerate(groups) for cont in conts]
        owner = torch.tensor([g for g, _ in rows], device=dev)  # (N,) group of each choice
        cache.batch_select_indices(owner)
        W = max(len(cont) for _, cont in rows)
        inputs = torch.zeros(len(rows), W, dtype=torch.long, device=dev)  # (N, W) right-padded
        for r, (g, cont) in enumerate(rows):
            inputs[r, 0] = groups[g][0][-1]
            inputs[r, 1 : len(cont)] = torch.tensor(cont[:-1])
        full_mask = torch.cat([mask[owner], torch.ones_like(inputs)], dim=1)  # (N, P + W)
        cont_pos = torch.tensor(lens, device=dev)[owner, None] + torch.arange(W, device=dev)  # (N, W)
        logits = self.model(inputs, attention_mask=full_mask, position_ids=cont_pos, cache=cache, use_cache=True).logits
        logp = F.log_softmax(logits[..., : self.vocab_size], dim=-1, dtype=self.softmax_dtype)  # (N, W, V)
        answers = []
        for r, (_, cont) in enumerate(rows):
            target = torch.tensor(cont, device=dev)  # (C,)
            lp = logp[r, : len(cont)]  # (C, V)
            answers.append((float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
        return answers
