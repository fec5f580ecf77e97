"""Imports every module that registers a CLI subcommand."""
