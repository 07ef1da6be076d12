"""A cheap fingerprint of the bytes a harvest reads: the size of every image file plus a sample of contents.

``sources_sha256`` names the images (paths and labels); this says whether the files behind those names are
still the same bytes, so resuming a store from another tree of the same shape (other pixels under the same
file names) is refused. Cheap on purpose: one ``stat`` per file and at most SAMPLE_FILES files read (whole
when small, else SAMPLE_BLOCKS blocks spread over the file), so a 130k-image folder costs seconds. Sizes and
contents, not modification times, so a copy of the same data (``cp -r``, another host's mount) matches.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SAMPLE_FILES = 64
WHOLE_FILE_BYTES = 4 << 20
SAMPLE_BLOCKS, BLOCK_BYTES = 64, 64 << 10


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1  # unreadable or gone: the harvest itself names it (or skips it with --on-bad-image skip)


def _sample(path: Path, size: int) -> bytes:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            if size <= WHOLE_FILE_BYTES:
                h.update(fh.read())
            else:
                for k in range(SAMPLE_BLOCKS):
                    fh.seek((size - BLOCK_BYTES) * k // (SAMPLE_BLOCKS - 1))
                    h.update(fh.read(BLOCK_BYTES))
    except OSError:
        h.update(b"unreadable")
    return h.digest()


def content_sha256(files: list[Path]) -> str | None:
    """16 hex chars over the files' sizes (in order) and a spread-out sample of their bytes; None for a dataset
    without files (sklearn digits ships inside the package)."""
    if not files:
        return None
    h = hashlib.sha256()
    sizes = [_size(p) for p in files]
    h.update(",".join(map(str, sizes)).encode())
    n = len(files)
    picks = range(n) if n <= SAMPLE_FILES else sorted({i * (n - 1) // (SAMPLE_FILES - 1) for i in range(SAMPLE_FILES)})
    for i in picks:
        h.update(_sample(files[i], sizes[i]))
    return h.hexdigest()[:16]
