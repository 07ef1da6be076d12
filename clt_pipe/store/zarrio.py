"""The one adapter over zarr internals that the store needs for speed, so a zarr upgrade touches one file.

Many chunks of several arrays go through one event-loop call (``zarr.core.sync.sync`` over the arrays'
``_async_array`` methods): zarr then encodes or decodes them concurrently on its own threads. One synchronous
zarr call per chunk from a thread pool round-trips through zarr's single event-loop thread instead: measured on
2 cores, reads 1.57 vs 1.14-1.29 GB/s and writes 1.2-1.5 vs ~1.05 GB/s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
import zarr
from zarr.core.buffer.cpu import NDBuffer
from zarr.core.sync import sync

# (array, row slice along axis 0, caller-owned buffer of exactly those rows)
RowBlock = tuple[zarr.Array, slice, np.ndarray]


def read_rows_into(blocks: list[RowBlock], after: Callable[[int], None] | None = None) -> None:
    """Decode every block straight into its buffer (no intermediate copy), all concurrently. ``after(i)`` runs
    in a worker thread as soon as block ``i`` is decoded (its exception is raised here): a check of the block
    then overlaps the other blocks' decoding and reads the buffer while it is still in cache."""
    for arr, _rows, out in blocks:
        if out.dtype != arr.dtype:  # zarr would convert values silently (uint16 bf16 bits into float16)
            raise TypeError(f"read_rows_into: {arr.path} is {arr.dtype}, the buffer {out.dtype}")

    async def read_one(i: int, arr: zarr.Array, rows: slice, out: np.ndarray):
        await arr._async_array.get_orthogonal_selection((rows,), out=NDBuffer.from_numpy_array(out))
        if after is not None:
            await asyncio.to_thread(after, i)

    async def read_all():
        await asyncio.gather(*(read_one(i, *block) for i, block in enumerate(blocks)))

    sync(read_all())


def write_rows(blocks: list[RowBlock]) -> None:
    """Encode and write every block, all concurrently."""

    async def write_all():
        await asyncio.gather(*(arr._async_array.setitem(rows, data) for arr, rows, data in blocks))

    sync(write_all())


def chunk_key(arr: zarr.Array, first_axis_chunk: int) -> str:
    """The store key of the chunk at ``first_axis_chunk`` along axis 0 (and 0 along the other axes, which the
    store's arrays never split), in the array's own chunk-key encoding."""
    coords = (first_axis_chunk,) + (0,) * (arr.ndim - 1)
    return f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}"
