"""Per-layer feature retrieval: for a few query images, the nearest images by each layer's CLS code.

The code of image x at layer l is z_l of its CLS token, encoded from the cached MLP input (``clt.encode``).
Similarity is cosine between codes; the gallery is every harvested image with a CLS slot (streamed — only the
running top-k per query and layer is kept), the query itself excluded. Queries: ``retrieval_queries`` images
drawn without replacement with ``numpy.random.default_rng(seed)`` from the eligible images, sorted.
Label agreement = fraction of the k neighbours whose label equals the query's.
"""

from __future__ import annotations

import numpy as np
import torch

from clt_pipe.analyze.stream import ChunkBatch, iter_chunks


def cls_images(store) -> np.ndarray:
    has_cls = (store.token_index == 0).any(1)
    return np.flatnonzero(has_cls & store.image_ok)


def pick_queries(store, n: int, seed: int = 0) -> np.ndarray:
    pool = cls_images(store)
    n = min(n, len(pool))
    return np.sort(np.random.default_rng(seed).choice(pool, size=n, replace=False)) if n else pool[:0]


def _cls_codes(clt, batch: ChunkBatch, keep: np.ndarray | None = None):
    m = batch.mask("cls")
    if keep is not None:
        m &= np.isin(batch.image, keep)
    if not m.any():
        return None, None
    x = batch.x[torch.from_numpy(m).to(batch.x.device)]
    z = clt.encode(x).float()  # [n, L, F]
    z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return batch.image[m], z


class RetrievalAccumulator:
    def __init__(self, store, clt, device: torch.device, n_queries: int, k: int, seed: int = 0,
                 read_threads: int = 4):
        self.clt, self.k = clt, k
        self.L = clt.spec.n_layers
        self.labels = store.labels
        self.queries = pick_queries(store, n_queries, seed)
        Q = len(self.queries)
        self.best_sim = torch.full((self.L, Q, k), -float("inf"), device=device)
        self.best_idx = torch.full((self.L, Q, k), -1, dtype=torch.long, device=device)
        self.qz = None
        if Q:
            chunks = sorted({int(q) // store.layout.images_per_chunk for q in self.queries})
            got = {}
            for b in iter_chunks(store, device, 0, read_threads, chunks=chunks):
                imgs, z = _cls_codes(clt, b, self.queries)
                if imgs is not None:
                    for i, img in enumerate(imgs):
                        got[int(img)] = z[i]
            self.qz = torch.stack([got[int(q)] for q in self.queries], 1)  # [L, Q, F]
        self.q_t = torch.as_tensor(self.queries, device=device)

    @torch.no_grad()
    def update(self, batch: ChunkBatch) -> None:
        if self.qz is None:
            return
        imgs, z = _cls_codes(self.clt, batch)
        if imgs is None:
            return
        ids = torch.as_tensor(imgs, device=z.device)
        sims = torch.einsum("lqf,nlf->lqn", self.qz, z)  # [L, Q, n]
        sims = sims.masked_fill(ids[None, None, :] == self.q_t[None, :, None], -float("inf"))
        all_sim = torch.cat([self.best_sim, sims], -1)
        all_idx = torch.cat([self.best_idx, ids[None, None, :].expand(self.L, len(self.queries), -1)], -1)
        kk = min(self.k, all_sim.shape[-1])
        top = all_sim.topk(kk, dim=-1)
        self.best_sim = top.values
        self.best_idx = torch.gather(all_idx, -1, top.indices)

    def result(self) -> dict:
        rows, per_layer = [], []
        sim = self.best_sim.cpu().numpy()
        idx = self.best_idx.cpu().numpy()
        for layer in range(self.L):
            agree = []
            for qi, q in enumerate(self.queries):
                ql = int(self.labels[q])
                for rank in range(idx.shape[-1]):
                    n = int(idx[layer, qi, rank])
                    if n < 0:
                        continue
                    same = int(self.labels[n]) == ql
                    agree.append(same)
                    rows.append({"layer": layer, "query": int(q), "query_label": ql, "rank": rank + 1,
                                 "neighbour": n, "neighbour_label": int(self.labels[n]),
                                 "cosine": float(sim[layer, qi, rank]), "same_label": same})
            per_layer.append({"layer": layer, "label_agreement": float(np.mean(agree)) if agree else float("nan"),
                              "n_pairs": len(agree)})
        return {"queries": [int(q) for q in self.queries], "k": self.k, "rows": rows, "per_layer": per_layer}
