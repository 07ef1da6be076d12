"""Layer-to-layer attribution C_proj (the paper's C_proj).

    C_proj[i→j] = E_x[ (1/T) Σ_t ⟨c_t(i→j), ŷ_t(j)⟩ / ‖ŷ_t(j)‖² ],   c_t(i→j) = z_i,t W_dec^{i→j}

in raw target space, with ŷ_t(j) = Σ_{i≤j} c_t(i→j) *excluding* b_dec, so for every token and target j the
ratios over sources sum to exactly 1 (up to rounding): every column of C_proj sums to 1. T is the number of
tokens of the chosen type in image x (CLS: 1; patches: all stored patches; all: every stored slot); the outer
expectation is over images. A token whose ŷ_t(j) is exactly zero has no defined ratio and is left out of that
image's mean for target j (counted in ``n_undefined``).

Result: one [L, L] matrix per token type, row = source i, column = target j, zero below the diagonal.
"""

from __future__ import annotations

import numpy as np
import torch

from clt_pipe.analyze.stream import TOKEN_TYPES, ChunkBatch, iter_chunks, row_batches


@torch.no_grad()
def token_ratios(clt, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ratios [R, L_src, L_tgt] and a validity mask [R, L_tgt] (ŷ_j ≠ 0)."""
    c = clt.contributions(x).float()  # [R, Ls, Lt, d]
    yhat = c.sum(1)  # [R, Lt, d], b_dec excluded
    denom = yhat.pow(2).sum(-1)  # [R, Lt]
    num = torch.einsum("rijd,rjd->rij", c, yhat)
    ok = denom > 0
    ratio = torch.where(ok[:, None, :], num / denom.clamp_min(1e-30)[:, None, :], torch.zeros_like(num))
    return ratio, ok


class AttributionAccumulator:
    def __init__(self, clt, rows_per_batch: int = 0):
        self.clt = clt
        L, d = clt.spec.n_layers, clt.spec.d_model
        self.L = L
        self.rows_per_batch = rows_per_batch or max(1, (1 << 28) // (L * L * d * 4))
        self.sum = {t: np.zeros((L, L), np.float64) for t in TOKEN_TYPES}  # Σ over images of image means
        self.n_images = {t: np.zeros(L, np.int64) for t in TOKEN_TYPES}  # images with a defined mean, per target
        self.n_tokens = {t: 0 for t in TOKEN_TYPES}
        self.n_undefined = {t: 0 for t in TOKEN_TYPES}

    @torch.no_grad()
    def update(self, batch: ChunkBatch) -> None:
        L = self.L
        uniq, inv = np.unique(batch.image, return_inverse=True)
        n_img = len(uniq)
        dev = batch.x.device
        masks = {t: torch.from_numpy(batch.mask(t)).to(dev) for t in TOKEN_TYPES}
        inv_t = torch.from_numpy(inv.astype(np.int64)).to(dev)
        sums = {t: torch.zeros(n_img, L, L, dtype=torch.float64, device=dev) for t in TOKEN_TYPES}
        counts = {t: torch.zeros(n_img, L, dtype=torch.float64, device=dev) for t in TOKEN_TYPES}
        any_mask = masks["all"]
        for sl in row_batches(batch.x.shape[0], self.rows_per_batch):
            m_any = any_mask[sl]
            if not bool(m_any.any()):
                continue
            ratio, ok = token_ratios(self.clt, batch.x[sl][m_any])
            img = inv_t[sl][m_any]
            for t in TOKEN_TYPES:
                m = masks[t][sl][m_any]
                if not bool(m.any()):
                    continue
                sums[t].index_add_(0, img[m], ratio[m].double())
                counts[t].index_add_(0, img[m], ok[m].double())
                self.n_tokens[t] += int(m.sum())
                self.n_undefined[t] += int((~ok[m]).sum())
        for t in TOKEN_TYPES:
            c = counts[t]  # [n_img, Lt]
            has = c > 0
            means = sums[t] / c.clamp_min(1)[:, None, :]
            self.sum[t] += means.sum(0).cpu().numpy()
            self.n_images[t] += has.sum(0).cpu().numpy()

    def result(self) -> dict:
        out = {}
        for t in TOKEN_TYPES:
            if self.n_tokens[t] == 0:
                continue
            mat = self.sum[t] / np.maximum(self.n_images[t], 1)[None, :]
            out[t] = {"matrix": mat, "n_tokens": self.n_tokens[t], "n_images": int(self.n_images[t].max()),
                      "n_undefined": self.n_undefined[t], "column_sums": mat.sum(0)}
        return out


def attribution(store, clt, device: torch.device, max_tokens: int = 0, read_threads: int = 4) -> dict:
    acc = AttributionAccumulator(clt)
    for batch in iter_chunks(store, device, max_tokens, read_threads):
        acc.update(batch)
    return acc.result()


def layer_scores(matrix: np.ndarray) -> np.ndarray:
    """Ablation ranking score of each source layer: Σ_j |C_proj[i→j]| (its row's absolute sum)."""
    return np.abs(matrix).sum(1)


def to_rows(result: dict) -> list[dict]:
    rows = []
    for t, r in result.items():
        mat = r["matrix"]
        L = mat.shape[0]
        for i in range(L):
            for j in range(i, L):
                rows.append({"tokens": t, "source": i, "target": j, "c_proj": float(mat[i, j])})
    return rows
