"""User-facing errors: one paragraph naming the bad value and the fix (see README "Errors")."""


class HarnessError(Exception):
    """An error caused by input or environment, reported to the user without a traceback."""

    exit_code = 2


class DatasetError(HarnessError):
    """A benchmark file is missing, corrupt or of the wrong version."""


class ConfigError(HarnessError):
    """A configuration value is invalid."""
