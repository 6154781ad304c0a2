"""Errors that reach the user as one line (`error: seeds.jsonl:12: missing "instruction"`).

The CLI catches `DatagenError`, prints `error: <message>` and exits with `exit_code`;
anything else is a bug and keeps its traceback.
"""


class DatagenError(Exception):
    """A problem the user can fix: bad input, bad config, an unreachable teacher."""

    exit_code = 1


class InputError(DatagenError):
    """A malformed input file; the message names the file and line."""


class ConfigError(DatagenError):
    """A bad config key or value, or an unknown option; exits 2 like a usage error."""

    exit_code = 2


class TeacherError(DatagenError):
    """The teacher cannot be used at all: unreachable, unauthorised, not installed."""
