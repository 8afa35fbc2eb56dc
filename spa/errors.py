"""User-facing errors of the SPA library: one paragraph naming the bad value and the fix.

The harness (``eval/``) reports every :class:`SPAError` without a traceback and exits with its
``exit_code``; ``eval.errors.HarnessError`` is this class, so the library needs nothing from ``eval``.
"""


class SPAError(Exception):
    """An error caused by input or environment, reported to the user without a traceback."""

    exit_code = 2


class ConfigError(SPAError):
    """A configuration value or argument is invalid."""
