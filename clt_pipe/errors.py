"""One exception type for every user-facing failure.

The CLI turns a ``CltPipeError`` into one red line and exit code 2; anything else is a bug and keeps its
traceback.
"""


class CltPipeError(Exception):
    """Bad input or an unusable store/checkpoint; the message is shown to the user as one line."""


class ConfigError(CltPipeError):
    """A config key is unknown or its value is invalid; the message names the key."""


class StoreError(CltPipeError):
    """The activation store is missing, incomplete, of another format version, or inconsistent."""


class CheckpointError(CltPipeError):
    """A CLT checkpoint is missing, corrupt, or belongs to another configuration."""
