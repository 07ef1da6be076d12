"""Per-position train means of the MLP outputs: the mean-ablation value and the trivial predictor the CLT's
fidelity is judged against.

μ[l, p] = the mean over training images of layer l's MLP output at ViT position p (0 = CLS). It is read from the
store the CLT was trained on (``run.json``'s store URL) when that store opens and holds the same model;
otherwise from the analysed store itself, and the report says so (an in-sample mean flatters the baseline a
little). At most ``max_images`` images (0 = all) are read, whole chunks spread evenly over the store. Positions
the store never holds (a ``cls+K`` store's unsampled patches) get their token type's mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from clt_pipe.analyze.stream import iter_chunks
from clt_pipe.errors import CltPipeError


@dataclass
class PositionMeans:
    y: torch.Tensor  # [L, P, d] float32
    source: str  # the store URL the means come from
    n_images: int
    in_sample: bool  # True: read from the analysed store itself (no training store reachable)

    def describe(self) -> str:
        where = ("the analysed store itself (in-sample: the training store was not reachable)" if self.in_sample
                 else f"the training store {self.source}")
        return f"per-position mean of each MLP output over {self.n_images:,} images of {where}"


def spread_chunks(n_chunks: int, images_per_chunk: int, max_images: int) -> list[int]:
    """Chunk indices spread evenly over the store, enough to cover ``max_images`` images (0 = every chunk)."""
    if max_images <= 0 or max_images >= n_chunks * images_per_chunk:
        return list(range(n_chunks))
    need = max(1, -(-max_images // max(1, images_per_chunk)))
    return sorted({int(c) for c in np.linspace(0, n_chunks - 1, need).round()})


def position_means(store, n_positions: int, device: torch.device, max_images: int = 0,
                   read_threads: int = 4) -> tuple[torch.Tensor, int]:
    """(μ [L, P, d] float32 on ``device``, number of images read) of the store's MLP outputs."""
    lay = store.layout
    L, d = store.n_layers, store.d_model
    sums = torch.zeros(n_positions, L, d, dtype=torch.float64, device=device)
    counts = torch.zeros(n_positions, dtype=torch.float64, device=device)
    images: set[int] = set()
    chunks = spread_chunks(lay.n_chunks, lay.images_per_chunk, max_images)
    for b in iter_chunks(store, device, 0, read_threads, chunks=chunks):
        keep = b.valid & (b.pos >= 0) & (b.pos < n_positions)
        if not keep.any():
            continue
        pos = torch.from_numpy(b.pos[keep]).to(device)
        sums.index_add_(0, pos, b.y[torch.from_numpy(keep).to(device)].double())
        counts.index_add_(0, pos, torch.ones(len(pos), dtype=torch.float64, device=device))
        images.update(np.unique(b.image[keep]).tolist())
    if not bool((counts > 0).any()):
        raise CltPipeError(f"{store.url}: no valid token rows to take the per-position means from")
    seen = counts > 0
    mu = sums / counts.clamp_min(1)[:, None, None]
    for group in (torch.arange(1, n_positions, device=device), torch.zeros(1, dtype=torch.long, device=device)):
        hit = group[seen[group]]
        miss = group[~seen[group]]
        if len(miss):  # a position never stored: its token type's mean, else the mean over every stored row
            src = hit if len(hit) else torch.nonzero(seen).flatten()
            mu[miss] = sums[src].sum(0) / counts[src].sum()
    return mu.permute(1, 0, 2).float().contiguous(), len(images)


def train_means(store, train_url: str | None, device: torch.device, max_images: int,
                read_threads: int = 4) -> PositionMeans:
    """Per-position means from the CLT's training store when it opens and holds the same model, else from
    ``store``."""
    from clt_pipe.store.reader import ActivationStore

    n_pos = int(store.meta.model.n_positions)
    source, in_sample = store, train_url != store.url
    if in_sample and train_url:
        try:
            other = ActivationStore(train_url)
            if (other.meta.model.weights_sha256 == store.meta.model.weights_sha256
                    and other.n_layers == store.n_layers and other.d_model == store.d_model):
                source, in_sample = other, False
        except (CltPipeError, OSError, ValueError):
            pass
    mu, n_img = position_means(source, n_pos, device, max_images, read_threads)
    return PositionMeans(mu, str(source.url), n_img, in_sample)
