"""Store format v1 (and v2 = v1 with recomputed targets): names, layout arithmetic, dtypes and codecs.

Everything here is mirrored in storage/FORMAT.md; a change to what is written bumps FORMAT_VERSION.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from zarr.codecs import BloscCodec, BloscShuffle

FORMAT_VERSION = 1  # targets stored (mlp_out written)
FORMAT_VERSION_RECOMPUTE = 2  # v1 + targets recomputed from mlp_in and stored MLP weights (no mlp_out array)
KNOWN_VERSIONS = (FORMAT_VERSION, FORMAT_VERSION_RECOMPUTE)
ATTRS_KEY = "clt_pipe_store"  # root attribute holding the whole store description

MLP_IN = "mlp_in"
MLP_OUT = "mlp_out"
ACTIVATION_ARRAYS = (MLP_IN, MLP_OUT)
MLP_GROUP = "mlp_weights"  # v2: fc_weight [L, H, d], fc_bias [L, H], proj_weight [L, d, H], proj_bias [L, d]
MLP_OUT_CHECK = "mlp_out_check"  # v2: [n_shards, tokens_per_image, L, d] true mlp_out of each shard's first image
MLP_ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")
MLP_WEIGHTS = ("fc_weight", "fc_bias", "proj_weight", "proj_bias")


def version_for(targets: str) -> int:
    return FORMAT_VERSION_RECOMPUTE if targets == "recompute" else FORMAT_VERSION


RESID_FINAL = "resid_final"
EMBEDDING = "embedding"
LABELS = "labels"
TOKEN_INDEX = "token_index"
IMAGE_OK = "image_ok"
PER_IMAGE_ARRAYS = (RESID_FINAL, EMBEDDING, LABELS, TOKEN_INDEX, IMAGE_OK)
HEAD_GROUP = "head"  # ln_post_weight, ln_post_bias, proj
HEAD_ARRAYS = ("ln_post_weight", "ln_post_bias", "proj")
TEXT_GROUP = "text_classifier"  # one [n_classes, embed_dim] array per template set
STATS_GROUP = "stats"
STATS_ARRAYS = ("mean_in", "var_in", "mean_out", "var_out")  # merged at finalisation (COMPLETE.json checksums)

COMMITS_DIR = "commits"
COMPLETE_FILE = "COMPLETE.json"
IMAGES_PARQUET = "images.parquet"

LOCK_FILE = "harvest.lock"
# Every name a store holds at its root (storage/FORMAT.md, "Overview"); anything else was put there by someone
# else, and harvest --overwrite refuses to delete it.
STORE_ENTRIES = frozenset({"zarr.json", *ACTIVATION_ARRAYS, MLP_GROUP, MLP_OUT_CHECK, *PER_IMAGE_ARRAYS, STATS_GROUP,
                           HEAD_GROUP, TEXT_GROUP, COMMITS_DIR, COMPLETE_FILE, IMAGES_PARQUET, LOCK_FILE})

ACTIVATION_ITEMSIZE = 2  # fp16 and bf16 (stored as uint16) alike

# bf16 has no Zarr v3 core dtype: it is stored as its uint16 bit pattern (the upper half of a float32).
BF16_NAN_BITS = 0x7FC0


@dataclass(frozen=True)
class StoreLayout:
    """Where every token and image lives. Chunks hold whole images; shards hold whole chunks."""

    n_images: int
    tokens_per_image: int
    n_layers: int
    d_model: int
    images_per_chunk: int
    chunks_per_shard: int

    @property
    def n_tokens(self) -> int:
        return self.n_images * self.tokens_per_image

    @property
    def rows_per_chunk(self) -> int:
        return self.images_per_chunk * self.tokens_per_image

    @property
    def images_per_shard(self) -> int:
        return self.images_per_chunk * self.chunks_per_shard

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_images / self.images_per_chunk)

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_images / self.images_per_shard)

    def shard_images(self, shard: int) -> range:
        start = shard * self.images_per_shard
        return range(start, min(start + self.images_per_shard, self.n_images))

    def shard_chunks(self, shard: int) -> range:
        start = shard * self.chunks_per_shard
        return range(start, min(start + self.chunks_per_shard, self.n_chunks))

    def chunk_images(self, chunk: int) -> range:
        start = chunk * self.images_per_chunk
        return range(start, min(start + self.images_per_chunk, self.n_images))

    def chunk_rows(self, chunk: int) -> range:
        imgs = self.chunk_images(chunk)
        return range(imgs.start * self.tokens_per_image, imgs.stop * self.tokens_per_image)

    def activation_bytes(self, n_arrays: int, n_tokens: int | None = None) -> int:
        """Uncompressed bytes of ``n_arrays`` activation arrays over ``n_tokens`` rows (default: every row)."""
        rows = self.n_tokens if n_tokens is None else n_tokens
        return n_arrays * rows * self.n_layers * self.d_model * ACTIVATION_ITEMSIZE

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def plan(cls, n_images: int, tokens_per_image: int, n_layers: int, d_model: int, itemsize: int,
             chunk_mb: float, chunks_per_shard: int) -> "StoreLayout":
        row_bytes = tokens_per_image * n_layers * d_model * itemsize
        images_per_chunk = max(1, min(n_images, round(chunk_mb * 2**20 / row_bytes)))
        return cls(n_images, tokens_per_image, n_layers, d_model, images_per_chunk, chunks_per_shard)


def storage_dtype(dtype: str) -> np.dtype:
    """The numpy dtype an activation array is stored with ("fp16" or "bf16")."""
    return np.dtype(np.float16) if dtype == "fp16" else np.dtype(np.uint16)


def activation_fill(dtype: str) -> float | int:
    return float("nan") if dtype == "fp16" else BF16_NAN_BITS


def decode_activations(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Stored activations -> float32 (bf16 bits are widened exactly into float32)."""
    if dtype == "fp16":
        return arr.astype(np.float32)
    return (arr.astype(np.uint32) << 16).view(np.float32)


def compressors_for(name: str) -> list:
    if name == "none":
        return []
    _, cname, shuffle = name.split("-")
    mode = BloscShuffle.bitshuffle if shuffle == "bitshuffle" else BloscShuffle.shuffle
    # lz4 decodes at memory speed; clevel 5 is where bitshuffle+lz4 reaches its ratio (measured).
    return [BloscCodec(cname=cname, clevel=5, shuffle=mode, typesize=2)]


def shard_commit_name(shard: int) -> str:
    return f"{COMMITS_DIR}/shard-{shard:06d}.json"
