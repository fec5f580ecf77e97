"""Calibration and held-out token windows for ``distill convert``.

Sources (``data=``): ``wiki`` (offline Wikipedia summaries), ``self`` (the teacher samples its
own text: data-free), a local ``.txt``/``.jsonl`` file or a folder of them, or a Hugging Face
dataset name (``name`` or ``name:config``; needs the hub).

Held-out split, never trained on: every 10th document in a fixed order (for ``wiki``, its split
by title; for a dataset, every 10th row of one streaming pass); with fewer than 10 documents,
the last 10% of the token stream. Documents are joined
with the EOS token and cut into windows of ``seq_len`` tokens: train [N, T], held-out [M, T].
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..wiki import HELDOUT_EVERY, wiki_texts
from ..distributed import Comm
from ..errors import DistillError
from .run_config import RunConfig

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".jsonl")
ROUND = 64  # documents per rank per round of tokenisation


@dataclass
class TokenData:
    train: torch.Tensor  # (N, T) int64
    heldout: torch.Tensor  # (M, T) int64


Documents = tuple[list[str], list[str]]  # (train documents, held-out documents)


def _wiki(cfg: RunConfig) -> Documents:
    return wiki_texts("train"), wiki_texts("heldout")


def _split(docs: list[str], source: str) -> Documents:
    docs = [d.strip() for d in docs if d and d.strip()]
    if not docs:
        raise DistillError(f"{source} holds no text; give a non-empty .txt/.jsonl file or folder")
    if len(docs) < HELDOUT_EVERY:
        return docs, []  # split by tokens later
    return [d for i, d in enumerate(docs) if i % HELDOUT_EVERY], docs[::HELDOUT_EVERY]


def _read_file(path: Path, text_field: str) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise DistillError(f"cannot read data file {path} ({err.strerror or err}); check the path and its permissions") from None
    if path.suffix == ".txt":
        return text.split("\n\n")  # paragraphs are documents
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DistillError(f"{path}:{n} is not valid JSON; each .jsonl line must be an object") from None
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
            raise DistillError(f"{path}:{n} has no string field {text_field!r}; set text_field=NAME")
        docs.append(row[text_field])
    return docs


def _local(path: Path, text_field: str) -> Documents:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise DistillError(f"folder {path} has no .txt or .jsonl files")
    else:
        if path.suffix not in TEXT_SUFFIXES:
            raise DistillError(f"{path} is not a .txt or .jsonl file")
        files = [path]
    return _split([doc for f in files for doc in _read_file(f, text_field)], str(path))


def _hub_tokens(cfg: RunConfig, tokenizer) -> tuple[list[int], list[int]]:
    """Stream a Hugging Face dataset once: every 10th row is held out; stop when both budgets are met."""
    try:
        import datasets
    except ImportError:
        raise DistillError("data= a Hugging Face dataset needs the 'datasets' package (pip install datasets)") from None
    name = cfg.data
    repo, _, subset = name.partition(":")
    need = {"train": cfg.calib_sequences * cfg.seq_len, "heldout": cfg.heldout_sequences * cfg.seq_len}
    ids: dict[str, list[int]] = {"train": [], "heldout": []}
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    try:
        stream = datasets.load_dataset(repo, subset or None, split="train", streaming=True)
        for n, row in enumerate(stream):
            if not isinstance(row.get(cfg.text_field), str):
                raise DistillError(f"dataset {name} has no string field {cfg.text_field!r}; set text_field=NAME")
            split = "heldout" if n % HELDOUT_EVERY == 0 else "train"
            if len(ids[split]) < need[split] and row[cfg.text_field].strip():
                ids[split] += tokenizer(row[cfg.text_field], add_special_tokens=False)["input_ids"] + eos
            if all(len(ids[k]) >= need[k] for k in need):
                break
    except DistillError:
        raise
    except Exception as err:  # datasets raises many types (connection, not found, ...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DistillError(
            f"cannot load dataset {name!r} ({first}); give a local .txt/.jsonl file or folder, 'wiki' or 'self'"
        ) from None
    return ids["train"], ids["heldout"]


SOURCES: dict[str, Callable[[RunConfig], Documents]] = {"wiki": _wiki}


def is_local(source: str) -> bool:
    """True if ``data=source`` names a path (existing or not) rather than a hub dataset."""
    path = Path(source).expanduser()
    return path.exists() or path.suffix in TEXT_SUFFIXES + (".json",) or source.startswith((".", "/", "~"))


def load_documents(cfg: RunConfig) -> Documents:
    """Train and held-out documents of ``wiki`` or a local path."""
    if cfg.data in SOURCES:
        return SOURCES[cfg.data](cfg)
    path = Path(cfg.data).expanduser()
    if not path.exists():
        raise DistillError(f"data file {cfg.data} does not exist; check the path")
    return _local(path, cfg.text_field)


def _token_stream(docs: list[str], tokenizer, limit: int, comm: Comm | None = None) -> list[int]:
    """Token ids of ``docs`` joined by EOS, stopping after the document that brings them to
    ``limit``. With several ranks each tokenises every world-th document of a round of
    ``ROUND`` × world, and the rounds are gathered in document order: the ids one process gets."""
    comm = comm or Comm()
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    step = ROUND * comm.world
    for start in range(0, len(docs), step):
        chunk = docs[start : start + step]
        parts = comm.gather([tokenizer(d, add_special_tokens=False)["input_ids"] for d in chunk[comm.rank :: comm.world]])
        for j in range(len(chunk)):
            ids.extend(parts[j % comm.world][j // comm.world])
            if eos is not None:
                ids.append(eos)
            if len(ids) >= limit:
                return ids
    return ids


def _windows(ids: list[int], count: int, seq_len: int, what: str, source: str, key: str) -> torch.Tensor:
    have = len(ids) // seq_len
    if have < count:
        raise DistillError(
            f"data {source} gives {len(ids)} {what} tokens, fewer than {key}={count * seq_len} "
            f"({count} x seq_len {seq_len}); lower {key} or seq_len, or add data"
        )
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)


def tokenize(cfg: RunConfig, tokenizer, train_docs: list[str], heldout_docs: list[str], comm: Comm | None = None) -> TokenData:
    """Cut documents into train [N, T] and held-out [M, T] windows (tokenised over the ranks of ``comm``)."""
    n, m, T = cfg.calib_sequences, cfg.heldout_sequences, cfg.seq_len
    train_docs = list(train_docs)
    random.Random(cfg.seed).shuffle(train_docs)  # calibration text from all over the corpus
    if heldout_docs:
        train_ids = _token_stream(train_docs, tokenizer, n * T, comm)
        heldout_ids = _token_stream(heldout_docs, tokenizer, m * T, comm)
    else:  # few documents: the stream's last tenth is held out
        ids = _token_stream(train_docs, tokenizer, 10 * (n + m) * T, comm)
        cut = len(ids) - max(m * T, len(ids) // HELDOUT_EVERY)
        train_ids, heldout_ids = ids[:cut], ids[cut:]
    return windows(cfg, train_ids, heldout_ids)


def windows(cfg: RunConfig, train_ids: list[int], heldout_ids: list[int]) -> TokenData:
    n, m, T = cfg.calib_sequences, cfg.heldout_sequences, cfg.seq_len
    return TokenData(
        train=_windows(train_ids, n, T, "training", cfg.data, "calib_tokens"),
        heldout=_windows(heldout_ids, m, T, "held-out", cfg.data, "heldout_tokens"),
    )


@torch.no_grad()
def sample_self(cfg: RunConfig, model, tokenizer, batch: int = 8) -> TokenData:
    """The teacher writes its own calibration text (``data=self``): ancestral samples at
    temperature 1 from the BOS (or EOS) token; held-out windows use a different seed."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise DistillError("data=self needs a tokenizer with a BOS or EOS token to start sampling from")
    device = next(model.parameters()).device

    def draw(count: int, seed: int) -> torch.Tensor:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        rows = []
        for i in range(0, count, batch):
            b = min(batch, count - i)
            prompt = torch.full((b, 1), start, dtype=torch.long, device=device)
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=cfg.seq_len - 1,
                min_new_tokens=cfg.seq_len - 1,
                pad_token_id=tokenizer.pad_token_id,
            )
            rows.append(out[:, : cfg.seq_len].cpu())
            log.info("sampled %d/%d sequences", i + b, count)
        torch.random.set_rng_state(generator_state)
        return torch.cat(rows)

    return TokenData(train=draw(cfg.calib_sequences, cfg.seed), heldout=draw(cfg.heldout_sequences, cfg.seed + 1))


def prepare_data(cfg: RunConfig, model, tokenizer, comm: Comm | None = None) -> TokenData:
    """The run's token windows, the same on every rank of ``comm``: local text and ``wiki`` are
    tokenised over the ranks; ``self`` and hub datasets are made by rank 0 and sent to the others."""
    comm = comm or Comm()
    if cfg.data == "self" or (cfg.data not in SOURCES and not is_local(cfg.data)):
        data = None
        if comm.main:
            data = sample_self(cfg, model, tokenizer) if cfg.data == "self" else windows(cfg, *_hub_tokens(cfg, tokenizer))
        return comm.broadcast(data)
    train_docs, heldout_docs = load_documents(cfg)
    return tokenize(cfg, tokenizer, train_docs, heldout_docs, comm)
