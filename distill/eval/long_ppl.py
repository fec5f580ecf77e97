"""Next-token loss by position on long documents (``long_ppl``), teacher beside student.

Short-text perplexity hides what a constant-size state forgets: here every document window of
``N`` tokens is scored from its first token, and the loss ``-log p(x_p | x_<p)`` of each position
``p`` is averaged within buckets of positions (0-64, 64-256, 256-1k, 1k-2k, 2k-4k, 4k-8k). A
student that keeps up with its teacher early and falls behind later shows it as a loss ratio that
grows with the bucket. Buckets beyond the window (itself capped by the model's
``max_position_embeddings``) are omitted.

Documents: the books of the King James Bible, from Debian's ``bible-kjv`` packages (fetched once
into :func:`distill.assets.cache_dir` with ``apt-get download``, unpacked with ``dpkg-deb -x`` and
printed by the package's own reader; no root needed), or any long text file (``--long-text FILE``).

lm-eval has no request type for loss by position, so this task runs outside it: :func:`evaluate`
returns its numbers in lm-eval's result layout and ``distill eval`` reports them beside the rest.
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..assets import cache_dir
from ..errors import DistillError

log = logging.getLogger(__name__)

TASK = "long_ppl"
EDGES = (0, 64, 256, 1024, 2048, 4096, 8192)  # bucket b holds positions EDGES[b] <= p < EDGES[b + 1]
DEFAULT_TOKENS = 8192
CHUNK = 1024  # tokens per forward pass; the cache carries the context between chunks

BIBLE_PACKAGES = ("bible-kjv", "bible-kjv-text")
BIBLE_RANGE = "gen1:1-rev22:21"
BIBLE_BOOKS = 66


@dataclass(frozen=True)
class LongPplOptions:
    """What ``long_ppl`` scores; ``distill eval --long-ppl-* / --long-text`` set these."""

    tokens: int | None = field(default=None, metadata={"help": "window length; None = 8192 capped at the model's positions"})
    docs: int = field(default=8, metadata={"help": "windows scored (one per document, in order, while they last)"})
    text: str | None = field(default=None, metadata={"help": "a long local text file; None = the King James Bible"})

    def __post_init__(self) -> None:
        if self.tokens is not None and self.tokens < 2:
            raise DistillError(f"--long-ppl-tokens must be at least 2, got {self.tokens}")
        if self.docs < 1:
            raise DistillError(f"--long-ppl-docs must be at least 1, got {self.docs}")


def bucket_name(lo: int, hi: int) -> str:
    """``0-64``, ``256-1k``, ``4k-8k``: positions lo <= p < hi."""
    def short(n: int) -> str:
        return f"{n // 1024}k" if n and n % 1024 == 0 else str(n)

    return f"{short(lo)}-{short(hi)}"


# --- documents ----------------------------------------------------------------------------------


def bible_dir() -> Path:
    """Cache folder of the Bible's books (``books.json``: book name -> text)."""
    return cache_dir() / "bible-kjv"


def _run(cmd: list[str], what: str, hint: str, **kwargs) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    except FileNotFoundError:
        raise DistillError(f"{cmd[0]} not found, which {what} needs; {hint}") from None
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if line.startswith("E:")] or done.stderr.strip().splitlines()
        raise DistillError(f"{' '.join(cmd)} failed ({errors[-1].strip() if errors else f'exit {done.returncode}'}); {hint}")
    return done


def split_books(text: str) -> dict[str, str]:
    """Book name -> text, from the reader's output: a ``Book N`` line opens chapter N, each verse is
    one line ``  V text``. A book is its chapters, one paragraph each; verse numbers are dropped."""
    heading, verse = re.compile(r"^(\S.*) (\d+)$"), re.compile(r"^\s+\d+ (.*\S)\s*$")
    chapters: dict[str, list[list[str]]] = {}
    book = None
    for line in text.splitlines():
        if m := heading.match(line):
            book = m.group(1)
            chapters.setdefault(book, []).append([])
        elif (m := verse.match(line)) and book is not None:
            chapters[book][-1].append(m.group(1))
    return {name: "\n\n".join(" ".join(v) for v in chs if v) for name, chs in chapters.items()}


def fetch_bible() -> Path:
    """``books.json`` of the King James Bible; downloads Debian's packages once (2.5 MB).

    ``apt-get download`` needs no root, only the package lists (``apt-get update``, once, as root).
    The folder appears in one rename, so a half-done fetch is never taken for a finished one.
    """
    target = bible_dir()
    if (target / "books.json").is_file():
        return target / "books.json"
    hint = "pass --long-text FILE (any long plain-text file) instead"
    log.info("fetching the King James Bible from Debian (%s; once, 2.5 MB)", ", ".join(BIBLE_PACKAGES))
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        debs = Path(tmp) / "debs"
        debs.mkdir()
        _run(["apt-get", "download", *BIBLE_PACKAGES], "fetching the Bible",
             f"if apt-get cannot find the packages, run `apt-get update` once (as root) and retry, or {hint}", cwd=debs)
        root = Path(tmp) / "root"
        for deb in sorted(debs.glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), str(root)], "unpacking the Bible", hint)
        # -l: no line wrapping, so that every verse is one line
        printed = _run(["usr/bin/bible", "-p", "usr/lib", "-l100000", BIBLE_RANGE], "printing the Bible", hint, cwd=root)
        books = split_books(printed.stdout)
        if len(books) != BIBLE_BOOKS:
            raise DistillError(f"the Bible printed by {BIBLE_PACKAGES[0]} has {len(books)} books, not {BIBLE_BOOKS}; {hint}")
        staged = Path(tmp) / "staged"
        staged.mkdir()
        (staged / "books.json").write_text(json.dumps(books, ensure_ascii=False), encoding="utf-8")
        if target.is_dir():  # an incomplete copy: it goes with tmp
            os.replace(target, Path(tmp) / "old")
        os.replace(staged, target)
    return target / "books.json"


def read_text_file(path: str | Path) -> str:
    """The text of ``--long-text``; a missing, unreadable or empty file is a one-line error."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DistillError(f"--long-text {path} does not exist or is not a file; give a long plain-text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DistillError(f"--long-text {path} is not UTF-8 text; give a long plain-text file") from None
    except OSError as err:
        raise DistillError(f"cannot read --long-text {path} ({err.strerror or err})") from None
    if not text.strip():
        raise DistillError(f"--long-text {path} is empty; give a long plain-text file")
    return text


def documents(options: LongPplOptions) -> list[tuple[str, str]]:
    """(name, text) of each document: the user's file as one document, or the Bible's 66 books in order."""
    if options.text is not None:
        return [(Path(options.text).name, read_text_file(options.text))]
    books = json.loads(fetch_bible().read_text(encoding="utf-8"))
    return list(books.items())


def prepare(options: LongPplOptions) -> None:
    """Check or fetch the documents before any model is loaded."""
    documents(options)


def windows(docs: list[tuple[str, str]], tokenizer, length: int, count: int) -> list[tuple[str, list[int]]]:
    """Up to ``count`` windows of ``length`` tokens: the first window of each document long enough,
    in order, then their second windows, and so on. Each starts with the token lm-eval puts before
    a rolling-perplexity document (BOS, else EOS), so its first text token is scored too. When no
    document is that long, the window shrinks to the longest one."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    head = [prefix] if prefix is not None else []
    body = length - len(head)
    tokenized: list[tuple[str, list[int]]] = []
    out: list[tuple[str, list[int]]] = []
    for name, text in docs:  # documents are tokenized only until enough of them are long enough
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        tokenized.append((name, ids))
        if len(ids) >= body:
            out.append((f"{name} [0:{body}]", head + ids[:body]))
            if len(out) == count:
                return out
    if not out:
        longest = max(len(ids) for _, ids in tokenized)
        if longest + len(head) < 2:
            raise DistillError("the long_ppl documents have no tokens; give a longer --long-text file")
        log.warning("long_ppl: no document has %d tokens; windows shrink to the longest, %d", body, longest)
        return windows(docs, tokenizer, longest + len(head), count)
    k = 1
    while len(out) < count:
        added = False
        for name, ids in tokenized:
            if len(ids) >= (k + 1) * body:
                out.append((f"{name} [{k * body}:{(k + 1) * body}]", head + ids[k * body : (k + 1) * body]))
                added = True
                if len(out) == count:
                    return out
        if not added:
            break
        k += 1
    log.info("long_ppl: %d window(s) of %d tokens (asked for %d)", len(out), length, count)
    return out


# --- losses -------------------------------------------------------------------------------------


def token_losses(model, ids, chunk: int = CHUNK):
    """Next-token losses of one window: ``ids`` (T,) -> (T - 1,) float32, entry ``p - 1`` being
    ``-log p(ids[p] | ids[:p])``.

    The window runs in chunks of ``chunk`` tokens, each on top of the cache the previous ones left
    (the student's recurrent state, the teacher's KV cache), so memory stays bounded by the chunk's
    logits (chunk, V) while every position sees its whole context.
    """
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    ids = ids.to(device)
    cache, losses = None, []
    with torch.no_grad():
        for start in range(0, len(ids) - 1, chunk):
            end = min(start + chunk, len(ids) - 1)
            pos = torch.arange(start, end, device=device)[None]  # (1, C)
            out = model(input_ids=ids[None, start:end], position_ids=pos, cache=cache, use_cache=True)
            cache = out.cache
            logits = out.logits[0].float()  # (C, V)
            losses.append(F.cross_entropy(logits, ids[start + 1 : end + 1], reduction="none"))  # (C,)
    return torch.cat(losses)  # (T - 1,)


def bucket_sums(losses, edges: tuple[int, ...] = EDGES) -> list[tuple[int, int, float, int]]:
    """(lo, hi, sum of losses, positions) of each bucket with at least one position; ``losses``
    (T - 1,) holds positions 1..T-1 (position 0 has no prediction)."""
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        part = losses[max(lo - 1, 0) : hi - 1]  # positions max(lo, 1) .. hi - 1
        if len(part):
            out.append((lo, hi, float(part.double().sum()), len(part)))
    return out


def evaluate(model, tokenizer, options: LongPplOptions) -> dict[str, Any]:
    """Mean loss per position bucket over the windows, in lm-eval's result layout.

    ``results.long_ppl`` holds ``loss`` (all positions) and ``loss_<bucket>`` (nats/token, lower is
    better); the top-level ``long_ppl`` entry holds the buckets' position counts and the windows.
    """
    import torch

    positions = getattr(model.config, "max_position_embeddings", None)
    length = options.tokens or DEFAULT_TOKENS
    if options.tokens is not None and positions is not None and options.tokens > positions:
        raise DistillError(f"--long-ppl-tokens {options.tokens} is above the model's max_position_embeddings "
                           f"({positions}); use at most {positions}")
    if positions is not None:
        length = min(length, positions)
    model.eval()
    chosen = windows(documents(options), tokenizer, length, options.docs)
    sums: dict[tuple[int, int], list[float]] = {}
    for name, ids in chosen:
        log.info("long_ppl: %s (%d tokens)", name, len(ids))
        for lo, hi, total, n in bucket_sums(token_losses(model, torch.tensor(ids))):
            acc = sums.setdefault((lo, hi), [0.0, 0])
            acc[0] += total
            acc[1] += n
    buckets = [{"name": bucket_name(lo, hi), "lo": lo, "hi": hi, "tokens": n, "loss": total / n}
               for (lo, hi), (total, n) in sums.items()]
    overall = sum(t for t, _ in sums.values()) / sum(n for _, n in sums.values())
    metrics = {"alias": TASK, "loss,none": overall} | {f"loss_{b['name']},none": b["loss"] for b in buckets}
    return {
        "results": {TASK: metrics},
        "higher_is_better": {TASK: {"loss": False} | {f"loss_{b['name']}": False for b in buckets}},
        "n-samples": {TASK: {"original": len(chosen), "effective": len(chosen)}},
        TASK: {"source": options.text or "King James Bible (Debian bible-kjv)", "window_tokens": len(chosen[0][1]),
               "windows": [name for name, _ in chosen], "buckets": buckets},
    }
