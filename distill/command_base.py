"""The shape of a ``distill`` subcommand: one small class with its arguments and its ``run``.

This module imports nothing heavy, so that ``distill --help`` stays fast: each subcommand module
imports torch, transformers or lm-eval inside ``run``, never at the top.
"""
from __future__ import annotations

import argparse
from typing import ClassVar


class Command:
    """A subcommand of ``distill``; :mod:`distill.cli` lists the classes it offers."""

    name: ClassVar[str]
    help: ClassVar[str]
    # Name of a positional ``nargs="*"`` argument that also collects trailing positionals given
    # after options (argparse alone rejects ``cmd X --opt v key=value``); None = no such argument.
    extra_args: ClassVar[str | None] = None

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add this command's arguments to its subparser."""

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        """Do the work; return the exit code. Bad input raises :class:`distill.errors.DistillError`."""
        raise NotImplementedError
