"""Errors every layer may raise to the command line."""


class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit code 2."""
