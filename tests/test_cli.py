"""The ``distill`` command line: light ``--help``, and how errors reach the user.

Bad input (:class:`DistillError`) is one line and exit code 2, a run that failed cleanly
(:class:`RunFailed`) one line and exit code 1; anything else is a bug, shown with its traceback
and exit code 1; ``--debug`` re-raises; Ctrl-C is exit code 130.
"""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from distill.cli import COMMANDS, build_parser, main
from distill.command_base import Command
from distill.errors import DistillError, RunFailed

HEAVY = ("torch", "transformers", "lm_eval", "scipy", "datasets")

HELP_SCRIPT = f"""
import sys
from distill.cli import COMMANDS, main
for argv in [["--help"]] + [[cls.name, "--help"] for cls in COMMANDS]:
    try:
        main(argv)
    except SystemExit as done:
        assert done.code == 0, (argv, done.code)
    else:
        raise AssertionError(f"{{argv}} did not exit")
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
"""


def test_every_command_has_help(capsys):
    for cls in COMMANDS:
        with pytest.raises(SystemExit) as done:
            main([cls.name, "--help"])
        assert done.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: distill {cls.name}") and cls.help in " ".join(out.split())
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    assert "transfer.steps" in capsys.readouterr().out  # the config keys, from the config dataclasses


class Fails(Command):
    """A command that raises whatever ``--raise`` names."""

    name = "fail"
    help = "raise an error"
    errors = {
        "distill": DistillError("--thing must be positive, got -1\nsecond line never shown"),
        "failed": RunFailed("the student's perplexity is nan after the transfer stage; lower transfer.lr"),
        "runtime": RuntimeError("tensor sizes do not match"),
        "interrupt": KeyboardInterrupt(),
    }

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--raise", dest="error", choices=sorted(Fails.errors), required=True, help="what to raise")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        raise Fails.errors[args.error]


def run_fails(args: list[str], capsys) -> tuple[int, str]:
    code = main(args, commands=(Fails,))
    return code, capsys.readouterr().err


def test_bad_input_is_one_line_exit_2(capsys):
    code, err = run_fails(["fail", "--raise", "distill"], capsys)
    assert code == 2
    assert err == "distill: error: --thing must be positive, got -1\n"


def test_failed_run_is_one_line_exit_1(capsys):
    code, err = run_fails(["fail", "--raise", "failed"], capsys)
    assert code == 1
    assert err == "distill: error: the student's perplexity is nan after the transfer stage; lower transfer.lr\n"


def test_other_exception_is_a_bug_with_traceback_exit_1(capsys):
    code, err = run_fails(["fail", "--raise", "runtime"], capsys)
    assert code == 1
    assert err.startswith("Traceback (most recent call last):")
    assert "RuntimeError: tensor sizes do not match" in err
    last = err.strip().splitlines()[-1]
    assert last == (
        "distill: internal error (a bug): RuntimeError: tensor sizes do not match; "
        "please report it with the traceback above"
    )


def test_interrupt_exits_130(capsys):
    code, err = run_fails(["fail", "--raise", "interrupt"], capsys)
    assert code == 130 and "interrupted" in err


@pytest.mark.parametrize("where", ["before", "after"], ids=["distill --debug fail", "distill fail --debug"])
@pytest.mark.parametrize("error, kind", [("distill", DistillError), ("runtime", RuntimeError)])
def test_debug_reraises(where, error, kind):
    args = ["fail", "--raise", error]
    args = ["--debug", *args] if where == "before" else [*args, "--debug"]
    with pytest.raises(kind):
        main(args, commands=(Fails,))


def test_a_command_name_given_twice_is_refused():
    with pytest.raises(ValueError, match="'fail' is listed twice"):
        build_parser((Fails, Fails))


def test_real_commands_report_bad_input_as_one_line(tmp_path, capsys):
    code = main(["eval", "model", "--tasks", "offline", "--out", str(tmp_path / "report.txt")])
    err = capsys.readouterr().err
    assert code == 2 and err == f"distill: error: --out must name a .json file, got {tmp_path / 'report.txt'}\n"
    code = main(["generate", str(tmp_path), "--prompt", "hi", "--max-new-tokens", "0"])
    assert code == 2 and capsys.readouterr().err == "distill: error: --max-new-tokens must be >= 1, got 0\n"


def test_help_imports_no_heavy_module():
    """``distill --help`` and every ``distill CMD --help`` print without torch, transformers, lm-eval."""
    done = subprocess.run([sys.executable, "-c", HELP_SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-500:]
