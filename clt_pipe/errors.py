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


def describe_io_error(e: BaseException) -> str:
    """The actual cause of a failed read or write, in words (disk full, permission, missing bucket, ...), so a
    message never guesses. Works for local OSErrors and for what s3fs/botocore raise."""
    import errno

    text = str(e) or type(e).__name__
    code = getattr(e, "errno", None)
    if code == errno.ENOSPC:
        return "disk full"
    if code == errno.EDQUOT:
        return "disk quota exceeded"
    if code == errno.EROFS:
        return "read-only file system"
    name = type(e).__name__
    if "Credentials" in name or "credential" in text.lower() and "invalid" in text.lower():
        return f"no valid credentials ({text})"
    if isinstance(e, PermissionError) or code in (errno.EACCES, errno.EPERM):
        return f"permission denied ({text})"
    if isinstance(e, FileNotFoundError) and "bucket" in text.lower():
        return f"bucket does not exist ({text})"
    if isinstance(e, FileNotFoundError):
        return f"not found ({text})"
    if isinstance(e, IsADirectoryError):
        return f"is a directory ({text})"
    if isinstance(e, NotADirectoryError):
        return f"not a directory ({text})"
    return f"{name}: {text}"
