"""The chunk stream that every cache-only analysis part (fidelity, attribution, open-loop substitution, retrieval,
atlas) consumes in one pass: whole chunks are read (never row gathers: ~230 MB/s cold), decoded to float32 on the
analysis device and handed to accumulators with an ``update(batch)`` / ``result()`` interface.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from clt_pipe.prefetch import prefetched
from clt_pipe.tokens import TokenType, token_mask


@dataclass
class ChunkBatch:
    """Decoded rows of one store chunk (possibly truncated by ``max_tokens``).

    ``x``/``y`` are float32 [R, L, d] on the analysis device; ``pos`` the ViT position of each row (0 = CLS);
    ``image`` the store image index of each row; ``valid`` rows of images that were harvested (image_ok).
    """

    chunk: int
    x: torch.Tensor
    y: torch.Tensor
    pos: np.ndarray
    image: np.ndarray
    valid: np.ndarray

    def mask(self, tokens: TokenType) -> np.ndarray:
        return token_mask(self.pos, tokens) & self.valid


def iter_chunks(store, device: torch.device, max_rows: int = 0, read_threads: int = 4, chunks=None):
    """Yield ``ChunkBatch`` for every chunk (or the given ones) in order; reads run ahead in a thread pool."""
    lay = store.layout
    order = list(range(lay.n_chunks)) if chunks is None else list(chunks)
    token_index = store.token_index
    image_ok = store.image_ok

    def load(c: int):
        xin, yout = store.read_chunk(c)
        return c, store.decode(xin), None if yout is None else store.decode(yout)

    budget = max_rows if max_rows > 0 else None
    pool = ThreadPoolExecutor(max(1, read_threads), thread_name_prefix="clt-analyze-read")
    try:
        for _, fut in prefetched(order, lambda c: pool.submit(load, c), ahead=max(1, read_threads)):
            c, x, y = fut.result()
            imgs = lay.chunk_images(c)
            pos = token_index[imgs.start:imgs.stop].reshape(-1).astype(np.int64)
            image = np.repeat(np.arange(imgs.start, imgs.stop), lay.tokens_per_image)
            valid = np.repeat(image_ok[imgs.start:imgs.stop], lay.tokens_per_image) & (pos >= 0)
            if budget is not None:
                if budget <= 0:
                    break
                r = min(budget, x.shape[0])
                x, pos, image, valid = x[:r], pos[:r], image[:r], valid[:r]
                y = None if y is None else y[:r]
                budget -= r
            xt = torch.from_numpy(np.ascontiguousarray(x)).to(device)
            yt = store.targets_on(device)(xt) if y is None else torch.from_numpy(np.ascontiguousarray(y)).to(device)
            yield ChunkBatch(c, xt, yt, pos, image, valid)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def row_batches(n: int, size: int):
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))
