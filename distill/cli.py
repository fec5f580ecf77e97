"""``distill`` command line: one small class per subcommand, registered by name.

Bad input raises :class:`distill.errors.DistillError` (or ``ValueError``/``FileNotFoundError``)
and exits with code 2 and one line on stderr; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import ClassVar

COMMANDS: dict[str, type["Command"]] = {}


def register_command(cls: type["Command"]) -> type["Command"]:
    if cls.name in COMMANDS:
        raise ValueError(f"command {cls.name!r} is registered twice")
    COMMANDS[cls.name] = cls
    return cls


class Command:
    name: ClassVar[str]
    help: ClassVar[str]
    # Name of a positional ``nargs="*"`` argument that also collects trailing positionals given
    # after options (argparse alone rejects ``cmd X --opt v key=value``); None = no such argument.
    extra_args: ClassVar[str | None] = None

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None: ...

    @staticmethod
    def run(args: argparse.Namespace) -> int: ...


def _load_commands() -> None:
    # Each module registers its command on import; imported here so `import distill` stays light.
    import importlib

    for module in ("distill.commands",):
        importlib.import_module(module)


def build_parser() -> argparse.ArgumentParser:
    _load_commands()
    parser = argparse.ArgumentParser(prog="distill", description="Turn a transformer LM into a recurrent model.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug-level logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cls in COMMANDS.items():
        p = sub.add_parser(name, help=cls.help, description=cls.help)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        cls.add_arguments(p)
        p.set_defaults(_command=cls)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
    try:
        return args._command.run(args) or 0
    except KeyboardInterrupt:
        print("distill: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, OSError) as err:
        if getattr(args, "debug", False):
            raise
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"distill: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
