"""The one error type users see: a clear one-line message and a nonzero exit from the CLI."""


class DistillError(Exception):
    """Bad input or an unmet precondition; the message names what was wrong and what was expected."""
