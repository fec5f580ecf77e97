"""Errors that reach the user as one line, not as a traceback: bad input exits 2, a run that
failed cleanly (its work so far kept) exits 1."""


class DistillError(ValueError):
    """Bad input: the message names the problem and the fix."""

    exit_code = 2


class RunFailed(DistillError):
    """A run that could not produce a usable result (e.g. a non-finite student); nothing bad was
    published and its checkpoints are intact. The message names the stage and the fix."""

    exit_code = 1
