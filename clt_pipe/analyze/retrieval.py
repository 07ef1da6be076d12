"""Per-layer feature retrieval: the nearest images by each layer's CLS code, and how often they share a label.

The code of image x at layer l is z_l of its CLS token, encoded from the cached MLP input (``clt.encode``).
Similarity is cosine; the gallery is every harvested image with a CLS slot, the query itself excluded.

* Label agreement (``per_layer``) = mean over queries of the fraction of the k nearest neighbours whose label
  equals the query's, with its standard error over queries. Queries: every labelled image of the gallery, or
  ``eval_queries`` of them drawn with ``numpy.random.default_rng(seed)`` (a per-query agreement lies in [0, 1],
  so 2,500 queries bound the s.e. by .01).
* Baselines beside it: the same retrieval on the raw MLP input (the CLS row of ``ln_2``'s output: what the CLT
  encodes; ``input_agreement``) and ``chance`` = the agreement of k neighbours drawn at random,
  Σ_c n_c(n_c − 1) / (N(N − 1)).
* Grids (``rows``): the k neighbours of ``grid_queries`` images (drawn the same way), for the report's pictures.

The CLS codes are kept sparse ([N, F] per layer, k·N values for a TopK CLT), the inputs dense ([N, L, d]).
"""

from __future__ import annotations

import numpy as np
import torch

from clt_pipe.analyze.stream import ChunkBatch

QUERY_BLOCK = 256


def cls_images(store) -> np.ndarray:
    has_cls = (store.token_index == 0).any(1)
    return np.flatnonzero(has_cls & store.image_ok)


def pick_queries(store, n: int, seed: int = 0) -> np.ndarray:
    pool = cls_images(store)
    n = min(n, len(pool))
    return np.sort(np.random.default_rng(seed).choice(pool, size=n, replace=False)) if n else pool[:0]


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _neighbours(gallery, queries: np.ndarray, k: int, sparse: bool) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, gallery rows) [Q, k] of the k nearest gallery rows of each query row, itself excluded."""
    n = gallery.shape[0]
    kk = min(k, n - 1)
    sims, idx = [], []
    for s in range(0, len(queries), QUERY_BLOCK):
        q = torch.as_tensor(queries[s:s + QUERY_BLOCK], device=gallery.device)
        qv = gallery.index_select(0, q)
        sim = torch.sparse.mm(gallery, qv.to_dense().T).T if sparse else qv @ gallery.T  # [B, N]
        sim[torch.arange(len(q), device=sim.device), q] = -float("inf")
        top = sim.topk(kk, dim=1)
        sims.append(top.values.cpu().numpy())
        idx.append(top.indices.cpu().numpy())
    return (np.concatenate(sims), np.concatenate(idx)) if sims else (np.zeros((0, kk)), np.zeros((0, kk), int))


class RetrievalAccumulator:
    def __init__(self, store, clt, device: torch.device, grid_queries: int, k: int, eval_queries: int = 0,
                 seed: int = 0, read_threads: int = 4):
        self.clt, self.k, self.device = clt, k, device
        self.L, self.F = clt.spec.n_layers, clt.spec.n_features
        self.labels = store.labels
        self.grid_images = pick_queries(store, grid_queries, seed)
        self.eval_queries, self.seed = eval_queries, seed
        self.images: list[np.ndarray] = []
        self.x: list[torch.Tensor] = []
        self.codes: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(self.L)]
        self.n = 0

    @torch.no_grad()
    def update(self, batch: ChunkBatch) -> None:
        m = batch.mask("cls")
        if not m.any():
            return
        x = batch.x[torch.from_numpy(m).to(batch.x.device)]
        z = _unit(self.clt.encode(x).float())  # [n, L, F]
        for layer in range(self.L):
            nz = z[:, layer].nonzero()
            self.codes[layer].append((nz.T + torch.tensor([[self.n], [0]], device=nz.device),
                                      z[nz[:, 0], layer, nz[:, 1]]))
        self.images.append(batch.image[m])
        self.x.append(_unit(x.float()))
        self.n += int(m.sum())

    def _gallery(self, layer: int) -> torch.Tensor:
        parts = self.codes[layer]
        idx = torch.cat([p[0] for p in parts], 1)
        val = torch.cat([p[1] for p in parts])
        return torch.sparse_coo_tensor(idx, val, (self.n, self.F), check_invariants=False).coalesce()

    def _eval_rows(self, lab: np.ndarray) -> np.ndarray:
        pool = np.flatnonzero(lab >= 0)
        if 0 < self.eval_queries < len(pool):
            pool = np.sort(np.random.default_rng(self.seed).choice(pool, self.eval_queries, replace=False))
        return pool

    def result(self) -> dict:
        if self.n < 2:
            return {"queries": [], "k": self.k, "rows": [], "per_layer": [], "n_eval_queries": 0}
        images = np.concatenate(self.images)
        lab = self.labels[images].astype(np.int64)
        rows_q = self._eval_rows(lab)
        where = {int(img): r for r, img in enumerate(images)}
        grid_rows = np.array([where[int(q)] for q in self.grid_images if int(q) in where], np.int64)
        x = torch.cat(self.x)  # [N, L, d]
        counts = np.bincount(lab[lab >= 0])
        n_lab = int(counts.sum())
        chance = float((counts * (counts - 1)).sum() / max(1, n_lab * (n_lab - 1)))
        per_layer, rows = [], []
        for layer in range(self.L):
            gallery = self._gallery(layer)
            out = {"layer": layer}
            for name, g, sparse in (("", gallery, True), ("input_", x[:, layer].contiguous(), False)):
                _, nb = _neighbours(g, rows_q, self.k, sparse)
                same = (lab[nb] == lab[rows_q, None]).mean(1) if len(rows_q) else np.zeros(0)
                out[f"{name}label_agreement"] = float(same.mean()) if len(same) else float("nan")
                out[f"{name}se"] = float(same.std(ddof=1) / np.sqrt(len(same))) if len(same) > 1 else float("nan")
            out.update(chance=chance, n_queries=int(len(rows_q)), k=self.k)
            per_layer.append(out)
            sims, nb = _neighbours(gallery, grid_rows, self.k, True)
            for qi, r in enumerate(grid_rows):
                for rank in range(nb.shape[1]):
                    nbr = int(nb[qi, rank])
                    rows.append({"layer": layer, "query": int(images[r]), "query_label": int(lab[r]),
                                 "rank": rank + 1, "neighbour": int(images[nbr]), "neighbour_label": int(lab[nbr]),
                                 "cosine": float(sims[qi, rank]), "same_label": bool(lab[nbr] == lab[r])})
        return {"queries": [int(images[r]) for r in grid_rows], "k": self.k, "rows": rows, "per_layer": per_layer,
                "n_eval_queries": int(len(rows_q))}
