"""The two checksums of the formats: crc32c of decoded array bytes (store chunks, commit records) and sha256 of
files (model weights, checkpoints, the exported CLT)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import crc32c as _crc32c
import numpy as np


def crc32c(data: np.ndarray | bytes) -> int:
    """crc32c of an array's bytes in C order (what a reader decodes), or of raw bytes."""
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).data
    return _crc32c.crc32c(data)


def file_sha256(path: str | Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
