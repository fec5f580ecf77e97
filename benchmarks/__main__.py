"""python -m benchmarks --out DIR [--quick] [--cases decode,prefill,...] [--student DIR] [--threads N]"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from . import model_cases, run_cases, kernels, ablations, distributed  # noqa: F401, I001  (registers cases; runs in this order)
from .runner import CASES, Context, run


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--out", required=True, type=Path, help="folder for results.json, results.md and plots")
    parser.add_argument("--quick", action="store_true", help="small sizes (minutes, not an hour)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of: {', '.join(CASES)}")
    parser.add_argument("--student", default=None, help="converted run folder: the student timed by decode/prefill (default: the demo model "
                        "converted, untrained; speed does not depend on the weights) and the run that "
                        "conversion/quality read (default runs/demo)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    run(names, Context(out=args.out, quick=args.quick, student_dir=args.student, threads=args.threads))
    logging.getLogger("benchmarks").info("wrote %s", args.out / "results.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
