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


class EvalCommand(Command):
    name = "eval"
    help = "score a model (and its teacher) with lm-eval; writes JSON and a Markdown table"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("model", metavar="MODEL_OR_DIR",
                            help="student: converted folder, HF folder, hub id, .gguf file or 'demo'")
        parser.add_argument("--teacher", metavar="MODEL", help="teacher to compare with (any MODEL form, GGUF included)")
        parser.add_argument("--tasks", required=True,
                            help="comma-separated lm-eval tasks or a suite: offline (no hub needed), zero-shot, mmlu")
        parser.add_argument("--include-path", metavar="DIR", help="extra folder of lm-eval task YAML files")
        parser.add_argument("--limit", type=int, help="score only the first N examples of each task (smoke tests)")
        parser.add_argument("--batch-size", type=int, default=8, help="examples per forward pass (default 8)")
        parser.add_argument("--max-length", type=int,
                            help="context window in tokens; rolling perplexity depends on it (default 2048, "
                                 "capped by the model's max_position_embeddings)")
        parser.add_argument("--dtype", default="float32", choices=DTYPES,
                            help="weights dtype of both models (default float32; bfloat16 is 2-3x faster on "
                                 "CPUs with AVX512-BF16 and moved the demo's perplexities by < 0.1%%)")
        parser.add_argument("--reuse", nargs="+", default=[], metavar="REPORT.json",
                            help="earlier distill eval reports: a model already scored there on these tasks (or, across "
                                 "several reports, on parts of them) with the same settings is not evaluated again")
        parser.add_argument("--out", required=True, type=Path, metavar="FILE.json",
                            help="report: JSON with every metric; the Markdown table goes beside it as FILE.md")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from .runner import run, write_report

        if args.out.suffix != ".json":
            raise DistillError(f"--out must name a .json file, got {args.out}")
        try:  # fail now, not after the models have been scored
            args.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DistillError(f"cannot create the folder of --out {args.out} ({err.strerror or err})") from None
        if not os.access(args.out.parent, os.W_OK):
            raise DistillError(f"cannot write --out {args.out}: its folder is not writable")
        report = run(
            {"student": args.model, "teacher": args.teacher},
            args.tasks,
            include_path=args.include_path,
            limit=args.limit,
            batch_size=args.batch_size,
            max_length=args.max_length,
            dtype=args.dtype,
            reuse=args.reuse,
        )
        md = write_report(report, args.out)
        log.info("\n%s", report["markdown"])
        log.info("wrote %s and %s", args.out, md)
        log.info("%s", report["summary"])
        return 0
