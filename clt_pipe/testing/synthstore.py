"""Synthetic activation stores for fit/loader tests and benchmarks: no ViT, the real ``StoreWriter`` API.

``write_store(url, n_images, tokens_per_image, n_layers, d_model, rows)`` writes a complete v1 store whose
``mlp_in``/``mlp_out`` rows come from ``rows(first_image, n_images) -> (x, y)`` (float arrays
``[n_images * tokens_per_image, L, d]``, image-major). Slot 0 of every image is the CLS token (position 0),
the other slots hold patches 1..T-1, so ``tokens="cls"`` / ``"patches"`` filters have something to select.

Row generators:

* ``CrossLayerData``: a known sparse *cross-layer* dictionary. Per token and layer i, ``k_true`` of
  ``n_true`` ground-truth features fire with non-negative magnitudes (codes_i); inputs
  ``x_i = codes_i @ E_i + noise`` and targets ``y_j = Σ_{i≤j} codes_i @ D_{i→j}``. Target j depends on the
  codes of earlier layers, which x_j does not carry: a per-layer transcoder cannot explain it, a CLT can.
* ``RandomRows``: i.i.d. Gaussian rows (fast, for benchmarks).

Every generator is a pure function of (seed, first_image, n_images) per image, so rewriting a shard, or
regenerating the rows of any image range, gives identical data.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from clt_pipe.datasets.base import ImageRecord
from clt_pipe.store import format as F
from clt_pipe.store.meta import Activations, BackboneIdentity, DatasetInfo, StoreMeta, TokenSelection
from clt_pipe.store.writer import StoreWriter
from clt_pipe.tokens import TokenPolicy

RowFn = Callable[[int, int], tuple[np.ndarray, np.ndarray]]


def synthetic_meta(n_images: int, tokens_per_image: int, n_layers: int, d_model: int, *, dtype: str = "fp16",
                   compressor: str = "none", chunk_mb: float = 1.0, chunks_per_shard: int = 2,
                   name: str = "synthetic") -> StoreMeta:
    """A minimal store description a ``StoreWriter`` accepts (what ``harvest.store_meta`` builds from a ViT)."""
    layout = F.StoreLayout.plan(n_images, tokens_per_image, n_layers, d_model, F.ACTIVATION_ITEMSIZE, chunk_mb,
                                chunks_per_shard)
    return StoreMeta(
        model=BackboneIdentity(name=name, model_arg=name, pretrained="none", weights_sha256="0" * 64,
                               activation="GELU", n_layers=n_layers, d_model=d_model, d_mlp=4 * d_model,
                               embed_dim=8, image_size=32, patch_size=8, n_positions=tokens_per_image,
                               logit_scale=100.0),
        preprocess={"size": [32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
        dataset=DatasetInfo(name=name, split="train", n_images=n_images, class_names=["a", "b"], data_root=""),
        templates={"single": ["a photo of {c}."]},
        tokens=TokenSelection(TokenPolicy("all"), tokens_per_image=tokens_per_image, seed=0),
        activations=Activations(dtype=dtype, storage_dtype=str(F.storage_dtype(dtype)), compressor=compressor,
                                mlp_in="synthetic", mlp_out="synthetic"),
        layout=layout,
    )


def _to_storage(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "fp16":
        return a.astype(np.float16)
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even


def write_store(url: str, n_images: int, tokens_per_image: int, n_layers: int, d_model: int, rows: RowFn, *,
                dtype: str = "fp16", compressor: str = "none", chunk_mb: float = 1.0, chunks_per_shard: int = 2,
                batch_images: int = 64, commit: Callable[[int], bool] | None = None,
                finalize: bool = True) -> StoreWriter:
    """Write every shard (``commit(shard)`` False: write it but leave it uncommitted), then finalize.

    Returns the writer (``writer.layout`` has the chunking). ``finalize`` is skipped when a shard is left
    uncommitted, which is what an interrupted harvest leaves behind.
    """
    meta = synthetic_meta(n_images, tokens_per_image, n_layers, d_model, dtype=dtype, compressor=compressor,
                          chunk_mb=chunk_mb, chunks_per_shard=chunks_per_shard)
    writer = StoreWriter.open(url, meta, overwrite=True)
    lay, T = writer.layout, tokens_per_image
    writer.write_constants({"ln_post_weight": np.ones(d_model), "ln_post_bias": np.zeros(d_model),
                            "proj": np.eye(d_model, 8)}, {"single": np.eye(2, 8)})
    all_committed = True
    for s in range(lay.n_shards):
        sw = writer.shard(s)
        imgs = lay.shard_images(s)
        for i0 in range(imgs.start, imgs.stop, batch_images):
            b = min(batch_images, imgs.stop - i0)
            x, y = rows(i0, b)
            x = _to_storage(np.asarray(x).reshape(b, T, n_layers, d_model), dtype)
            y = _to_storage(np.asarray(y).reshape(b, T, n_layers, d_model), dtype)
            idx = np.arange(i0, i0 + b)
            sw.add(i0, x, y, resid_final=np.zeros((b, d_model), np.float32),
                   embedding=np.zeros((b, 8), np.float32), labels=(idx % 2).astype(np.int32),
                   token_index=np.tile(np.arange(T, dtype=np.int16), (b, 1)), ok=np.ones(b, np.uint8))
        if commit is None or commit(s):
            sw.commit()
        else:
            all_committed = False
    if finalize and all_committed:
        records = [ImageRecord(index=i, source=f"synthetic#{i}", label=i % 2) for i in range(n_images)]
        writer.finalize(records, "train")
    return writer


class RandomRows:
    """Gaussian rows (in N(0, 1)·scale, targets an independent draw): fast bulk data for benchmarks."""

    def __init__(self, tokens_per_image: int, n_layers: int, d_model: int, seed: int = 0, scale: float = 1.0):
        self.T, self.L, self.d, self.seed, self.scale = tokens_per_image, n_layers, d_model, seed, scale

    def __call__(self, first_image: int, n_images: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, first_image, n_images])
        shape = (n_images * self.T, self.L, self.d)
        x = rng.standard_normal(shape, dtype=np.float32) * self.scale
        y = rng.standard_normal(shape, dtype=np.float32) * self.scale
        return x, y


class CrossLayerData:
    """Rows from a known sparse cross-layer dictionary (see the module docstring).

    E [L, n_true, d] and D[i] [n_true, L-i, d] are random unit-norm directions (the decoder of source i into
    target j is scaled so every source contributes equally on average). Codes: ``k_true`` distinct features per
    token and layer, magnitudes uniform in [0.5, 1.5].
    """

    def __init__(self, tokens_per_image: int, n_layers: int, d_model: int, *, n_true: int = 48, k_true: int = 2,
                 noise: float = 0.01, seed: int = 0):
        self.T, self.L, self.d = tokens_per_image, n_layers, d_model
        self.n_true, self.k_true, self.noise, self.seed = n_true, k_true, noise, seed
        rng = np.random.default_rng([seed, 12345])

        def unit(*shape):
            v = rng.standard_normal(shape)
            return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)

        self.E = unit(n_layers, n_true, d_model)
        self.D = [unit(n_true, n_layers - i, d_model) for i in range(n_layers)]

    def codes(self, first_image: int, n_images: int) -> np.ndarray:
        """Ground-truth codes [n_rows, L, n_true] of these images (one RNG stream per image)."""
        T, L, n, k = self.T, self.L, self.n_true, self.k_true
        out = np.zeros((n_images * T, L, n), np.float32)
        for j in range(n_images):
            rng = np.random.default_rng([self.seed, first_image + j])
            idx = np.argsort(rng.random((T, L, n)), axis=-1)[..., :k]
            val = rng.uniform(0.5, 1.5, size=(T, L, k)).astype(np.float32)
            np.put_along_axis(out[j * T:(j + 1) * T], idx, val, axis=-1)
        return out

    def __call__(self, first_image: int, n_images: int) -> tuple[np.ndarray, np.ndarray]:
        c = self.codes(first_image, n_images)
        x = np.einsum("rlf,lfd->rld", c, self.E)
        rng = np.random.default_rng([self.seed, first_image, n_images, 7])
        x += self.noise * rng.standard_normal(x.shape, dtype=np.float32)
        y = np.zeros_like(x)
        for i in range(self.L):
            y[:, i:] += np.einsum("rf,ftd->rtd", c[:, i], self.D[i])
        return x.astype(np.float32), y.astype(np.float32)
