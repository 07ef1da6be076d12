"""Open a v1 store for reading; refuse anything that is not a complete store of a known format version.

Every read is checked (``check_reads``, on by default): activation chunks against their commit record's crc32c
of the decoded bytes, per-image arrays shard by shard against theirs, and the finalised arrays and files against
COMPLETE.json's checksums. A mismatch, a missing chunk (zarr would silently return fill values) or an undecodable
one raises one StoreError naming the array, the chunk and the shard, and how to repair the store.
"""

from __future__ import annotations

import threading
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import zarr

from clt_pipe.checksums import crc32c, sha256_bytes
from clt_pipe.errors import CltPipeError, StoreError
from clt_pipe.store import commits
from clt_pipe.store import format as F
from clt_pipe.store import identity
from clt_pipe.store.location import StoreLocation
from clt_pipe.store.meta import StoreMeta
from clt_pipe.store.targets import RecomputedTargets
from clt_pipe.store.zarrio import chunk_key, read_rows_into
from clt_pipe.tokens import TokenType, token_mask


def repair_hint(url: str) -> str:
    return f"run `clt-pipe store repair {url}`, then re-run the same harvest command to rewrite it"


class ActivationStore:
    def __init__(self, url: str, *, require_complete: bool = True, storage_options: dict | None = None,
                 check_reads: bool = True):
        self.url = url
        self.check_reads = check_reads
        self.loc = StoreLocation(url, storage_options)
        with self.loc.errors("open"):
            found = self.loc.exists("zarr.json")
        if not found:
            raise StoreError(f"store {url!r} not found (no zarr.json there)")
        try:
            self.group = zarr.open_group(self.loc.zarr_store(read_only=True), mode="r", zarr_format=3)
        except Exception as e:  # noqa: BLE001
            raise StoreError(f"store {url!r} is unreadable: {e}") from None
        meta = self.group.attrs.get(F.ATTRS_KEY)
        if meta is None:
            raise StoreError(f"{url!r} is a Zarr group but not a clt-pipe store")
        version = meta.get("format_version")
        if version not in F.KNOWN_VERSIONS:
            raise StoreError(f"{url!r} is store format v{version}; this tool reads "
                             f"{', '.join(f'v{v}' for v in F.KNOWN_VERSIONS)}")
        problem = identity.description_problem(meta)
        if problem:
            raise StoreError(f"store {url!r}: {problem}")
        try:
            self.meta = StoreMeta.from_dict(meta)
        except (KeyError, TypeError, ValueError, CltPipeError) as e:
            raise StoreError(f"{url!r}: its store description is malformed ({type(e).__name__}: {e})") from None
        self.recompute = self.meta.recompute
        self._targets: dict[str, RecomputedTargets] = {}
        # Read once per store object: each array open reads its zarr.json, each read its chunks, and analyze's
        # parts ask for the same arrays again (one request each on an object store).
        self._arrays: dict[str, zarr.Array] = {}
        self._read: dict[str, np.ndarray] = {}  # checked per-image and finalised arrays, read-only
        self._open_lock = threading.Lock()
        self.layout = self.meta.layout
        self.dtype = self.meta.activations.dtype
        with self.loc.errors("read"):
            self._records = commits.commit_records(self.loc, self.meta.fingerprint)
            self._complete, self.complete_problem = commits.read_complete(self.loc, self.meta.fingerprint)
        if self._complete is not None:
            why = identity.record_problem(self._complete, self.layout, self._records)
            if why:
                self._complete, self.complete_problem = None, f"{F.COMPLETE_FILE}: {why}"
        if require_complete and not self.is_complete:
            done = len(self._records)
            if self.complete_problem:
                raise StoreError(f"store {url!r} is not complete: {self.complete_problem}; {repair_hint(url)}")
            if self._complete is not None:
                lost = sorted(set(range(self.layout.n_shards)) - set(self._records))
                raise StoreError(f"store {url!r} is incomplete: the commit record of shard(s) {lost[:5]} is missing "
                                 f"or unreadable; {repair_hint(url)}")
            raise StoreError(f"store {url!r} is incomplete ({done}/{self.layout.n_shards} shards committed, no "
                             f"{F.COMPLETE_FILE}); re-run the same harvest command to resume it")

    @property
    def is_complete(self) -> bool:
        """COMPLETE.json of this store and every shard's commit record readable."""
        return self._complete is not None and set(self._records) == set(range(self.layout.n_shards))

    def committed_shards(self) -> list[int]:
        return sorted(self._records)

    def commit_record(self, shard: int) -> dict:
        if shard in self._records:
            return self._records[shard]
        return self.loc.read_json(F.shard_commit_name(shard))

    @property
    def complete_record(self) -> dict | None:
        return self._complete

    @property
    def file_checksums(self) -> dict | None:
        """COMPLETE.json's checksums of the finalised arrays and files; None for a store written before them."""
        return (self._complete or {}).get("checksums")

    # ---- identity ------------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.layout.n_layers

    @property
    def d_model(self) -> int:
        return self.layout.d_model

    @property
    def model(self) -> dict:
        """The stored model identity record (as run.json and report.json copy it)."""
        return self.meta.model.to_dict()

    @property
    def class_names(self) -> list[str]:
        return self.meta.dataset.class_names

    # ---- arrays ----------------------------------------------------------------------------------------
    def _open(self, name: str) -> zarr.Array:
        """``group[name]``, opened once (its errors as zarr raises them)."""
        with self._open_lock:  # reading threads ask at once on the first window
            if name not in self._arrays:
                self._arrays[name] = self.group[name]
            return self._arrays[name]

    def array(self, name: str) -> zarr.Array:
        try:
            return self._open(name)
        except KeyError:
            raise StoreError(f"{self.url}: array {name} is missing; {repair_hint(self.url)}") from None
        except Exception as e:  # noqa: BLE001 - a damaged array zarr.json
            raise StoreError(f"{self.url}: metadata of array {name} is unreadable ({type(e).__name__}: {e}); "
                             f"re-harvest the store with --overwrite") from None

    def read_chunk(self, chunk: int, check: bool | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Stored (undecoded) ``mlp_in``, ``mlp_out`` rows of one chunk: [rows, L, d]; ``mlp_out`` is None when
        the store recomputes its targets (``targets_on``). Checked against the commit record unless ``check``
        is False (``verify`` does its own checking, to list every problem instead of stopping at the first)."""
        rows = self.layout.chunk_rows(chunk)
        shape = (len(rows), self.n_layers, self.d_model)
        dtype = F.storage_dtype(self.dtype)
        x = np.empty(shape, dtype)
        y = None if self.recompute else np.empty(shape, dtype)
        self.read_chunks_into([(chunk, x, y)], check=check)
        return x, y

    def targets_on(self, device: torch.device | str) -> RecomputedTargets:
        """The MLPs that turn decoded ``mlp_in`` rows into targets, on ``device`` (format v2 stores only)."""
        if not self.recompute:
            raise StoreError(f"{self.loc.url}: targets are stored in mlp_out, not recomputed")
        key = str(torch.device(device))
        if key not in self._targets:
            self._targets[key] = RecomputedTargets(self.group[F.MLP_GROUP], self.meta.activations.mlp_activation,
                                                   torch.device(device))
        return self._targets[key]

    def read_chunk_into(self, chunk: int, x: np.ndarray, y: np.ndarray | None) -> None:
        """``read_chunk`` decoded straight into caller-owned buffers (no intermediate copy)."""
        self.read_chunks_into([(chunk, x, y)])

    def read_chunks_into(self, pieces: list[tuple[int, np.ndarray, np.ndarray | None]],
                         check: bool | None = None) -> None:
        """Several chunks' ``mlp_in``/``mlp_out`` rows decoded straight into caller-owned buffers, all in one
        event-loop call (``store/zarrio.read_rows_into``: whole blosc chunks are decompressed into the buffers
        directly, concurrently on zarr's threads). ``y`` is None (and nothing is read for it) when targets are
        recomputed.

        Each chunk is then checked against its commit record's crc32c in the thread that decoded it
        (benchmarks/bench_read_checks.py measures the cost)."""
        check = self.check_reads if check is None else check
        arrays = self._activation_arrays()
        blocks, owners = [], []
        for chunk, x, y in pieces:
            rows = self.layout.chunk_rows(int(chunk))
            for arr, out in zip(arrays, (x, y)):
                blocks.append((arr, slice(rows.start, rows.stop), out))
                owners.append(int(chunk))

        def check_block(i: int) -> None:
            arr, _rows, out = blocks[i]
            self._check_block(owners[i], arr, out)

        try:
            read_rows_into(blocks, after=check_block if check else None)
        except (TypeError, StoreError):  # TypeError: a caller's buffer of the wrong dtype, a bug
            raise
        except Exception:  # noqa: BLE001 - find and name the chunk that does not decode
            for chunk, x, y in pieces:
                rows = self.layout.chunk_rows(int(chunk))
                for arr, out in zip(arrays, (x, y)):
                    if out is None:
                        continue
                    try:
                        read_rows_into([(arr, slice(rows.start, rows.stop), out)])
                    except Exception as e:  # noqa: BLE001
                        self._bad_chunk(arr, int(chunk), f"does not decode ({type(e).__name__}: {e})")
            raise

    def _activation_arrays(self) -> list[zarr.Array]:
        return [self.array(name) for name in self.meta.activation_arrays]

    def _check_block(self, chunk: int, arr: zarr.Array, out: np.ndarray) -> None:
        """One decoded chunk of one activation array against its commit record's crc32c."""
        shard = chunk // self.layout.chunks_per_shard
        rec = self._records.get(shard)
        if rec is None:
            raise StoreError(f"{self.url}: chunk {chunk} belongs to shard {shard}, which has no readable commit "
                             f"record; {repair_hint(self.url)}")
        want = rec.get("chunk_crc32c", {}).get(str(chunk), {}).get(arr.path)
        if want is None:
            self._bad_chunk(arr, chunk, "has no checksum in its commit record")
        if crc32c(out) != want:
            self._bad_chunk(arr, chunk, "does not match its commit checksum")

    def _bad_chunk(self, arr: zarr.Array, chunk: int, why: str) -> None:
        shard = chunk // self.layout.chunks_per_shard
        key = chunk_key(arr, chunk)
        try:
            if not self.loc.exists(key):
                why = f"is missing ({key} not in the store)"
        except Exception:  # noqa: BLE001 - keep the first diagnosis
            pass
        raise StoreError(f"{self.url}: chunk {chunk} of {arr.path} (shard {shard}) {why}; {repair_hint(self.url)}")

    def _checked(self, name: str, read, crc: int | None, where: str) -> np.ndarray:
        try:
            data = read()
        except KeyError:
            raise StoreError(f"{self.url}: {name} is missing; {repair_hint(self.url)}") from None
        except Exception as e:  # noqa: BLE001 - undecodable chunk or damaged metadata
            raise StoreError(f"{self.url}: {name} is unreadable ({type(e).__name__}: {e}); "
                             f"{repair_hint(self.url)}") from None
        if self.check_reads and crc is not None and crc32c(np.ascontiguousarray(data)) != crc:
            raise StoreError(f"{self.url}: {name}{where} does not match its checksum; {repair_hint(self.url)}")
        return data

    def _final_crc(self, name: str) -> int | None:
        """COMPLETE.json's crc32c of a finalised array (None: an older store, or not complete)."""
        return ((self.file_checksums or {}).get("arrays") or {}).get(name)

    def _read_per_image(self, name: str) -> np.ndarray:
        """A whole per-image array, each committed shard's rows checked against its commit record."""
        try:
            data = self._checked(name, lambda: self._open(name)[:], None, "")
        except StoreError:
            self._name_bad_per_image_chunk(name)
            raise
        if self.check_reads:
            for shard, rec in self._records.items():
                want = rec.get("per_image_crc32c", {}).get(name)
                imgs = self.layout.shard_images(shard)
                if want is not None and crc32c(np.ascontiguousarray(data[imgs.start:imgs.stop])) != want:
                    raise StoreError(f"{self.url}: {name} rows {imgs.start}-{imgs.stop} (shard {shard}) do not "
                                     f"match their commit checksum; {repair_hint(self.url)}")
        return data

    def decode(self, arr: np.ndarray) -> np.ndarray:
        return F.decode_activations(arr, self.dtype)

    def _name_bad_per_image_chunk(self, name: str) -> None:
        """Raise naming the first per-image chunk of ``name`` that does not decode (if one is to blame)."""
        try:
            arr = self.group[name]
        except Exception:  # noqa: BLE001 - the array itself is damaged: the caller's message says so
            return
        for chunk in range(self.layout.n_chunks):
            imgs = self.layout.chunk_images(chunk)
            try:
                arr[imgs.start:imgs.stop]
            except Exception as e:  # noqa: BLE001
                self._bad_chunk(arr, chunk, f"does not decode ({type(e).__name__}: {e})")

    def _once(self, name: str, read) -> np.ndarray:
        if name not in self._read:
            data = read(name)
            data.flags.writeable = False  # shared by every caller
            self._read[name] = data
        return self._read[name]

    def per_image(self, name: str) -> np.ndarray:
        """A whole per-image array, checked; read once per store object (read-only)."""
        return self._once(name, self._read_per_image)

    def per_image_if_read(self, name: str) -> np.ndarray | None:
        """``per_image(name)`` if something already read it, else None (for readers that would otherwise read
        it in slices, to bound their memory)."""
        return self._read.get(name)

    @property
    def token_index(self) -> np.ndarray:
        return self.per_image(F.TOKEN_INDEX)

    @cached_property
    def image_ok(self) -> np.ndarray:
        return self.per_image(F.IMAGE_OK).astype(bool)

    @property
    def labels(self) -> np.ndarray:
        return self.per_image(F.LABELS)

    def _final_array(self, name: str) -> np.ndarray:
        """A finalised array (small: statistics, head, classifiers), checked once; a copy for each caller."""
        return self._once(name, lambda n: self._checked(n, lambda: self._open(n)[:], self._final_crc(n), "")).copy()

    def head(self) -> dict[str, np.ndarray]:
        return {name: self._final_array(f"{F.HEAD_GROUP}/{name}") for name in F.HEAD_ARRAYS}

    def text_classifier(self, template_set: str) -> np.ndarray:
        name = f"{F.TEXT_GROUP}/{template_set}"
        if name not in self._read and name not in self._arrays:
            try:
                self._open(name)
            except Exception:  # noqa: BLE001 - absent or damaged: say which below
                self._explain_missing_classifier(template_set)
        return self._final_array(name)

    def _explain_missing_classifier(self, template_set: str) -> None:
        try:
            g = self.group[F.TEXT_GROUP]
        except KeyError:
            raise StoreError(f"{self.url}: {F.TEXT_GROUP} is missing; {repair_hint(self.url)}") from None
        if template_set not in g:
            raise StoreError(f"template set {template_set!r} not in store (has: {', '.join(sorted(g.array_keys()))})")

    def stats(self) -> dict[str, np.ndarray]:
        """Merged per-layer, per-dimension mean/var of inputs and targets (float64, [L, d])."""
        return {k: self._final_array(f"{F.STATS_GROUP}/{k}") for k in F.STATS_ARRAYS}

    def images(self) -> pa.Table:
        try:
            data = self.loc.read_bytes(F.IMAGES_PARQUET)
        except FileNotFoundError:
            raise StoreError(f"{self.url}: {F.IMAGES_PARQUET} is missing; {repair_hint(self.url)}") from None
        want = ((self.file_checksums or {}).get("files") or {}).get(F.IMAGES_PARQUET)
        if self.check_reads and want is not None and sha256_bytes(data) != want:
            raise StoreError(f"{self.url}: {F.IMAGES_PARQUET} does not match its checksum; {repair_hint(self.url)}")
        try:
            return pq.read_table(pa.BufferReader(data))
        except Exception as e:  # noqa: BLE001
            raise StoreError(f"{self.url}: {F.IMAGES_PARQUET} is unreadable ({e}); {repair_hint(self.url)}") from None

    def token_type_mask(self, chunk: int, tokens: TokenType) -> np.ndarray:
        """Boolean mask over a chunk's rows: valid rows of the wanted token type."""
        imgs = self.layout.chunk_images(chunk)
        pos = self.token_index[imgs.start:imgs.stop]
        ok = self.image_ok[imgs.start:imgs.stop, None]
        return (token_mask(pos, tokens) & ok).reshape(-1)
