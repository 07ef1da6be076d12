"""Atomic writes to local files: a reader sees the old file or the whole new one, never a torn one, and once
a call returns the new bytes are on disk (fsynced file and directory), so a power loss cannot undo a commit.

Object stores get the same guarantee from a single PUT (see ``store.location``).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any


def fsync_dir(path: str | Path) -> None:
    """Persist a directory entry (a rename into it); silently skipped where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> bool:
    """Flush one file's data to disk; False if it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A unique temp name: two writers never share one, and resume cleans ``*.tmp`` leftovers by suffix.
    tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def json_bytes(obj: Any, indent: int = 1) -> bytes:
    return json.dumps(obj, indent=indent, sort_keys=True, default=str).encode()


def write_json_atomic(path: str | Path, obj: Any, indent: int = 1) -> None:
    write_bytes_atomic(path, json_bytes(obj, indent))


def replace_dir(tmp: str | Path, final: str | Path) -> None:
    """Move a fully written directory into place (the previous one, if any, is removed first)."""
    final = Path(final)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(final.parent)
