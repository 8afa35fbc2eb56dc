"""User-facing errors: one paragraph naming the bad value and the fix (see README "Errors").

The library's own errors are the harness's: ``HarnessError`` IS ``spa.errors.SPAError``, so the CLI
reports errors raised inside ``spa`` the same way.
"""

from spa.errors import ConfigError, SPAError as HarnessError

__all__ = ["ConfigError", "DatasetError", "HarnessError", "Interrupted"]


class DatasetError(HarnessError):
    """A benchmark file is missing, corrupt or of the wrong version."""


class Interrupted(HarnessError):
    """Ctrl-C during a run: the message says what was kept and that rerunning resumes."""

    exit_code = 130  # the shell's code for SIGINT
