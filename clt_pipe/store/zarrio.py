"""The one adapter over zarr internals that the store needs for speed, so a zarr upgrade touches one file.

Many chunks of several arrays go through one event-loop call (``zarr.core.sync.sync`` over the arrays'
``_async_array`` methods): zarr then encodes or decodes them concurrently on its own threads. One synchronous
zarr call per chunk from a thread pool round-trips through zarr's single event-loop thread instead: measured on
2 cores, reads 1.57 vs 1.14-1.29 GB/s and writes 1.2-1.5 vs ~1.05 GB/s.

A read of one whole chunk of a blosc array (every activation chunk the loader reads) skips zarr's codec
pipeline: the stored bytes come from the array's own store and blosc (numcodecs, what zarr's BloscCodec calls)
decompresses them straight into the caller's buffer. zarr decompresses into a fresh buffer and copies that into
the selection; the direct path saves the copy and lets the read check run on bytes still in cache, in the
thread that decoded them: window decode +25 %, loader epoch +26 % with checks on (2 cores,
benchmarks/bench_read_checks.py). At most zarr's own ``async.concurrency`` chunks are in flight, as in zarr's
reads. Anything else (partial chunks, other codecs, a missing chunk, which zarr fills) goes through zarr.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import sys

import numpy as np
import zarr
from numcodecs import blosc
from zarr.codecs import BloscCodec, BytesCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.array import AsyncArray
from zarr.core.buffer.cpu import NDBuffer
from zarr.core.group import AsyncGroup
from zarr.core.sync import sync
from zarr.storage import MemoryStore, StorePath

# (array, row slice along axis 0, caller-owned buffer of exactly those rows)
RowBlock = tuple[zarr.Array, slice, np.ndarray]


def read_rows_into(blocks: list[RowBlock], after: Callable[[int], None] | None = None) -> None:
    """Decode every block straight into its buffer (no intermediate copy), all concurrently. ``after(i)`` runs
    in a worker thread as soon as block ``i`` is decoded (its exception is raised here): a check of the block
    then overlaps the other blocks' decoding and reads the buffer while it is still in cache."""
    for arr, _rows, out in blocks:
        if out.dtype != arr.dtype:  # zarr would convert values silently (uint16 bf16 bits into float16)
            raise TypeError(f"read_rows_into: {arr.path} is {arr.dtype}, the buffer {out.dtype}")

    async def read_direct(i: int, arr: zarr.Array, rows: slice, out: np.ndarray, in_flight) -> bool:
        # At most zarr's own async.concurrency stored chunks are held at once, as in zarr's reads: a window
        # of compressed bytes fetched ahead of its decoding would otherwise sit in memory beside the window.
        async with in_flight:
            stored = await arr._async_array.store_path.store.get(
                chunk_key(arr, rows.start // arr.metadata.chunks[0]), prototype=default_buffer_prototype())
            if stored is None:
                return False

            def decode_then_check():
                _blosc_into(stored.as_numpy_array(), out)
                if after is not None:
                    after(i)

            await asyncio.to_thread(decode_then_check)
            return True

    async def read_one(i: int, arr: zarr.Array, rows: slice, out: np.ndarray, in_flight):
        if _is_whole_blosc_chunk(arr, rows, out) and await read_direct(i, arr, rows, out, in_flight):
            return
        await arr._async_array.get_orthogonal_selection((rows,), out=NDBuffer.from_numpy_array(out))
        if after is not None:
            await asyncio.to_thread(after, i)

    async def read_all():
        in_flight = asyncio.Semaphore(max(1, int(zarr.config.get("async.concurrency") or 10)))
        await asyncio.gather(*(read_one(i, *block, in_flight) for i, block in enumerate(blocks)))

    sync(read_all())


def _is_whole_blosc_chunk(arr: zarr.Array, rows: slice, out: np.ndarray) -> bool:
    """``rows`` is exactly one chunk (the whole of it, every other axis unsplit) of a bytes+blosc array whose
    little-endian bytes are ``out``'s native layout: then blosc can decode the stored bytes straight into it."""
    meta = arr.metadata
    codecs = getattr(meta, "codecs", ())
    if len(codecs) != 2 or not isinstance(codecs[0], BytesCodec) or not isinstance(codecs[1], BloscCodec):
        return False
    n = meta.chunks[0]
    return (rows.start % n == 0 and rows.stop - rows.start == n and tuple(meta.chunks[1:]) == arr.shape[1:]
            and out.shape == (n, *arr.shape[1:]) and out.dtype == arr.dtype and out.flags.c_contiguous
            and (sys.byteorder == "little" or out.dtype.itemsize == 1))


def _blosc_into(stored: np.ndarray, out: np.ndarray) -> None:
    """Decompress a blosc frame into ``out``, which it must fill exactly (a frame of another size is damage: a
    shorter one would leave stale bytes behind, which blosc allows). The frame's decoded size is bytes 4-7 of
    its 16-byte header, little-endian (c-blosc's README_HEADER; numcodecs reads it only privately)."""
    if stored.size < 16:
        raise ValueError(f"blosc frame of {stored.size} bytes is shorter than its header")
    nbytes = int(stored[4:8].view("<u4")[0])
    if nbytes != out.nbytes:
        raise ValueError(f"blosc frame holds {nbytes} bytes, the chunk is {out.nbytes}")
    blosc.decompress(stored, out)


def write_rows(blocks: list[RowBlock]) -> None:
    """Encode and write every block, all concurrently."""

    async def write_all():
        await asyncio.gather(*(arr._async_array.setitem(rows, data) for arr, rows, data in blocks))

    sync(write_all())


def chunk_key(arr: zarr.Array, first_axis_chunk: int) -> str:
    """The store key of the chunk at ``first_axis_chunk`` along axis 0 (and 0 along the other axes, which the
    store's arrays never split), in the array's own chunk-key encoding."""
    coords = (first_axis_chunk,) + (0,) * (arr.ndim - 1)
    key = arr.metadata.encode_chunk_key(coords)
    return f"{arr.path}/{key}" if arr.path else key


class StagedNodes:
    """Groups and arrays made by zarr's own calls in memory, then written to the real store as documents (and
    any chunks of arrays made with data) in concurrent batches, one PUT each.

    Made in the real store, each array costs zarr an existence check of the node and a read-then-write of every
    parent group's ``zarr.json`` (``ensure_parents``): about ten requests per array on S3, for 15-20 arrays per
    store. Made here, the documents are byte for byte what zarr writes, and the arrays open on the real store
    from the metadata already in hand (``array_on``), so nothing is read back either. The memory root's
    ``zarr.json`` is only written where a caller names it: a batch that adds to an existing store leaves the
    real root as it is."""

    ROOT = "zarr.json"

    def __init__(self, root_attributes: dict | None = None):
        self._objects: dict = {}
        self.root = zarr.open_group(MemoryStore(store_dict=self._objects), mode="w", zarr_format=3,
                                    attributes=root_attributes or {})

    def keys(self, under: str = "") -> list[str]:
        """Every object made (documents and chunks), sorted; ``under``: only those below that node."""
        prefix = f"{under.strip('/')}/" if under else ""
        return sorted(k for k in self._objects if k.startswith(prefix))

    def write(self, store: zarr.abc.store.Store, keys: list[str]) -> None:
        """Put these objects into ``store`` under the same keys, all concurrently."""
        items = [(k, self._objects[k]) for k in keys]

        async def put_all():
            await asyncio.gather(*(store.set(k, v) for k, v in items))

        if items:
            sync(put_all())

    def array_names(self) -> list[str]:
        nodes = [k.removesuffix("/zarr.json") for k in self._objects if k.endswith("/zarr.json")]
        return sorted(n for n in nodes if isinstance(self.root.get(n), zarr.Array))

    def array_on(self, store: zarr.abc.store.Store, name: str) -> zarr.Array:
        """The array ``name`` as made here, bound to ``store``: its metadata is known, nothing is read."""
        return zarr.Array(AsyncArray(self.root[name].metadata, StorePath(store, name)))

    def group_on(self, store: zarr.abc.store.Store) -> zarr.Group:
        """The root group as made here, bound to ``store``."""
        return zarr.Group(AsyncGroup(self.root.metadata, StorePath(store, "")))


def open_arrays(store: zarr.abc.store.Store, names: list[str]) -> dict[str, zarr.Array]:
    """Existing v3 arrays of ``store``, each opened with one read of its ``zarr.json``, all concurrently (a
    group lookup reads the same document, one array at a time). A missing array raises KeyError naming it."""

    async def open_one(name: str):
        try:
            return await AsyncArray.open(StorePath(store, name), zarr_format=3)
        except FileNotFoundError:
            raise KeyError(name) from None

    async def open_all():
        return await asyncio.gather(*(open_one(n) for n in names))

    return {n: zarr.Array(a) for n, a in zip(names, sync(open_all()))}
