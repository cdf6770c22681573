"""Errors that reach the user as one line instead of a traceback.

The CLI catches `GannetError` and prints its message; the exit code tells scripts (and Slurm
requeue logic) whether retrying can help: 2 = the input is wrong, 1 = the run failed.
"""


class GannetError(Exception):
    """A failure the user can act on; its message is the whole report."""

    exit_code = 1


class ConfigError(GannetError):
    """A bad config key, value or path: fix the command line or the YAML."""

    exit_code = 2


class DataError(GannetError):
    """The data stream cannot go on (missing shards, error budget spent, too few shards)."""


class CheckpointError(GannetError):
    """No usable checkpoint where one is needed, or one that cannot be read."""
