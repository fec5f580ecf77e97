"""Passkey retrieval: a 5-digit key hidden in filler text, asked for at the end (Mohtashami & Jaggi, 2023).

Each prompt is ``INTRO + filler + needle + filler + QUESTION``, where the needle ("The pass key is
71432. Remember it. 71432 is the pass key.") sits at a relative depth of the filler (0 = right after
the intro, 1 = right before the question) and the filler repeats a fixed set of sentences. Lengths
are measured in the model's own tokens: the filler is cut word by word until the whole prompt is
within a few tokens of the target. The model answers by greedy generation through its cache (the
student's recurrent state, the teacher's KV cache), and the answer scores 1 when its first run of
digits is exactly the key.

Prompts are generated in code, seeded per (length, depth, trial): nothing is downloaded. The task is
the lm-eval ``generate_until`` task ``passkey`` (``task_configs/passkey.yaml``), whose
``custom_dataset`` is :func:`passkey_dataset`; like lm-eval's RULER tasks it reads the tokenizer and
its settings from the task metadata, which ``distill eval`` fills from ``--passkey-*``.

This module imports neither torch nor transformers at the top, so ``distill --help`` stays fast.
"""
from __future__ import annotations

import functools
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DistillError

log = logging.getLogger(__name__)

DEFAULT_LENGTHS = (512, 1024, 2048, 4096, 8192)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
MAX_GEN_TOKS = 8  # the answer: " 71432" is at most 6 tokens in the tokenizers we know; passkey.yaml says the same

INTRO = "A pass key is hidden in the text below. Find it and remember it; you will be asked for it at the end."
# The filler sentences of the original passkey test (Landmark Attention, Mohtashami & Jaggi, 2023).
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
# "Answer with the number." keeps a late needle from reading as a pattern to copy: with its last
# clause ("71432 is the pass key.") just before "The pass key is", the demo's student answered
# "the pass key." and its teacher missed all 8 prompts at 2k, depths 0.75 and 1 (README).
QUESTION = "\nWhat is the pass key? Answer with the number. The pass key is"

CELL = re.compile(r"^acc_(\d+)_d([0-9.]+)$")  # per (length, depth) metric names, see cell_metric


class _QuietPasskeyAggregation(logging.Filter):
    """lm-eval warns that per-cell metrics have no declared aggregation (it uses the mean, as wanted)
    and are scored on fewer documents than ``acc`` (each prompt belongs to one cell, by design)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (text.startswith("[passkey]") and ("No aggregation function" in text or "not scored on the same" in text))


logging.getLogger("lm_eval.evaluator_utils").addFilter(_QuietPasskeyAggregation())


@dataclass(frozen=True)
class PasskeyOptions:
    """What the passkey task asks; ``distill eval --passkey-*`` sets these."""

    lengths: tuple[int, ...] | None = field(
        default=None, metadata={"help": "prompt lengths in tokens; None = 512..8192 capped at the model's positions"})
    depths: tuple[float, ...] = field(default=DEFAULT_DEPTHS, metadata={"help": "relative depths of the key, in [0, 1]"})
    trials: int = field(default=5, metadata={"help": "prompts (each with its own key) per length and depth"})
    seed: int = field(default=0, metadata={"help": "seed of the keys and filler offsets"})

    def __post_init__(self) -> None:
        if self.lengths is not None:
            if not self.lengths or any(not isinstance(n, int) or n < 1 for n in self.lengths):
                raise DistillError(f"passkey lengths must be positive numbers of tokens, got {list(self.lengths)}")
            object.__setattr__(self, "lengths", tuple(sorted(set(self.lengths))))
        if not self.depths or any(not 0 <= d <= 1 for d in self.depths):
            raise DistillError(f"passkey depths must lie in [0, 1] (0 = start, 1 = end), got {list(self.depths)}")
        object.__setattr__(self, "depths", tuple(sorted({float(d) for d in self.depths})))
        if self.trials < 1:
            raise DistillError(f"--passkey-trials must be at least 1, got {self.trials}")

    def metadata(self) -> dict[str, Any]:
        """The lm-eval task metadata that :func:`passkey_dataset` reads back."""
        return {"passkey_lengths": list(self.lengths) if self.lengths else None, "passkey_depths": list(self.depths),
                "passkey_trials": self.trials, "passkey_seed": self.seed}

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> "PasskeyOptions":
        lengths = meta.get("passkey_lengths")
        return cls(lengths=tuple(int(n) for n in lengths) if lengths else None,
                   depths=tuple(float(d) for d in meta.get("passkey_depths") or DEFAULT_DEPTHS),
                   trials=int(meta.get("passkey_trials", cls.trials)), seed=int(meta.get("passkey_seed", cls.seed)))


def resolve_lengths(options: PasskeyOptions, max_positions: int | None) -> list[int]:
    """The lengths to ask: the requested ones (each at most ``max_positions``, else a
    :class:`DistillError` naming the limit), or the defaults capped at ``max_positions``."""
    if options.lengths is not None:
        too_long = [n for n in options.lengths if max_positions is not None and n > max_positions]
        if too_long:
            raise DistillError(f"passkey length {too_long[0]} is above the model's max_position_embeddings "
                               f"({max_positions}); use --passkey-lengths up to {max_positions}")
        return list(options.lengths)
    if max_positions is None:
        return list(DEFAULT_LENGTHS)
    lengths = sorted({min(n, max_positions) for n in DEFAULT_LENGTHS})
    if lengths != list(DEFAULT_LENGTHS):
        log.info("passkey lengths capped at the model's max_position_embeddings (%d): %s", max_positions, lengths)
    return lengths


def cell_metric(length: int, depth: float | None = None) -> str:
    """Metric name of one length (``acc_1024``) or one (length, depth) cell (``acc_1024_d0.25``)."""
    return f"acc_{length}" if depth is None else f"acc_{length}_d{depth:g}"


def parse_cell(metric: str) -> tuple[int, float] | None:
    """(length, depth) of a cell metric name, None for any other metric."""
    m = CELL.match(metric)
    return (int(m.group(1)), float(m.group(2))) if m else None


# --- prompts ------------------------------------------------------------------------------------


@dataclass
class _Filler:
    """Filler words cycled from a starting sentence; ``ends[i]``: word i closes a sentence."""

    words: list[str]
    ends: list[bool]

    @classmethod
    def cycle(cls, offset: int, count: int) -> "_Filler":
        words, ends = [], []
        i = offset
        while len(words) < count:
            parts = FILLER[i % len(FILLER)].split()
            words += parts
            ends += [False] * (len(parts) - 1) + [True]
            i += 1
        return cls(words[:count], ends[:count])


def build_prompt(tokenizer, length: int, depth: float, key: str, offset: int = 0, tolerance: int = 3,
                 limit: int | None = None) -> dict[str, Any]:
    """One passkey prompt of ``length`` tokens (within a few) with ``key`` at relative ``depth``.

    The filler is cut word by word to the closest length; when ending it on a whole sentence
    instead costs at most ``tolerance`` tokens, it ends on the sentence (SmolLM2: always). With
    ``limit``, the prompt has at most that many tokens (:func:`build_docs` leaves the answer room
    within the model's positions).

    Returns the lm-eval doc: ``prompt``, ``key``, ``length`` and ``depth`` as asked, ``n_tokens``
    (measured), ``needle_token`` (index of the needle's first token) and ``needle_depth`` (filler
    tokens before the needle / all filler tokens, as measured).
    """
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    needle = " " + NEEDLE.format(key=key)
    fixed = count(INTRO + needle + QUESTION)
    if fixed >= min(length, limit or length):
        raise DistillError(f"passkey length {length} is too short: the question and the key alone take {fixed} tokens")
    filler = _Filler.cycle(offset, length)  # every word is at least one token, so this is enough
    cost = {w: max(count(" " + w), 1) for w in set(filler.words)}
    cumulative = [0]
    for w in filler.words:
        cumulative.append(cumulative[-1] + cost[w])

    def assemble(n: int) -> dict[str, Any]:
        words = filler.words[:n]
        if n and not filler.ends[n - 1]:  # a cut sentence still ends with a full stop
            words = words[:-1] + [words[-1] + "."]
        stops = [0] + [i + 1 for i in range(n) if filler.ends[i]] + [n]
        at = min(stops, key=lambda i: abs(cumulative[i] - depth * cumulative[n]))  # a sentence boundary
        before = INTRO + "".join(" " + w for w in words[:at])
        prompt = before + needle + "".join(" " + w for w in words[at:]) + QUESTION
        n_tokens, n_before, n_intro = count(prompt), count(before), count(INTRO)
        filler_tokens = max(n_tokens - fixed, 1)
        return {"prompt": prompt, "key": key, "length": length, "depth": depth, "n_tokens": n_tokens,
                "needle_token": n_before, "needle_depth": min(max((n_before - n_intro) / filler_tokens, 0.0), 1.0)}

    n = next((i for i, c in enumerate(cumulative) if c >= length - fixed), len(filler.words))
    doc = assemble(n)
    average = max(cumulative[-1] / max(len(filler.words), 1), 1.0)
    for _ in range(8):  # jump by the measured error while it is more than a word
        error = doc["n_tokens"] - length
        if abs(error) <= max(tolerance, average):
            break
        n = min(max(n - round(error / average), 0), len(filler.words))
        doc = assemble(n)
    best, best_n = doc, n
    step = -1 if doc["n_tokens"] > length else 1
    for _ in range(16):  # then one word at a time, keeping the closest
        if not 0 <= n + step <= len(filler.words):
            break
        n += step
        doc = assemble(n)
        if abs(doc["n_tokens"] - length) < abs(best["n_tokens"] - length):
            best, best_n = doc, n
        if (doc["n_tokens"] - length) * step >= 0:  # crossed the target
            break
    # whole sentences read better than a cut one: take the nearest sentence end if it is close enough
    if best_n and not filler.ends[best_n - 1]:
        ends = [i + 1 for i, end in enumerate(filler.ends) if end]
        below = max((i for i in ends if i <= best_n), default=None)
        above = min((i for i in ends if i > best_n), default=None)
        whole = [(assemble(i), i) for i in (below, above) if i is not None]
        whole = [(d, i) for d, i in whole
                 if abs(d["n_tokens"] - length) <= tolerance and (not limit or d["n_tokens"] <= limit)]
        if whole:
            best, best_n = min(whole, key=lambda di: abs(di[0]["n_tokens"] - length))
    while limit and best["n_tokens"] > limit and best_n:  # a word less until it fits
        best_n -= 1
        best = assemble(best_n)
    return best


def build_docs(tokenizer, options: PasskeyOptions, max_positions: int | None) -> list[dict[str, Any]]:
    """Every prompt of the task, length-major, then depth, then trial; seeded per cell. Prompts
    leave :data:`MAX_GEN_TOKS` positions for the answer below ``max_positions``."""
    limit = max_positions - MAX_GEN_TOKS if max_positions else None
    docs = []
    for length in resolve_lengths(options, max_positions):
        for depth in options.depths:
            for trial in range(options.trials):
                rng = random.Random(f"passkey/{options.seed}/{length}/{depth:g}/{trial}")
                key = str(rng.randrange(10_000, 100_000))
                doc = build_prompt(tokenizer, length, depth, key, offset=rng.randrange(len(FILLER)), limit=limit)
                docs.append(doc | {"trial": trial})
    return docs


@functools.lru_cache(maxsize=4)
def prompt_tokenizer(spec: str):
    """(tokenizer, max_position_embeddings or None) of a MODEL spec (hub id, folder, .gguf, ``demo``),
    without loading its weights."""
    from transformers import AutoConfig, AutoTokenizer

    from ..convert import register_all
    from ..models import DEMO

    register_all()  # converted students' configs, for AutoConfig

    if spec == DEMO:
        from ..assets import fetch

        spec = str(fetch("smollm2"))
    path = Path(spec).expanduser()
    kwargs: dict[str, Any] = {"gguf_file": path.name} if spec.endswith(".gguf") else {}
    where = str(path.parent if kwargs else path) if path.exists() else spec
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        config = AutoConfig.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as err:
        line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DistillError(f"cannot load the tokenizer of {spec} to build the passkey prompts ({line})") from None
    return tokenizer, getattr(config, "max_position_embeddings", None)


def passkey_dataset(**metadata: Any):
    """``custom_dataset`` of ``passkey.yaml``: the prompts of :func:`build_docs`.

    Reads the task metadata: ``tokenizer`` (or lm-eval's ``pretrained``), a MODEL whose tokenizer
    measures the lengths and whose ``max_position_embeddings`` caps them, and the ``passkey_*``
    settings of :meth:`PasskeyOptions.metadata`.
    """
    from datasets import Dataset, DatasetDict

    spec = metadata.get("tokenizer") or metadata.get("pretrained")
    if not isinstance(spec, str) or not spec:
        raise DistillError("the passkey task measures its prompts in the model's tokens: give the task metadata "
                           "tokenizer=MODEL (distill eval does this itself)")
    tokenizer, max_positions = prompt_tokenizer(spec)
    docs = build_docs(tokenizer, PasskeyOptions.from_metadata(metadata), max_positions)
    log.info("passkey: %d prompts of %s tokens", len(docs), ", ".join(str(n) for n in sorted({d["length"] for d in docs})))
    return DatasetDict({"test": Dataset.from_list(docs)})


# --- scoring ------------------------------------------------------------------------------------


def extract_key(generation: str) -> str | None:
    """The first run of digits in a generated answer (the model's key), None if it has none."""
    m = re.search(r"\d+", generation)
    return m.group(0) if m else None


def score(generation: str, key: str) -> float:
    """1.0 when the answer's first run of digits is exactly ``key`` (all 5 digits, nothing more), else 0.0."""
    return float(extract_key(generation) == key)


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """``process_results`` of ``passkey.yaml``: ``acc`` over all prompts, and the same score under
    the prompt's length (``acc_<length>``) and its (length, depth) cell (``acc_<length>_d<depth>``)."""
    s = score(results[0], doc["key"])
    return {"acc": s, cell_metric(doc["length"]): s, cell_metric(doc["length"], doc["depth"]): s}


def is_passkey_task(task: Any) -> bool:
    """Whether an lm-eval Task object scores with :func:`process_results` (``passkey`` or a copy of it)."""
    config = getattr(task, "config", None)
    return getattr(config, "process_results", None) is process_results


def context_needed(task: Any) -> int:
    """Tokens of context a passkey task needs: its longest prompt plus the answer."""
    gen = task.config.generation_kwargs or {}
    return max(d["n_tokens"] for d in task.eval_docs) + int(gen.get("max_gen_toks", MAX_GEN_TOKS))
