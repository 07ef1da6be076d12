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


def object_store_error(e: BaseException) -> tuple[str | None, int | None]:
    """(S3 error code, HTTP status) of an object-store failure, read from the botocore response that s3fs keeps
    as the exception's cause; (None, None) for other errors. Codes are the stable part: servers differ in the
    message text (Ceph radosgw sends none, where AWS and moto send a sentence)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        response = getattr(cur, "response", None)
        if isinstance(response, dict):
            err, meta = response.get("Error") or {}, response.get("ResponseMetadata") or {}
            return err.get("Code"), meta.get("HTTPStatusCode")
        cur = cur.__cause__ or cur.__context__
    return None, None


# S3 error codes that mean the request's credentials were refused (not the permissions of valid ones).
_BAD_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                    "TokenRefreshRequired", "AuthorizationHeaderMalformed"}


def is_precondition_failed(e: BaseException) -> bool:
    """A conditional write refused because its condition failed (``If-None-Match: *`` on an existing object).
    s3fs turns that into FileExistsError only when the server names the condition, as AWS does; radosgw
    answers a bare 412 PreconditionFailed, which s3fs passes on as a generic OSError."""
    if isinstance(e, FileExistsError):
        return True
    code, status = object_store_error(e)
    return code == "PreconditionFailed" or status == 412


def describe_io_error(e: BaseException) -> str:
    """The actual cause of a failed read or write, in words (disk full, permission, missing bucket, ...), so a
    message never guesses. Works for local OSErrors and for what s3fs/botocore raise."""
    import errno

    s3_code, status = object_store_error(e)
    text = str(e)
    if not text or text == "None":  # s3fs with a server that sends no message text
        text = s3_code or type(e).__name__
    code = getattr(e, "errno", None)
    if code == errno.ENOSPC:
        return "disk full"
    if code == errno.EDQUOT:
        return "disk quota exceeded"
    if code == errno.EROFS:
        return "read-only file system"
    name = type(e).__name__
    if s3_code == "NoSuchBucket":
        return f"bucket does not exist ({text})"
    if s3_code in _BAD_CREDENTIALS:
        return f"credentials rejected by the server ({s3_code})"
    if status == 403:  # a HEAD's 403 has no body to tell a wrong secret from a missing grant
        return f"access denied by the server: wrong credentials or no permission ({s3_code or text})"
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
