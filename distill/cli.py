"""``distill`` command line: one small class per subcommand, listed in :data:`COMMANDS`.

Exit codes: 0 done; 2 bad input (:class:`distill.errors.DistillError`) and 1 a run that failed
cleanly (:class:`distill.errors.RunFailed`), both shown as one line; 1 also for any other
exception, which is a bug: its traceback is shown with a line asking for a report; 130
interrupted. ``--debug`` re-raises instead, so every error shows its traceback.

Subcommand modules import only argparse-level code at the top, so ``distill --help`` does not
load torch, transformers or lm-eval; each command imports them inside ``run``.
"""
from __future__ import annotations

import argparse
import logging
import sys
import traceback

from .command_base import Command
from .errors import DistillError
from .eval.command import EvalCommand
from .pipeline.command import ConvertCommand, GenerateCommand

COMMANDS: tuple[type[Command], ...] = (ConvertCommand, GenerateCommand, EvalCommand)


def build_parser(commands: tuple[type[Command], ...] = COMMANDS) -> argparse.ArgumentParser:
    """The ``distill`` parser with one subparser per command; a name given twice is an error."""
    parser = argparse.ArgumentParser(prog="distill", description="Turn a transformer LM into a recurrent model.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug-level logging")
    sub = parser.add_subparsers(dest="command", required=True)
    seen: set[str] = set()
    for cls in commands:
        if cls.name in seen:
            raise ValueError(f"command {cls.name!r} is listed twice")
        seen.add(cls.name)
        p = sub.add_parser(cls.name, help=cls.help, description=cls.help)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        cls.add_arguments(p)
        p.set_defaults(_command=cls)
    return parser


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def main(argv: list[str] | None = None, commands: tuple[type[Command], ...] = COMMANDS) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the command, and return the exit code."""
    parser = build_parser(commands)
    args, extra = parser.parse_known_args(argv)
    if extra:
        collect = getattr(getattr(args, "_command", None), "extra_args", None)
        if collect is None or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        setattr(args, collect, list(getattr(args, collect) or []) + extra)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    debug = getattr(args, "debug", False)
    try:
        return args._command.run(args) or 0
    except KeyboardInterrupt:
        print("distill: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    except DistillError as err:
        if debug:
            raise
        print(f"distill: error: {_first_line(err)}", file=sys.stderr)
        return err.exit_code
    except Exception as err:
        if debug:
            raise
        traceback.print_exc()
        print(
            f"distill: internal error (a bug): {type(err).__name__}: {_first_line(err)}; "
            "please report it with the traceback above",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
