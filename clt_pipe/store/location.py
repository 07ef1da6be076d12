"""A store URL: the Zarr store for arrays plus an fsspec filesystem for the small side files.

Local paths and ``file://`` URLs use zarr's LocalStore (fast path, fsync available); anything else
(``s3://``, ``gs://``, ``memory://``) goes through fsspec, so object stores behave like a path.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import fsspec
import zarr
import zarr.storage

from clt_pipe.atomic import fsync_file, json_bytes, write_bytes_atomic
from clt_pipe.errors import CltPipeError, StoreError, describe_io_error


def is_backend_error(e: BaseException) -> bool:
    """An I/O failure of the file system or object store (not a bug): OSError, or botocore's own types."""
    return isinstance(e, OSError) or type(e).__module__.split(".")[0] in ("botocore", "aiobotocore")


def with_request_defaults(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` plus what keeps an object store at one request per object read. s3fs with
    ``max_concurrency`` > 1 (its default is 10) sends a HEAD before every whole-object GET, to see whether the
    object is large enough (> its 50 MB block size) to fetch in concurrent ranges: that doubled the requests of
    every chunk, metadata and commit-record read. Chunks are read many at a time already, so one GET each is
    the better trade. An explicit ``max_concurrency`` of the caller's wins."""
    opts = dict(storage_options or {})
    if url.split("://", 1)[0] in ("s3", "s3a"):
        opts.setdefault("max_concurrency", 1)
    return opts


class StoreLocation:
    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url
        self.is_local = "://" not in url or url.startswith("file://")
        if self.is_local:
            self.root = os.path.abspath(url.removeprefix("file://"))
            self.fs = fsspec.filesystem("file")
            self.storage_options = dict(storage_options or {})
        else:
            self.storage_options = with_request_defaults(url, storage_options)
            try:
                self.fs, self.root = fsspec.core.url_to_fs(url, **self.storage_options)
            except (ValueError, ImportError) as e:
                raise StoreError(f"{url}: unsupported store URL ({e})") from None

    @contextlib.contextmanager
    def errors(self, action: str):
        """Turn a backend failure inside the block into one StoreError line naming its actual cause."""
        try:
            yield
        except CltPipeError:
            raise
        except Exception as e:  # noqa: BLE001
            if not is_backend_error(e):
                raise
            raise StoreError(f"cannot {action} {self.url}: {describe_io_error(e)}") from None

    def zarr_store(self, read_only: bool = False) -> zarr.abc.store.Store:
        if self.is_local:
            return zarr.storage.LocalStore(self.root, read_only=read_only)
        return zarr.storage.FsspecStore.from_url(self.url, storage_options=self.storage_options,
                                                 read_only=read_only)

    def path(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/{key}"

    def exists(self, key: str = "") -> bool:
        return self.fs.exists(self.path(key) if key else self.root)

    def read_bytes(self, key: str) -> bytes:
        """A whole object in one request (``fs.open`` would first ask for its size)."""
        return self.fs.cat_file(self.path(key))

    def read_json(self, key: str) -> dict:
        try:
            return json.loads(self.read_bytes(key))
        except FileNotFoundError:
            raise
        except (ValueError, OSError) as e:
            raise StoreError(f"{self.url}: {key} is unreadable ({e})") from None

    def write_json_atomic(self, key: str, obj: dict) -> None:
        """Readers see the old file or the whole new one, never a torn one."""
        self.write_bytes_atomic(key, json_bytes(obj))

    def write_bytes_atomic(self, key: str, data: bytes) -> None:
        target = self.path(key)
        if self.is_local:
            write_bytes_atomic(target, data)
        else:
            # One PUT: object stores make a single-part upload visible atomically.
            self.fs.pipe_file(target, data)

    def listdir(self, key: str) -> list[str]:
        try:
            # refresh: s3fs would answer from a listing cached earlier in this process, which another process
            # may have changed since (a lock taken, a record committed)
            names = self.fs.ls(self.path(key), detail=False, refresh=True)
            return sorted(os.path.basename(p.rstrip("/")) for p in names)
        except FileNotFoundError:
            return []

    def remove(self, key: str) -> None:
        try:
            self.fs.rm(self.path(key), recursive=True)
        except FileNotFoundError:
            pass

    def remove_contents(self, keep: tuple[str, ...] = ()) -> None:
        """Everything under the root except the names in ``keep`` (the harvest lock its holder stands on)."""
        doomed = [self.path(name) for name in self.listdir("") if name not in keep]
        if doomed:  # one call: object stores delete up to 1000 keys per request
            try:
                self.fs.rm(doomed, recursive=True)
            except FileNotFoundError:
                pass

    def clean_temp_files(self, key: str) -> int:
        """Drop ``*.tmp`` leftovers of a killed atomic write; returns how many."""
        n = 0
        for name in self.listdir(key):
            if name.endswith(".tmp"):
                self.remove(f"{key}/{name}")
                n += 1
        return n

    def clean_partial_chunk_files(self) -> int:
        """Drop ``*.partial`` files that zarr's local store leaves when a chunk write is killed (it writes
        ``<chunk>.<uuid>.partial`` and renames). Never read, but they pile up across crashes. Local stores only:
        object stores have no partial objects."""
        if not self.is_local:
            return 0
        n = 0
        for dirpath, _dirs, files in os.walk(self.path("")):
            for name in files:
                if name.endswith(".partial"):
                    os.remove(os.path.join(dirpath, name))
                    n += 1
        return n

    def fsync_files(self, keys: list[str]) -> None:
        """Flush chunk files to disk before their commit record exists (power-loss safety on local disks)."""
        if not self.is_local:
            return
        for key in keys:
            fsync_file(self.path(key))  # False for an all-fill per-image chunk, which zarr does not write

