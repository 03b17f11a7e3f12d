"""Exceptions that name what went wrong in the user's input, below every other module so any layer may raise them.

Every one is a ValueError, so library callers can catch them as such; the command line prints each as one
line and exits with status 2.
"""


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read or written; the message names the file or tensor."""


class UsageError(ValueError):
    """A command-line mistake (a bad flag value, a refused overwrite); the message says how to fix it."""


class StageError(RuntimeError):
    """A stage that started correctly but could not finish (non-finite training, a failed sub-stage); the message
    says why and what was kept. The command line prints it as one line and exits with status 1."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, after the stage saved what it could; the message says what was kept. Exit status 130."""
