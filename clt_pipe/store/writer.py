"""Create (or reopen for resume) a v1 store and write it shard by shard.

Protocol (storage/FORMAT.md, "Commit protocol"): arrays are created once at their final size with a NaN
fill; a shard's chunks, per-image rows and moments are written and flushed, then ``commits/shard-N.json``
(per-chunk crc32c of the decoded bytes) is written atomically. ``COMPLETE.json`` is written last, after
the merged statistics and ``images.parquet``. Until then no reader treats the store as complete.
"""

from __future__ import annotations

import datetime as _dt
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from clt_pipe import __version__
from clt_pipe.checksums import crc32c, sha256_bytes
from clt_pipe.errors import StoreError
from clt_pipe.store import commits
from clt_pipe.store import format as F
from clt_pipe.store import identity
from clt_pipe.store.identity import IDENTITY_KEYS, fingerprint
from clt_pipe.store import lock as store_lock
from clt_pipe.store.location import StoreLocation
from clt_pipe.store.meta import StoreMeta
from clt_pipe.store.shardmoments import ShardMomentsMerge
from clt_pipe.store.stats import Moments
from clt_pipe.store.timing import StageTimes
from clt_pipe.store.zarrio import StagedNodes, chunk_key, open_arrays, write_rows

# Identity fields added after stores were already written; a store that lacks them was written before.
LATER_IDENTITY_FIELDS = {"activations": ("forward_precision",), "dataset": ("content_sha256",)}


def as_written_before(meta: dict, old: dict) -> dict:
    """``meta`` without the identity fields ``old`` (an existing store's description) predates, so that a
    store from an older writer is still recognised as the same harvest (resume, re-run of a pipeline)."""
    out = dict(meta)
    for key, fields in LATER_IDENTITY_FIELDS.items():
        missing = [f for f in fields if f not in (old.get(key) or {})]
        if missing:
            out[key] = {k: v for k, v in meta[key].items() if k not in missing}
    return out


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _describe_difference(old: dict, new: dict) -> str:
    diffs = []
    for key in IDENTITY_KEYS:
        if old.get(key) != new.get(key):
            o, n = old.get(key) or {}, new.get(key) or {}
            sub = [k for k in sorted(set(o) | set(n)) if o.get(k) != n.get(k) and k not in ("model_arg", "data_root")]
            if sub:
                diffs.append(", ".join(f"{key}.{k} {o.get(k)!r} != {n.get(k)!r}" for k in sub[:2]))
    return "; ".join(diffs) or "its settings differ"


def refuse_foreign_entries(loc: StoreLocation, url: str) -> None:
    """Replacing a store deletes the store, never what someone else put inside its folder or prefix."""
    foreign = [n for n in loc.listdir("") if n not in F.STORE_ENTRIES and not n.endswith(".tmp")]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise StoreError(f"{url} also holds {shown}, which are not part of the store; move them out before "
                         f"replacing the store (nothing was deleted)")


WRITE_GROUPS_IN_FLIGHT = 2  # at most 2 x write_threads full chunks wait in memory
# fsyncs issued concurrently: the file system flushes them in one journal commit instead of one round trip per
# file (24 small files of a commit, shared 2-core VM disk: 29-337 ms one by one, 2-57 ms on 8 threads).
FSYNC_THREADS = 8


def default_write_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _create_arrays(g: zarr.Group, meta: StoreMeta) -> None:
    """Every array of a new store, at its final size with its fill value (storage/FORMAT.md, "Arrays")."""
    lay, dtype = meta.layout, meta.activations.dtype
    n_img, ipc = lay.n_images, lay.images_per_chunk
    for name in meta.activation_arrays:
        g.create_array(name, shape=(lay.n_tokens, lay.n_layers, lay.d_model),
                       chunks=(lay.rows_per_chunk, lay.n_layers, lay.d_model),
                       dtype=F.storage_dtype(dtype), fill_value=F.activation_fill(dtype),
                       compressors=F.compressors_for(meta.activations.compressor),
                       dimension_names=("token", "layer", "dim"))
    d, e, T = lay.d_model, meta.model.embed_dim, lay.tokens_per_image
    if meta.recompute:  # one chunk per shard, like the moments
        g.create_array(F.MLP_OUT_CHECK, shape=(lay.n_shards, T, lay.n_layers, d), chunks=(1, T, lay.n_layers, d),
                       dtype=F.storage_dtype(dtype), fill_value=F.activation_fill(dtype))
    specs = {
        F.RESID_FINAL: ((n_img, d), (ipc, d), "float32", float("nan")),
        F.EMBEDDING: ((n_img, e), (ipc, e), "float32", float("nan")),
        F.LABELS: ((n_img,), (ipc,), "int32", -1),
        F.TOKEN_INDEX: ((n_img, T), (ipc, T), "int16", -1),
        F.IMAGE_OK: ((n_img,), (ipc,), "uint8", 0),
    }
    for name, (shape, chunks, dt, fill) in specs.items():
        g.create_array(name, shape=shape, chunks=chunks, dtype=dt, fill_value=fill)
    stats = g.create_group(F.STATS_GROUP)
    for side in ("in", "out"):
        # One chunk per shard: concurrent writers never share a chunk.
        stats.create_array(f"shard_moments_{side}", shape=(lay.n_shards, 2, lay.n_layers, d),
                           chunks=(1, 2, lay.n_layers, d), dtype="float64", fill_value=float("nan"))
    stats.create_array("shard_count", shape=(lay.n_shards,), chunks=(1,), dtype="int64", fill_value=-1)


class StoreWriter:
    def __init__(self, loc: StoreLocation, meta: StoreMeta, group: zarr.Group, write_threads: int = 0):
        self.loc = loc
        self.meta = meta
        self.group = group
        self.layout = meta.layout
        self.dtype = meta.activations.dtype
        self.fingerprint = meta.fingerprint
        self.write_threads = write_threads or default_write_threads()
        self.act_names = meta.activation_arrays
        self.recompute = meta.recompute
        # zarr's default scans every chunk for all-fill values (NaN-aware) on its one event-loop thread before
        # writing it: measured 214 -> 861 MB/s single-threaded without the scan. Activation chunks are never
        # all-fill, so the scan buys nothing. (Runtime config, not stored: set on every open, resume included.)
        self._act: dict[str, zarr.Array] = {}
        self._arrays: dict[str, zarr.Array] = {}
        self._pool: ThreadPoolExecutor | None = None
        # Groups of up to write_threads chunks being written at once: bounds the memory held by full chunks.
        self._in_flight = threading.BoundedSemaphore(WRITE_GROUPS_IN_FLIGHT)
        self.times = StageTimes()  # per-stage seconds of this writer (and of the harvest loop feeding it)
        self._fsync_pool: ThreadPoolExecutor | None = None
        self._fsync_lock = threading.Lock()
        self._lock: store_lock.HarvestLock | None = None
        # What this writer made or committed itself, so that finalize need not read it back from the store:
        # every request costs a round trip on an object store (see docs/DECISIONS.md, "S3 at S3's pace").
        self.created = False  # the store was made by this writer: nothing else is in it
        self._records: dict[int, dict] = {}  # commit records this writer wrote
        self._moments = ShardMomentsMerge(self.layout.n_shards, (self.layout.n_layers, self.layout.d_model))
        self._final_crcs: dict[str, int] = {}  # crc32c of finalised arrays this writer wrote, by path
        self._records_lock = threading.Lock()
        self._text_arrays: list[str] | None = None  # the classifier arrays, when this writer made them all

    def release_lock(self) -> None:
        """Let another harvest open this store (idempotent)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def array(self, name: str) -> zarr.Array:
        """An array of the group, opened once (each open reads its metadata from the store; the arrays this
        writer made are opened from the metadata it made them with)."""
        if name not in self._arrays:
            self._arrays.update(open_arrays(self.group.store, [name]))
        return self._arrays[name]

    def activation_array(self, name: str) -> zarr.Array:
        if name not in self._act:
            self._act[name] = self.array(name).with_config({"write_empty_chunks": True})
        return self._act[name]

    def submit_write(self, fn, *args) -> Future:
        """Run a group of chunks' compression + write + checksums off the caller's thread (one thread writing
        chunk by chunk managed ~135-330 MB/s, far below what a GPU harvest produces). Blocks while
        WRITE_GROUPS_IN_FLIGHT groups are already in flight."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(WRITE_GROUPS_IN_FLIGHT, thread_name_prefix="clt-chunks")
        with self.times.stage("wait: write slot (chunk pool busy)"):
            self._in_flight.acquire()
        try:
            fut = self._pool.submit(fn, *args)
        except BaseException:
            self._in_flight.release()
            raise
        fut.add_done_callback(lambda _: self._in_flight.release())
        return fut

    def close(self, cancel: bool = False) -> None:
        """Wait for the writer pool to finish; ``cancel`` drops chunks not yet started (after a failure, so
        no write of this harvest lands after it has returned)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=cancel)
            self._pool = None
        if self._fsync_pool is not None:
            self._fsync_pool.shutdown(wait=True)
            self._fsync_pool = None

    def fsync_files(self, keys: list[str]) -> None:
        """``loc.fsync_files``, the files flushed concurrently."""
        if len(keys) <= 1 or not self.loc.is_local:
            self.loc.fsync_files(keys)
            return
        with self._fsync_lock:  # chunk-write threads and the commit thread both get here
            if self._fsync_pool is None:
                self._fsync_pool = ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="clt-fsync")
            pool = self._fsync_pool
        for _ in pool.map(lambda key: self.loc.fsync_files([key]), keys):
            pass  # re-raises the first failure

    # ---- opening -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, url: str, meta: StoreMeta | dict, *, overwrite: bool = False, storage_options: dict | None = None,
             clean_temp: bool = True, write_threads: int = 0) -> "StoreWriter":
        """Create the store, or reopen an identical one for resume; refuse a different one.

        ``clean_temp=False`` for the extra writers of a multi-writer harvest: only the coordinating process
        may remove stray temp files, or one worker could delete another's in-flight commit. The coordinating
        writer (``clean_temp=True``) holds the store's harvest lock (store/lock.py) until ``release_lock``;
        a second harvest of the same store is refused in one line.
        """
        loc = StoreLocation(url, storage_options)
        with loc.errors("open"):
            if not overwrite and StagedNodes.ROOT not in loc.listdir(""):
                cls._refuse_foreign(loc, url)  # before the lock, so a refused run leaves not even a lock file
        lock = store_lock.acquire(loc) if clean_temp else None
        try:
            with loc.errors("open"):
                writer = cls._open(loc, url, meta, overwrite=overwrite, clean_temp=clean_temp,
                                   write_threads=write_threads)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        writer._lock = lock
        return writer

    @staticmethod
    def _refuse_foreign(loc: StoreLocation, url: str) -> None:
        """Local folder or object-store prefix alike: never write into (or delete) what someone else put there."""
        if [n for n in loc.listdir("") if n != store_lock.LOCK_FILE]:
            raise StoreError(f"{url} exists, is not empty and is not a clt-pipe store; pass --overwrite to replace it")

    @classmethod
    def _open(cls, loc: StoreLocation, url: str, meta: StoreMeta | dict, *, overwrite: bool, clean_temp: bool,
              write_threads: int) -> "StoreWriter":
        if not isinstance(meta, StoreMeta):
            meta = StoreMeta.from_dict(meta)
        version = F.version_for("recompute" if meta.recompute else "stored")
        meta = meta.replace(format_version=version, fingerprint=fingerprint(meta))
        names = [n for n in loc.listdir("") if n != store_lock.LOCK_FILE]  # one listing, after the lock
        if StagedNodes.ROOT in names:
            try:
                old = zarr.open_group(loc.zarr_store(read_only=True), mode="r", zarr_format=3).attrs.get(F.ATTRS_KEY)
            except Exception as e:  # noqa: BLE001 - any unreadable root is "not ours"
                old, err = None, e
            else:
                err = None
            if not overwrite:
                problem = identity.description_problem(old) if old is not None else None
                if problem:
                    raise StoreError(f"{url}: {problem}")
                if old is None:
                    raise StoreError(f"{url} exists and is not a clt-pipe store"
                                     f"{f' ({err})' if err else ''}; pass --overwrite to replace it")
                if old.get("format_version") != version:
                    raise StoreError(f"{url} is store format v{old.get('format_version')}, this harvest writes "
                                     f"v{version}; pass --overwrite to replace it")
                if old.get("fingerprint") != meta.fingerprint and old.get("fingerprint") == fingerprint(
                        as_written_before(meta.to_dict(), old)):
                    meta = meta.replace(fingerprint=old["fingerprint"])  # same harvest, from an older writer
                if old.get("fingerprint") != meta.fingerprint:
                    raise StoreError(f"{url} holds a different harvest ({_describe_difference(old, meta.to_dict())}); "
                                     f"pass --overwrite to replace it or choose another --store")
                if old.get("initialised", True):
                    group = zarr.open_group(loc.zarr_store(), mode="r+", zarr_format=3)
                    writer = cls(loc, StoreMeta.from_dict(old), group, write_threads)
                    if clean_temp:
                        loc.clean_temp_files(F.COMMITS_DIR)
                        loc.clean_temp_files("")
                        loc.clean_partial_chunk_files()
                    return writer
                # Killed while creating the arrays: nothing can be committed yet, so start afresh.
            refuse_foreign_entries(loc, url)
            loc.remove_contents(keep=(store_lock.LOCK_FILE,))
        elif names:
            if not overwrite:
                cls._refuse_foreign(loc, url)
            loc.remove_contents(keep=(store_lock.LOCK_FILE,))
        meta = meta.replace(created=now(), tool_version=__version__)
        # The group and its arrays are made in memory and written as documents (zarrio.StagedNodes): the root
        # first with "initialised" false, then every array, then the root again with it true, so a kill in
        # between is recognisable. Writing the root document itself (never zarr's mode "w") leaves everything
        # else under the prefix alone, the lock included.
        staged = StagedNodes({F.ATTRS_KEY: identity.seal(meta.replace(initialised=False).to_dict())})
        _create_arrays(staged.root, meta)
        store = loc.zarr_store()
        staged.write(store, [StagedNodes.ROOT])
        staged.write(store, [k for k in staged.keys() if k != StagedNodes.ROOT])
        meta = meta.replace(initialised=True)
        staged.root.attrs[F.ATTRS_KEY] = identity.seal(meta.to_dict())
        staged.write(store, [StagedNodes.ROOT])
        writer = cls(loc, meta, staged.group_on(store), write_threads)
        writer._arrays = {name: staged.array_on(store, name) for name in staged.array_names()}
        writer.created = True
        return writer

    def missing_constants(self, template_sets: list[str]) -> bool:
        if self.created:
            return True
        g = self.group
        if F.HEAD_GROUP not in g or F.TEXT_GROUP not in g:
            return True
        have_head = set(g[F.HEAD_GROUP].array_keys()) >= {"ln_post_weight", "ln_post_bias", "proj"}
        if self.recompute and (F.MLP_GROUP not in g
                               or set(g[F.MLP_GROUP].attrs.get("crc32c", {})) != set(F.MLP_WEIGHTS)):
            return True
        return not have_head or not set(template_sets) <= set(g[F.TEXT_GROUP].array_keys())

    def write_constants(self, head: dict[str, np.ndarray], text: dict[str, np.ndarray],
                        mlp: dict[str, np.ndarray] | None = None) -> None:
        """Model pieces that analysis needs without the model: ln_post, proj, zero-shot classifier; and, when
        targets are recomputed, every layer's MLP weights (``mlp``; written before any shard is committed)."""
        # Made in memory and written as objects (zarrio.StagedNodes). The arrays' chunk keys are the same
        # whatever was there before (one chunk grid per model), so a rewrite replaces every object it needs.
        staged, store = StagedNodes(), self.group.store
        if self.recompute:
            if mlp is None:
                raise ValueError("a store with recomputed targets needs the MLP weights")
            mg = staged.root.create_group(F.MLP_GROUP)
            crcs = {}
            for name, arr in mlp.items():  # one uncompressed chunk each: float32 weights do not compress
                arr = np.ascontiguousarray(arr, np.float32)
                mg.create_array(name, data=arr, chunks=arr.shape, compressors=None)
                crcs[name] = crc32c(arr)
            staged.write(store, [k for k in staged.keys(F.MLP_GROUP) if k != f"{F.MLP_GROUP}/zarr.json"])
            # Checksums last: readers refuse weights without them or not matching them (a lost chunk file
            # would otherwise read back as zeros and silently give wrong targets).
            self.loc.fsync_files([chunk_key(mg[name], 0) for name in mlp])
            mg.attrs["crc32c"] = crcs
            staged.write(store, [f"{F.MLP_GROUP}/zarr.json"])
            self._final_crcs.update({f"{F.MLP_GROUP}/{k}": v for k, v in crcs.items()})
        hg = staged.root.create_group(F.HEAD_GROUP)
        for name, arr in head.items():
            hg.create_array(name, data=np.asarray(arr, np.float32))
        tg = staged.root.create_group(F.TEXT_GROUP)
        for name, arr in text.items():
            tg.create_array(name, data=np.asarray(arr, np.float32))
        staged.write(store, staged.keys(F.HEAD_GROUP) + staged.keys(F.TEXT_GROUP))
        if self.created:  # then these are all the head and classifier arrays there are
            self._final_crcs.update(_crcs_of(staged, [f"{F.HEAD_GROUP}/{k}" for k in head]
                                             + [f"{F.TEXT_GROUP}/{k}" for k in text]))
            self._text_arrays = sorted(text)

    # ---- commits -------------------------------------------------------------------------------------
    def committed_shards(self) -> set[int]:
        if self.created:  # nothing is committed but what this writer committed
            return set(self._records)
        return set(commits.committed_shards(self.loc, self.fingerprint))

    def is_complete(self) -> bool:
        if self.created and len(self._records) < self.layout.n_shards:
            return False
        return commits.is_complete(self.loc, self.fingerprint, self.layout.n_shards)

    def _committed(self, record: dict, moments: dict[str, np.ndarray], count: int) -> None:
        """A shard of this writer is committed: keep what finalize would otherwise read back."""
        with self._records_lock:
            self._records[record["shard"]] = record
        self._moments.add(record["shard"], count, moments["in"], moments["out"])

    def _commit_records(self) -> dict[int, dict]:
        """Every commit record of this store that is there now: this writer's own from memory, the others (an
        earlier run's, other workers') read. One listing either way, so a record gone from the store counts
        as missing here too."""
        there = set(commits.listed_shards(self.loc))
        with self._records_lock:
            mine = {s: r for s, r in self._records.items() if s in there}
        rest = there - set(mine)
        others = commits.commit_records(self.loc, self.fingerprint, only=rest) if rest else {}
        return {**others, **mine}

    def shard(self, shard: int) -> "ShardWriter":
        return ShardWriter(self, shard)

    # ---- finalisation --------------------------------------------------------------------------------
    def finalize(self, records: list, split: str) -> dict:
        """Merge shard moments, write images.parquet, then COMPLETE.json (last)."""
        self.close()
        lay = self.layout
        recs = self._commit_records()
        missing = sorted(set(range(lay.n_shards)) - set(recs))
        if missing:
            raise StoreError(f"{self.loc.url}: cannot finalise, shards {missing[:5]} are not committed")
        merged, moment_crcs = self._moments.finish(self._read_shard_moments)
        self._final_crcs.update({f"{F.STATS_GROUP}/{k}": v for k, v in moment_crcs.items()})
        # The statistics group is rewritten whole: its document only ever holds the count attribute.
        staged = StagedNodes()
        stats = staged.root.create_group(F.STATS_GROUP, attributes={"count": int(merged["in"].count)})
        for side in ("in", "out"):
            stats.create_array(f"mean_{side}", data=merged[side].mean)
            stats.create_array(f"var_{side}", data=merged[side].var)
        names = [f"{F.STATS_GROUP}/{k}" for k in F.STATS_ARRAYS]
        staged.write(self.group.store, [k for n in names for k in staged.keys(n)])
        staged.write(self.group.store, [f"{F.STATS_GROUP}/zarr.json"])
        self._final_crcs.update(_crcs_of(staged, names))
        skipped: dict[int, str] = {}
        for s in range(lay.n_shards):
            skipped.update({int(k): v for k, v in recs[s].get("skipped", {}).items()})
        parquet_sha = self._write_images_parquet(records, split, skipped)
        summary = {"fingerprint": self.fingerprint, "n_shards": lay.n_shards, "n_images": lay.n_images,
                   "n_tokens": lay.n_tokens, "n_valid_tokens": int(merged["in"].count),
                   "n_skipped_images": len(skipped), "finished": now(),
                   "checksums": {"arrays": self._final_array_crcs(), "files": {F.IMAGES_PARQUET: parquet_sha}}}
        summary = identity.seal_record(summary)
        self.loc.write_json_atomic(F.COMPLETE_FILE, summary)
        return summary

    def _write_images_parquet(self, records: list, split: str, skipped: dict[int, str]) -> None:
        lay = self.layout
        n = lay.n_images
        idx = np.arange(n, dtype=np.int64)
        table = pa.table({
            "image": idx,
            "row_start": idx * lay.tokens_per_image,
            "shard": (idx // lay.images_per_shard).astype(np.int32),
            "source": pa.array([r.source for r in records], pa.string()),
            "label": pa.array([r.label for r in records], pa.int32()),
            "labels": pa.array([list(r.labels or (r.label,)) for r in records], pa.list_(pa.int32())),
            "split": pa.array([split] * n, pa.string()),
            "ok": pa.array([i not in skipped for i in range(n)], pa.bool_()),
            "error": pa.array([skipped.get(i) for i in range(n)], pa.string()),
        })
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue().to_pybytes()
        self.loc.write_bytes_atomic(F.IMAGES_PARQUET, data)
        return sha256_bytes(data)

    def _read_shard_moments(self, shards: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stored per-shard counts and moments of ``shards`` (only their chunks are read)."""
        get = [self.array(f"{F.STATS_GROUP}/{k}") for k in ("shard_count", "shard_moments_in", "shard_moments_out")]
        return tuple(a.get_orthogonal_selection((np.asarray(shards, np.int64),)) for a in get)

    def _final_array_crcs(self) -> dict[str, int]:
        """crc32c (decoded bytes) of every array no commit record covers: merged statistics, per-shard moments,
        head, zero-shot classifiers and (v2) MLP weights, before COMPLETE.json exists. Per-shard moments are
        covered here too, so a damaged moment shows before it skews a re-finalisation. Of what this writer
        wrote, the checksum is of the bytes it wrote (the objects zarr encoded in memory, decoded again there);
        what it did not write (constants of an earlier run) is read back."""
        names = [f"{F.STATS_GROUP}/{k}" for k in (*F.STATS_ARRAYS, "shard_moments_in", "shard_moments_out",
                                                   "shard_count")]
        names += [f"{F.HEAD_GROUP}/{k}" for k in F.HEAD_ARRAYS]
        text = self._text_arrays
        if text is None:
            text = sorted(self.group[F.TEXT_GROUP].array_keys())
        names += [f"{F.TEXT_GROUP}/{k}" for k in text]
        if self.recompute:
            names += [f"{F.MLP_GROUP}/{k}" for k in F.MLP_WEIGHTS]
        return {name: self._final_crcs[name] if name in self._final_crcs else crc32c(self.array(name)[:])
                for name in names}


def _crcs_of(staged: StagedNodes, names: list[str]) -> dict[str, int]:
    """crc32c of arrays as zarr encoded them into ``staged`` and decodes them back (memory: no requests)."""
    return {name: crc32c(staged.root[name][:]) for name in names}


@dataclass
class ShardWriter:
    """Accumulates one shard's images in order, writing each chunk as soon as it is full."""

    store: StoreWriter
    shard: int
    chunk_crcs: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    _full: list = field(default_factory=list)  # full chunks not yet handed to a write
    _pending: list = field(default_factory=list)
    _error: BaseException | None = None  # the first failed chunk: this shard can never be committed

    def __post_init__(self):
        lay = self.store.layout
        self.images = lay.shard_images(self.shard)
        self.next_image = self.images.start
        self._chunk_bufs = self._new_chunk_bufs()
        e, d, T = self.store.meta.model.embed_dim, lay.d_model, lay.tokens_per_image
        n = len(self.images)
        self.per_image = {
            F.RESID_FINAL: np.full((n, d), np.nan, np.float32),
            F.EMBEDDING: np.full((n, e), np.nan, np.float32),
            F.LABELS: np.full((n,), -1, np.int32),
            F.TOKEN_INDEX: np.full((n, T), -1, np.int16),
            F.IMAGE_OK: np.zeros((n,), np.uint8),
        }
        self.moments = {s: Moments.empty((lay.n_layers, lay.d_model)) for s in ("in", "out")}
        self.check: np.ndarray | None = None  # recompute: the shard's first image's true mlp_out
        self._chunk = lay.shard_chunks(self.shard).start

    def add(self, first_image: int, mlp_in: np.ndarray, mlp_out: np.ndarray, resid_final: np.ndarray,
            embedding: np.ndarray, labels: np.ndarray, token_index: np.ndarray, ok: np.ndarray,
            errors: dict[int, str] | None = None, moments: dict[str, Moments] | None = None) -> None:
        """Append a batch of consecutive images; activations are [b, T, L, d] in the storage dtype.

        ``moments`` ({"in", "out"}) are the batch's statistics over its valid rows if the caller already has
        them (harvest on CUDA computes them on the GPU); otherwise they are computed here.
        """
        if first_image != self.next_image:
            raise RuntimeError(f"shard {self.shard}: expected image {self.next_image}, got {first_image}")
        lay = self.store.layout
        b = mlp_in.shape[0]
        rel = first_image - self.images.start
        for name, val in ((F.RESID_FINAL, resid_final), (F.EMBEDDING, embedding), (F.LABELS, labels),
                          (F.TOKEN_INDEX, token_index), (F.IMAGE_OK, ok)):
            self.per_image[name][rel:rel + b] = val
        bad_images = ~ok.astype(bool)
        if bad_images.any():  # a skipped image's outputs came from a blank stand-in image: not data
            self.per_image[F.RESID_FINAL][rel:rel + b][bad_images] = np.nan
            self.per_image[F.EMBEDDING][rel:rel + b][bad_images] = np.nan
        self.skipped.update({int(k): v for k, v in (errors or {}).items()})
        if self.store.recompute and rel == 0:
            self.check = mlp_out[0].copy() if ok[0] else None  # a skipped first image leaves the fill value
        for side, m in (moments or {}).items():
            self.moments[side] = self.moments[side].merge(m)
        pos = 0
        while pos < b:
            img = first_image + pos
            chunk_imgs = lay.chunk_images(self._chunk)
            take = min(b - pos, chunk_imgs.stop - img)
            r0 = (img - chunk_imgs.start) * lay.tokens_per_image
            r1 = r0 + take * lay.tokens_per_image
            fill = F.activation_fill(self.store.dtype)
            good = ok[pos:pos + take].astype(bool)
            times = self.store.times
            for (name, side), src in zip(((F.MLP_IN, "in"), (F.MLP_OUT, "out")), (mlp_in, mlp_out)):
                if name in self._chunk_bufs:  # mlp_out is not stored when targets are recomputed
                    with times.stage("writer: copy into chunk buffers"):
                        self._chunk_bufs[name][r0:r1] = src[pos:pos + take].reshape(-1, lay.n_layers, lay.d_model)
                        if not good.all():  # a skipped image keeps the fill value, so it can never pass for data
                            rows = self._chunk_bufs[name][r0:r1].reshape(take, -1, lay.n_layers, lay.d_model)
                            rows[~good] = fill
                if moments is None:  # per batch as it arrives, so a chunk's flush is only compression and I/O
                    with times.stage("writer: statistics (CPU)"):
                        valid = src[pos:pos + take][good].reshape(-1, lay.n_layers, lay.d_model)
                        values = valid if self.store.dtype == "fp16" else F.decode_activations(valid, "bf16")
                        self.moments[side] = self.moments[side].merge(Moments.of(values))
            pos += take
            if img + take == chunk_imgs.stop:
                self._flush_chunk()
        self.next_image = first_image + b
        self._submit_full()  # this batch's full chunks are written while the next batch computes

    def _new_chunk_bufs(self) -> dict[str, np.ndarray]:
        # Uninitialised: add() writes every row of a chunk (skipped images get the fill value) before the
        # chunk is flushed, and only the chunk's own rows are written out.
        lay = self.store.layout
        return {n: np.empty((lay.rows_per_chunk, lay.n_layers, lay.d_model), F.storage_dtype(self.store.dtype))
                for n in self.store.act_names}

    def _flush_chunk(self) -> None:
        """Queue the full chunk for writing and start a fresh buffer (the write owns the old one)."""
        self._raise_failed_chunks()  # e.g. disk full: stop now, not at the end of the shard
        self._full.append((self._chunk, self._chunk_bufs))
        self._chunk_bufs = self._new_chunk_bufs()
        self._chunk += 1
        if len(self._full) >= self.store.write_threads:
            self._submit_full()

    def _submit_full(self) -> None:
        if self._full:
            group, self._full = self._full, []
            self._pending.append(self.store.submit_write(self._write_chunks, group))

    def _write_chunks(self, group: list[tuple[int, dict[str, np.ndarray]]]) -> list[tuple[int, dict]]:
        """One zarr call for the whole group: zarr compresses and writes its chunks concurrently on its own
        threads. On 2 cores 1.2-1.5 GB/s, against ~1.05 GB/s for one synchronous call per chunk from a thread
        pool (every such call round-trips through zarr's single event-loop thread)."""
        lay, times = self.store.layout, self.store.times
        with times.stage("chunks: encode + write (zarr)"):
            write_rows([(self.store.activation_array(name), slice(lay.chunk_rows(c).start, lay.chunk_rows(c).stop),
                         bufs[name][:len(lay.chunk_rows(c))]) for c, bufs in group for name in self.store.act_names])
        with times.stage("chunks: crc32c"):
            out = [(c, {name: crc32c(bufs[name][:len(lay.chunk_rows(c))]) for name in self.store.act_names})
                   for c, bufs in group]
        # Flushed here, off the writer thread; commit()'s fsync of the same files then finds nothing to write.
        with times.stage("chunks: fsync"):
            self.store.fsync_files([self._chunk_key(name, c) for c, _ in group for name in self.store.act_names])
        return out

    def _raise_failed_chunks(self) -> None:
        if self._error is None:
            self._error = next((f.exception() for f in self._pending if f.done() and not f.cancelled()
                                and f.exception() is not None), None)
        if self._error is not None:
            raise self._error

    def _wait_chunks(self) -> None:
        """Every chunk of this shard written, or the first failure raised - then and on every later call."""
        self._submit_full()
        try:
            for fut in self._pending:
                for chunk, crcs in fut.result():
                    self.chunk_crcs[str(chunk)] = crcs
        except BaseException as e:
            self._error = self._error or e
            for fut in self._pending:
                fut.cancel()
        self._raise_failed_chunks()
        expected = {str(c) for c in self.store.layout.shard_chunks(self.shard)}
        if set(self.chunk_crcs) != expected:
            raise RuntimeError(f"shard {self.shard}: chunks {sorted(expected - set(self.chunk_crcs))} were never "
                               f"written; not committing it")

    def _chunk_key(self, name: str, chunk: int) -> str:
        return chunk_key(self.store.array(name), chunk)

    def _chunk_keys(self, activations: bool = True) -> list[str]:
        """Every chunk file this shard wrote (``activations=False``: but the activation chunks)."""
        keys = []
        for c in self.store.layout.shard_chunks(self.shard):
            for name in ((*self.store.act_names,) if activations else ()) + tuple(F.PER_IMAGE_ARRAYS):
                keys.append(self._chunk_key(name, c))
        per_shard = [f"{F.STATS_GROUP}/shard_moments_in", f"{F.STATS_GROUP}/shard_moments_out",
                     f"{F.STATS_GROUP}/shard_count"] + ([F.MLP_OUT_CHECK] if self.store.recompute else [])
        keys += [self._chunk_key(name, self.shard) for name in per_shard]
        return keys

    def commit(self) -> dict:
        lay = self.store.layout
        self._raise_failed_chunks()
        if self.next_image != self.images.stop:
            raise RuntimeError(f"shard {self.shard}: commit before all images were added")
        times = self.store.times
        with times.stage("commit: wait for its chunk writes"):
            self._wait_chunks()
        with times.stage("commit: per-image rows + moments"):
            per_image_crcs, moments_crcs, check_crc = self._write_per_shard()
        with times.stage("commit: fsync"):
            # The activation chunks were fsynced by their writes (_write_chunks), which _wait_chunks waited for:
            # opening and fsyncing them again costs a round trip each on network file systems.
            self.store.fsync_files(self._chunk_keys(activations=False))
        record = {
            "shard": self.shard, "fingerprint": self.store.fingerprint,
            "images": [self.images.start, self.images.stop],
            "rows": [self.images.start * lay.tokens_per_image, self.images.stop * lay.tokens_per_image],
            "chunk_crc32c": self.chunk_crcs, "per_image_crc32c": per_image_crcs, "moments_crc32c": moments_crcs,
            "valid_tokens": self.moments["in"].count, "skipped": {str(k): v for k, v in self.skipped.items()},
            "committed": now(),
        }
        if self.store.recompute:
            record["mlp_out_check_crc32c"] = check_crc
        with times.stage("commit: record (atomic json)"):
            self.store.loc.write_json_atomic(F.shard_commit_name(self.shard), record)
        self.store._committed(record, self._stored_moments, self._stored_count)
        return record

    def _write_per_shard(self) -> tuple[dict, dict, int | None]:
        """The shard's per-image rows, moments and (recompute) check; their crc32c."""
        arr_of = self.store.array  # opened once per store: each group lookup reads the array's metadata
        sl = slice(self.images.start, self.images.stop)
        per_image_crcs = {}
        for name, arr in self.per_image.items():
            arr_of(name)[sl] = arr
            per_image_crcs[name] = crc32c(arr)
        moments_crcs = {}
        self._stored_moments = {}
        for side in ("in", "out"):
            m = self.moments[side]
            moments = np.stack([m.mean, m.m2]).astype(np.float64)
            arr_of(f"{F.STATS_GROUP}/shard_moments_{side}")[self.shard] = moments
            moments_crcs[side] = crc32c(moments)
            self._stored_moments[side] = moments
        self._stored_count = int(self.moments["in"].count)
        arr_of(f"{F.STATS_GROUP}/shard_count")[self.shard] = self.moments["in"].count
        check_crc = None
        if self.check is not None:
            arr_of(F.MLP_OUT_CHECK)[self.shard] = self.check
            check_crc = crc32c(self.check)
        return per_image_crcs, moments_crcs, check_crc
