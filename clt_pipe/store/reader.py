"""Open a v1 store for reading; refuse anything that is not a complete store of a known format version."""

from __future__ import annotations

from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import zarr

from clt_pipe.errors import CltPipeError, StoreError
from clt_pipe.store import commits
from clt_pipe.store import format as F
from clt_pipe.store.location import StoreLocation
from clt_pipe.store.meta import StoreMeta
from clt_pipe.store.targets import RecomputedTargets
from clt_pipe.store.zarrio import read_rows_into
from clt_pipe.tokens import TokenType, token_mask


class ActivationStore:
    def __init__(self, url: str, *, require_complete: bool = True, storage_options: dict | None = None):
        self.url = url
        self.loc = StoreLocation(url, storage_options)
        if not self.loc.exists("zarr.json"):
            raise StoreError(f"store {url!r} not found (no zarr.json there)")
        try:
            self.group = zarr.open_group(self.loc.zarr_store(read_only=True), mode="r")
        except Exception as e:  # noqa: BLE001
            raise StoreError(f"store {url!r} is unreadable: {e}") from None
        meta = self.group.attrs.get(F.ATTRS_KEY)
        if meta is None:
            raise StoreError(f"{url!r} is a Zarr group but not a clt-pipe store")
        version = meta.get("format_version")
        if version not in F.KNOWN_VERSIONS:
            raise StoreError(f"{url!r} is store format v{version}; this tool reads "
                             f"{', '.join(f'v{v}' for v in F.KNOWN_VERSIONS)}")
        try:
            self.meta = StoreMeta.from_dict(meta)
        except (KeyError, TypeError, ValueError, CltPipeError) as e:
            raise StoreError(f"{url!r}: its store description is malformed ({type(e).__name__}: {e})") from None
        self.recompute = self.meta.recompute
        self._targets: dict[str, RecomputedTargets] = {}
        self.layout = self.meta.layout
        self.dtype = self.meta.activations.dtype
        if require_complete and not self.is_complete:
            done = len(self.committed_shards())
            raise StoreError(f"store {url!r} is incomplete ({done}/{self.layout.n_shards} shards committed, no "
                             f"{F.COMPLETE_FILE}); re-run the same harvest command to resume it")

    @property
    def is_complete(self) -> bool:
        return commits.is_complete(self.loc, self.meta.fingerprint)

    def committed_shards(self) -> list[int]:
        return commits.committed_shards(self.loc, self.meta.fingerprint)

    def commit_record(self, shard: int) -> dict:
        return self.loc.read_json(F.shard_commit_name(shard))

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
    def array(self, name: str) -> zarr.Array:
        return self.group[name]

    def read_chunk(self, chunk: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Stored (undecoded) ``mlp_in``, ``mlp_out`` rows of one chunk: [rows, L, d]; ``mlp_out`` is None when
        the store recomputes its targets (``targets_on``)."""
        rows = self.layout.chunk_rows(chunk)
        y = None if self.recompute else self.group[F.MLP_OUT][rows.start:rows.stop]
        return self.group[F.MLP_IN][rows.start:rows.stop], y

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

    def read_chunks_into(self, pieces: list[tuple[int, np.ndarray, np.ndarray | None]]) -> None:
        """Several chunks' ``mlp_in``/``mlp_out`` rows decoded straight into caller-owned buffers, in one zarr
        call: zarr decodes them concurrently on its own threads. Measured on 2 cores, 1.57 GB/s against
        1.14-1.29 GB/s for one synchronous call per chunk from a thread pool (each such call round-trips through
        zarr's single event-loop thread), and no intermediate copy (~20 % per chunk). ``y`` is None (and
        nothing is read for it) when targets are recomputed."""
        arrays = [self.group[name] for name in self.meta.activation_arrays]
        blocks = []
        for chunk, x, y in pieces:
            rows = self.layout.chunk_rows(int(chunk))
            blocks += [(arr, slice(rows.start, rows.stop), out) for arr, out in zip(arrays, (x, y))]
        read_rows_into(blocks)

    def decode(self, arr: np.ndarray) -> np.ndarray:
        return F.decode_activations(arr, self.dtype)

    def per_image(self, name: str) -> np.ndarray:
        return self.group[name][:]

    @cached_property
    def token_index(self) -> np.ndarray:
        return self.group[F.TOKEN_INDEX][:]

    @cached_property
    def image_ok(self) -> np.ndarray:
        return self.group[F.IMAGE_OK][:].astype(bool)

    @cached_property
    def labels(self) -> np.ndarray:
        return self.group[F.LABELS][:]

    def head(self) -> dict[str, np.ndarray]:
        g = self.group[F.HEAD_GROUP]
        return {name: g[name][:] for name in ("ln_post_weight", "ln_post_bias", "proj")}

    def text_classifier(self, template_set: str) -> np.ndarray:
        g = self.group[F.TEXT_GROUP]
        if template_set not in g:
            raise StoreError(f"template set {template_set!r} not in store (has: {', '.join(sorted(g.array_keys()))})")
        return g[template_set][:]

    def stats(self) -> dict[str, np.ndarray]:
        """Merged per-layer, per-dimension mean/var of inputs and targets (float64, [L, d])."""
        g = self.group[F.STATS_GROUP]
        return {k: g[k][:] for k in ("mean_in", "var_in", "mean_out", "var_out")}

    def images(self) -> pa.Table:
        with self.loc.fs.open(self.loc.path(F.IMAGES_PARQUET), "rb") as fh:
            return pq.read_table(fh)

    def token_type_mask(self, chunk: int, tokens: TokenType) -> np.ndarray:
        """Boolean mask over a chunk's rows: valid rows of the wanted token type."""
        imgs = self.layout.chunk_images(chunk)
        pos = self.token_index[imgs.start:imgs.stop]
        ok = self.image_ok[imgs.start:imgs.stop, None]
        return (token_mask(pos, tokens) & ok).reshape(-1)
