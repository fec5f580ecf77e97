"""Imports every module that registers a CLI subcommand."""
from .eval import command as _eval  # noqa: F401  distill eval
from .pipeline import command as _pipeline  # noqa: F401  distill convert, distill generate
