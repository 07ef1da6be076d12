"""Streaming feature statistics and a bounded-memory top-k of images per feature.

Pass 1 (``FeatureScan``, an accumulator with ``update(batch)``/``result()`` like analyze's) sees every valid
token row once. Per source layer l and feature f it keeps

* firing counts and activation sums split by token type (CLS vs patches) — float64 [L, F] each;
* the ``k`` images with the largest activation of the feature over any of their tokens (value + image id) —
  [L, F, k] each.

The activation of a feature is |z| (z itself for the ReLU-family sparsifiers; abs_topk codes may be negative).
Rows are encoded in groups of whole images, at most ``max_elems`` code values (rows × L × F) at a time (or one
image's T × L × F when that is more), so the dense codes never exceed that bound. Nothing is kept per token or
per image, and the per-image arrays are read chunk by chunk: memory is
L·F·(12·k + 32) bytes of state + ~3 × 4 × max(max_elems, T·L·F) bytes of codes + ``read_threads`` + 1 decoded
chunks, independent of the number of images. (Demo CLT, 6 × 512 features, k = 8: 0.4 MB of state.)

Pass 2 (``token_activations``) re-reads only the chunks holding the shown features' top images — at most
shown × k chunks, whole chunks as everywhere — and returns each (feature, image)'s per-token activations for
the heatmaps.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from clt_pipe.store import format as SF

MAX_ELEMS = {"cpu": 1 << 25, "cuda": 1 << 28}  # float32 codes per encode group: 128 MiB on CPU, 1 GiB on a GPU


@dataclass
class RowBatch:
    """Decoded valid-or-not rows of one chunk; the attributes analyze's ``ChunkBatch`` also has."""

    chunk: int
    x: torch.Tensor  # [R, L, d] float32 on the device
    pos: np.ndarray  # ViT position per row, 0 = CLS, -1 = empty slot
    image: np.ndarray  # store image index per row
    valid: np.ndarray  # bool: harvested image and a real slot


def stream_inputs(store, device, max_rows: int = 0, read_threads: int = 4, chunks=None):
    """Yield ``RowBatch`` per chunk, reading only ``mlp_in`` and only the chunk's slice of the per-image arrays
    (so no per-store array is ever held whole); reads run ahead in a thread pool."""
    lay = store.layout
    T = lay.tokens_per_image
    order = list(range(lay.n_chunks)) if chunks is None else list(chunks)
    arr = store.array(SF.MLP_IN)
    # Opened once, not per chunk; already read whole by another part of the run, then not read again.
    token_index, image_ok = (a if a is not None else store.array(n) for n, a in (
        (SF.TOKEN_INDEX, store.per_image_if_read(SF.TOKEN_INDEX)), (SF.IMAGE_OK, store.per_image_if_read(SF.IMAGE_OK))))

    def load(c: int):
        imgs, rows = lay.chunk_images(c), lay.chunk_rows(c)
        x = store.decode(arr[rows.start:rows.stop])
        pos = token_index[imgs.start:imgs.stop].reshape(-1).astype(np.int64)
        ok = image_ok[imgs.start:imgs.stop].astype(bool)
        return c, x, pos, ok

    budget = max_rows if max_rows > 0 else None
    ahead = max(1, read_threads)
    pool = ThreadPoolExecutor(ahead, thread_name_prefix="clt-atlas-read")
    try:
        futures = [pool.submit(load, c) for c in order[:ahead]]
        nxt = ahead
        while futures:
            c, x, pos, ok = futures.pop(0).result()
            if nxt < len(order):
                futures.append(pool.submit(load, order[nxt]))
                nxt += 1
            imgs = lay.chunk_images(c)
            image = np.repeat(np.arange(imgs.start, imgs.stop), T)
            valid = np.repeat(ok, T) & (pos >= 0)
            if budget is not None:
                if budget <= 0:
                    break
                r = min(budget, x.shape[0])
                x, pos, image, valid = x[:r], pos[:r], image[:r], valid[:r]
                budget -= r
            yield RowBatch(c, torch.from_numpy(np.ascontiguousarray(x)).to(device), pos, image, valid)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _image_groups(image: np.ndarray, max_rows: int):
    """Row slices of whole images (``image`` sorted), each at most ``max_rows`` rows unless one image is more."""
    if len(image) == 0:
        return
    starts = np.flatnonzero(np.r_[True, image[1:] != image[:-1]])
    bounds = np.r_[starts, len(image)]
    s = 0
    for i in range(1, len(bounds)):
        if bounds[i] - bounds[s] > max_rows and i - 1 > s:
            yield slice(int(bounds[s]), int(bounds[i - 1]))
            s = i - 1
    yield slice(int(bounds[s]), int(bounds[-1]))


class FeatureScan:
    """Pass 1 accumulator (see the module docstring)."""

    def __init__(self, clt, top_images: int, max_elems: int = 0):
        self.clt = clt
        L, F = clt.spec.n_layers, clt.spec.n_features
        self.L, self.F, self.k = L, F, int(top_images)
        dev = next(clt.parameters()).device
        max_elems = max_elems or MAX_ELEMS.get(dev.type, MAX_ELEMS["cpu"])
        self.max_rows = max(1, max_elems // (L * F))
        self.best_val = torch.zeros(L, F, self.k, device=dev)  # 0 = empty slot (an inactive feature never enters)
        self.best_img = torch.full((L, F, self.k), -1, dtype=torch.long, device=dev)
        self.fired = {t: torch.zeros(L, F, dtype=torch.float64, device=dev) for t in ("cls", "patches")}
        self.mass = {t: torch.zeros(L, F, dtype=torch.float64, device=dev) for t in ("cls", "patches")}
        self.n = {"cls": 0, "patches": 0}
        self.n_images = 0
        self.seconds = 0.0  # time spent in update (its share of a shared analyze pass)

    @torch.no_grad()
    def update(self, batch) -> None:
        t0 = time.perf_counter()
        try:
            self._update(batch)
        finally:
            self.seconds += time.perf_counter() - t0

    def _update(self, batch) -> None:
        keep = np.asarray(batch.valid, bool)
        if not keep.any():
            return
        dev = batch.x.device
        x = batch.x[torch.from_numpy(keep).to(dev)]
        pos, image = np.asarray(batch.pos)[keep], np.asarray(batch.image)[keep]
        for sl in _image_groups(image, self.max_rows):
            self._update_group(x[sl], pos[sl], image[sl])

    def _update_group(self, x: torch.Tensor, pos: np.ndarray, image: np.ndarray) -> None:
        L, F, k = self.L, self.F, self.k
        z = self.clt.encode(x).float().abs()  # [r, L, F]
        dev = z.device
        is_cls = torch.from_numpy(pos == 0).to(dev)
        for t, m in (("cls", is_cls), ("patches", ~is_cls)):
            n = int(m.sum())
            if n:
                zt = z[m]
                self.n[t] += n
                self.fired[t] += (zt > 0).sum(0, dtype=torch.float64)
                self.mass[t] += zt.sum(0, dtype=torch.float64)
        uniq, inv = np.unique(image, return_inverse=True)
        self.n_images += len(uniq)
        flat = z.reshape(z.shape[0], L * F)
        inv_t = torch.from_numpy(inv.astype(np.int64)).to(dev)
        per_img = torch.zeros(len(uniq), L * F, device=dev).scatter_reduce_(
            0, inv_t[:, None].expand(-1, L * F), flat, "amax", include_self=True)
        cand_val = torch.cat([self.best_val, per_img.T.reshape(L, F, len(uniq))], -1)
        ids = torch.from_numpy(uniq.astype(np.int64)).to(dev)
        cand_img = torch.cat([self.best_img, ids.expand(L, F, -1)], -1)
        top = cand_val.topk(k, dim=-1)
        self.best_val = top.values
        self.best_img = torch.gather(cand_img, -1, top.indices)

    def result(self) -> dict:
        """numpy arrays: n_tokens per type, fired/mass [type][L, F], top_val/top_img [L, F, k], and the ranking
        score (mean activation over all evaluated tokens = firing density × mean activation when firing)."""
        fired = {t: v.cpu().numpy() for t, v in self.fired.items()}
        mass = {t: v.cpu().numpy() for t, v in self.mass.items()}
        n_all = self.n["cls"] + self.n["patches"]
        score = (mass["cls"] + mass["patches"]) / max(n_all, 1)
        return {"n_tokens": dict(self.n), "n_images": self.n_images, "fired": fired, "mass": mass,
                "top_val": self.best_val.cpu().numpy(), "top_img": self.best_img.cpu().numpy(), "score": score}


@torch.no_grad()
def token_activations(store, clt, wanted: dict[tuple[int, int], list[int]], device,
                      read_threads: int = 4) -> dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]]:
    """{(layer, feature, image): (positions [T], activations |z| [T])} for the wanted (feature -> images).

    Reads the whole chunks holding those images (nothing else) and encodes only their rows."""
    lay = store.layout
    T = lay.tokens_per_image
    by_image: dict[int, list[tuple[int, int]]] = {}
    for (layer, f), imgs in wanted.items():
        for i in imgs:
            by_image.setdefault(int(i), []).append((layer, f))
    chunks = sorted({i // lay.images_per_chunk for i in by_image})
    out: dict = {}
    for b in stream_inputs(store, device, 0, read_threads, chunks=chunks):
        first = lay.chunk_images(b.chunk).start
        imgs = sorted(i for i in by_image if i // lay.images_per_chunk == b.chunk)
        rows = np.concatenate([np.arange((i - first) * T, (i - first + 1) * T) for i in imgs])
        z = clt.encode(b.x[torch.from_numpy(rows).to(b.x.device)]).float().abs()  # [n·T, L, F]
        z = z.reshape(len(imgs), T, clt.spec.n_layers, clt.spec.n_features)
        for j, i in enumerate(imgs):
            r = slice((i - first) * T, (i - first + 1) * T)
            pos, ok = b.pos[r], b.valid[r]
            for layer, f in by_image[i]:
                acts = z[j, :, layer, f].cpu().numpy()
                out[(layer, f, i)] = (np.where(ok, pos, -1), np.where(ok, acts, 0.0))
    return out
