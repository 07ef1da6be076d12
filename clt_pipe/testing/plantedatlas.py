"""A synthetic store with planted features and a hand-built CLT that reads them (atlas tests, benchmark).

Layout: ``T = 17`` tokens per image (CLS + a 4 × 4 patch grid: 32 px images, 8 px patches), ``L = 3`` layers,
``d = 16``. The CLT's encoder of layer l is the identity on the first ``F`` dimensions, so feature (l, f) reads
exactly ``x[row, l, f]`` (relu_topk). Inputs are zero except:

* ``PLANTED`` = feature (1, 3): on three images, at one patch each, with three distinct values (so the top-3
  order is known), and at 0.1 on the CLS token of ``DISTRACTOR`` (a weaker 4th image);
* ``BACKGROUND`` = feature (0, 5): 0.05 on every patch of every image (the densest feature, so it ranks first
  by score in layer 0).

The planted decoder of (1, 3) writes ``DEC_NORMS`` (norms into layers 1 and 2) along dimension 1, which the
store's head (identity-like projection, two classes ``a``/``b``) turns into a push towards class ``b``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from clt_pipe.clt.model import CrossLayerTranscoder
from clt_pipe.clt.spec import CLTSpec
from clt_pipe.clt.rundir import save_fitted
from clt_pipe.store.reader import ActivationStore
from clt_pipe.testing.synthstore import write_store

T, L, D, N_FEATURES = 17, 3, 16, 8
PLANTED = (1, 3)
PLANTED_IMAGES = {5: (6, 3.0), 17: (11, 2.5), 30: (2, 2.0)}  # image -> (patch position, value)
DISTRACTOR = 9
BACKGROUND = (0, 5)
DEC_NORMS = (0.0, 1.5, 4.0)


class PlantedRows:
    def __call__(self, first_image: int, n_images: int):
        x = np.zeros((n_images, T, L, D), np.float32)
        x[:, 1:, BACKGROUND[0], BACKGROUND[1]] = 0.05
        for j in range(n_images):
            i = first_image + j
            if i in PLANTED_IMAGES:
                p, v = PLANTED_IMAGES[i]
                x[j, p, PLANTED[0], PLANTED[1]] = v
            if i == DISTRACTOR:
                x[j, 0, PLANTED[0], PLANTED[1]] = 0.1
        x = x.reshape(n_images * T, L, D)
        return x, np.zeros_like(x)


def planted_clt() -> CrossLayerTranscoder:
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CLTSpec(L, D, N_FEATURES, "relu_topk", 2))
    with torch.no_grad():
        clt.W_enc.zero_()
        for layer in range(L):
            clt.W_enc[layer, :N_FEATURES, :N_FEATURES] = torch.eye(N_FEATURES)
        s, f = PLANTED
        clt.W_dec[s][f].zero_()
        for t in range(s, L):
            clt.W_dec[s][f, t - s, 1] = DEC_NORMS[t]
    return clt


def build(root: Path, n_images: int = 40, chunk_mb: float = 0.01) -> dict:
    root = Path(root)
    url = str(root / "planted.zarr")
    write_store(url, n_images, T, L, D, PlantedRows(), chunk_mb=chunk_mb, chunks_per_shard=2)
    store = ActivationStore(url)
    run_dir = root / "clt-run"
    save_fitted(run_dir, planted_clt(), {"store": {"url": url, "fingerprint": store.meta.fingerprint,
                                                   "model": store.model, "n_layers": L, "d_model": D}})
    return {"store": url, "clt": str(run_dir)}
