"""Errors that reach the user as one line (exit code 2), not as a traceback."""


class DistillError(ValueError):
    """Bad input: the message names the problem and the fix."""
