"""The project's error for a user's mistake: bad configuration, data, storage or study file.

Modules raise a subclass with a one-line message that names the thing and the fix; only cli.py
catches `FmsearchError`, prints that line and exits. Any other exception is a bug and keeps its
traceback.
"""


class FmsearchError(Exception):
    """A mistake the user can fix; the message names what was wrong and how to fix it."""


class ConfigError(FmsearchError, ValueError):
    """A training setting is out of its range, not one of its choices, or names an absent device."""


class StudyError(FmsearchError):
    """A study cannot run as asked (a changed study file, crashing trials, ...); the message says the fix."""


class UsageError(FmsearchError):
    """Command-line options that parse but cannot be used together or as given."""
