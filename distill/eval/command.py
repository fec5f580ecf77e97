"""``distill eval``: lm-eval quality checks of a model, side by side with its teacher."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ..command_base import Command
from ..config import DTYPES
from ..errors import DistillError

log = logging.getLogger(__name__)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


class EvalCommand(Command):
    name = "eval"
    help = "score a model (and its teacher) with lm-eval; writes JSON and a Markdown table"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("model", metavar="MODEL_OR_DIR",
                            help="student: converted folder, HF folder, hub id, .gguf file or 'demo'")
        parser.add_argument("--teacher", metavar="MODEL", help="teacher to compare with (any MODEL form, GGUF included)")
        parser.add_argument("--tasks", required=True,
                            help="comma-separated lm-eval tasks or a suite: offline (no hub needed), long (passkey and "
                                 "long_ppl, no hub needed), zero-shot, mmlu")
        parser.add_argument("--include-path", metavar="DIR", help="extra folder of lm-eval task YAML files")
        parser.add_argument("--limit", type=int, help="score only the first N examples of each task (smoke tests)")
        parser.add_argument("--batch-size", type=int, default=8, help="examples per forward pass (default 8)")
        parser.add_argument("--max-length", type=int,
                            help="context window in tokens; rolling perplexity depends on it (default 2048, "
                                 "capped by the model's max_position_embeddings)")
        parser.add_argument("--dtype", default="float32", choices=DTYPES,
                            help="weights dtype of both models (default float32; bfloat16 is 2-3x faster on "
                                 "CPUs with AVX512-BF16 and moved the demo's perplexities by < 0.1%%)")
        parser.add_argument("--sparse-cache", type=int, metavar="M",
                            help="give the student a sparse global cache of M keys per kv head (LoLA; "
                                 "training-free; hybrids of the linear recurrence), whatever it was saved with")
        parser.add_argument("--reuse", nargs="+", default=[], metavar="REPORT.json",
                            help="earlier distill eval reports: a model already scored there on these tasks (or, across "
                                 "several reports, on parts of them) with the same settings is not evaluated again")
        parser.add_argument("--out", required=True, type=Path, metavar="FILE.json",
                            help="report: JSON with every metric; the Markdown table goes beside it as FILE.md "
                                 "(and, for the long suite, FILE_passkey.png and FILE_long_ppl.png)")
        long = parser.add_argument_group(
            "long suite",
            "passkey: a 5-digit key hidden in filler text at a relative depth, asked for at the end and answered by "
            "greedy generation through the model's cache; prompts are generated in code and measured in the "
            "student's tokens, and both models get the same ones. long_ppl: next-token loss by position bucket "
            "(0-64, 64-256, 256-1k, 1k-2k, 2k-4k, 4k-8k) on long documents.")
        long.add_argument("--passkey-lengths", type=_ints, metavar="N,N,...",
                          help="prompt lengths in tokens (default 512,1024,2048,4096,8192, capped at the model's "
                               "max_position_embeddings; a length above it is an error)")
        long.add_argument("--passkey-depths", type=_floats, default=(0.0, 0.25, 0.5, 0.75, 1.0), metavar="D,D,...",
                          help="relative depths of the key in the filler, 0 = start, 1 = end (default 0,0.25,0.5,0.75,1)")
        long.add_argument("--passkey-trials", type=int, default=5, metavar="N",
                          help="prompts per length and depth, each with its own key (default 5)")
        long.add_argument("--passkey-seed", type=int, default=0, metavar="N",
                          help="seed of the keys and the filler (default 0)")
        long.add_argument("--long-ppl-tokens", type=int, metavar="N",
                          help="tokens per long_ppl window (default 8192, capped at the model's max_position_embeddings)")
        long.add_argument("--long-ppl-docs", type=int, default=8, metavar="N",
                          help="long_ppl windows, one per document while they last (default 8)")
        long.add_argument("--long-text", metavar="FILE",
                          help="long_ppl documents: this plain-text file instead of the King James Bible (which is "
                               "fetched once from Debian with apt-get download, no root needed)")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from ..distributed import torchrun_ranks
        from .long_context import LongContextOptions
        from .long_ppl import LongPplOptions
        from .passkey import PasskeyOptions
        from .runner import run, write_report

        if args.out.suffix != ".json":
            raise DistillError(f"--out must name a .json file, got {args.out}")
        try:  # fail now, not after the models have been scored
            args.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DistillError(f"cannot create the folder of --out {args.out} ({err.strerror or err})") from None
        if not os.access(args.out.parent, os.W_OK):
            raise DistillError(f"cannot write --out {args.out}: its folder is not writable")
        long_context = LongContextOptions(
            PasskeyOptions(args.passkey_lengths, args.passkey_depths, args.passkey_trials, args.passkey_seed),
            LongPplOptions(args.long_ppl_tokens, args.long_ppl_docs, args.long_text),
        )
        with torchrun_ranks():
            report = run(
                {"student": args.model, "teacher": args.teacher},
                args.tasks,
                include_path=args.include_path,
                limit=args.limit,
                batch_size=args.batch_size,
                max_length=args.max_length,
                dtype=args.dtype,
                reuse=args.reuse,
                long_context=long_context,
                sparse_cache=args.sparse_cache,
            )
        if report is None:  # a torchrun rank other than 0
            return 0
        md = write_report(report, args.out)
        log.info("\n%s", report["markdown"])
        log.info("wrote %s and %s", args.out, md)
        log.info("%s", report["summary"])
        return 0
