"""Layer-to-layer attribution C_proj (the paper's C_proj).

    C_proj[i→j] = E_x[ (1/T) Σ_t ⟨c_t(i→j), ŷ_t(j)⟩ / ‖ŷ_t(j)‖² ],   c_t(i→j) = z_i,t W_dec^{i→j}

in raw target space, with ŷ_t(j) = Σ_{i≤j} c_t(i→j) *excluding* b_dec, so for every token and target j the
ratios over sources sum to exactly 1 (up to rounding): every column of C_proj sums to 1. T is the number of
tokens of the chosen type in image x (CLS: 1; patches: all stored patches; all: every stored slot); the outer
expectation is over images. A token whose ŷ_t(j) is exactly zero has no defined ratio and is left out of that
image's mean for target j (counted in ``n_undefined``).

Result: one [L, L] matrix per token type, row = source i, column = target j, zero below the diagonal; and per
token type the *residual share* of every source layer (``token_attribution``), the same ratio taken on the sum
of all targets, which the ablation ranking uses.
"""

from __future__ import annotations

import numpy as np
import torch

from clt_pipe.analyze.stream import ChunkBatch, iter_chunks, row_batches
from clt_pipe.tokens import TOKEN_TYPES


def _ratios(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ratios ⟨c_i, ŷ⟩/‖ŷ‖² over the source axis 1 of ``c`` [R, Ls, ..., d], ŷ = Σ_i c_i; and ŷ ≠ 0."""
    yhat = c.sum(1, keepdim=True)
    denom = yhat.pow(2).sum(-1)  # [R, 1, ...]
    num = (c * yhat).sum(-1)  # [R, Ls, ...]
    ok = denom > 0
    ratio = torch.where(ok, num / denom.clamp_min(1e-30), torch.zeros_like(num))
    return ratio, ok.squeeze(1)


@torch.no_grad()
def token_ratios(clt, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ratios [R, L_src, L_tgt] and a validity mask [R, L_tgt] (ŷ_j ≠ 0)."""
    ratio, ok, _, _ = token_attribution(clt, x)
    return ratio, ok


@torch.no_grad()
def token_attribution(clt, x: torch.Tensor):
    """(ratios [R, Ls, Lt], ŷ_j ≠ 0 [R, Lt], residual shares [R, Ls], Σ_j ŷ_j ≠ 0 [R]).

    The residual share of source i is ⟨Σ_j c(i→j), Σ_j ŷ(j)⟩ / ‖Σ_j ŷ(j)‖²: its part of everything the MLPs
    write into the residual stream (b_dec excluded); it sums to 1 over sources, and a layer is not favoured for
    reaching more targets beyond what it actually writes.
    """
    c = clt.contributions(x).float()  # [R, Ls, Lt, d]
    ratio, ok = _ratios(c)
    share, share_ok = _ratios(c.sum(2))
    return ratio, ok, share, share_ok


class AttributionAccumulator:
    def __init__(self, clt, rows_per_batch: int = 0):
        self.clt = clt
        L, d = clt.spec.n_layers, clt.spec.d_model
        self.L = L
        self.rows_per_batch = rows_per_batch or max(1, (1 << 28) // (L * L * d * 4))
        self.sum = {t: np.zeros((L, L), np.float64) for t in TOKEN_TYPES}  # Σ over images of image means
        self.n_images = {t: np.zeros(L, np.int64) for t in TOKEN_TYPES}  # images with a defined mean, per target
        self.share_sum = {t: np.zeros(L, np.float64) for t in TOKEN_TYPES}  # Σ over images of residual shares
        self.share_images = {t: 0 for t in TOKEN_TYPES}
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
        shares = {t: torch.zeros(n_img, L, dtype=torch.float64, device=dev) for t in TOKEN_TYPES}
        share_counts = {t: torch.zeros(n_img, dtype=torch.float64, device=dev) for t in TOKEN_TYPES}
        any_mask = masks["all"]
        for sl in row_batches(batch.x.shape[0], self.rows_per_batch):
            m_any = any_mask[sl]
            if not bool(m_any.any()):
                continue
            ratio, ok, share, share_ok = token_attribution(self.clt, batch.x[sl][m_any])
            img = inv_t[sl][m_any]
            for t in TOKEN_TYPES:
                m = masks[t][sl][m_any]
                if not bool(m.any()):
                    continue
                sums[t].index_add_(0, img[m], ratio[m].double())
                counts[t].index_add_(0, img[m], ok[m].double())
                shares[t].index_add_(0, img[m], share[m].double())
                share_counts[t].index_add_(0, img[m], share_ok[m].double())
                self.n_tokens[t] += int(m.sum())
                self.n_undefined[t] += int((~ok[m]).sum())
        for t in TOKEN_TYPES:
            c = counts[t]  # [n_img, Lt]
            has = c > 0
            means = sums[t] / c.clamp_min(1)[:, None, :]
            self.sum[t] += means.sum(0).cpu().numpy()
            self.n_images[t] += has.sum(0).cpu().numpy()
            sc = share_counts[t]
            self.share_sum[t] += (shares[t] / sc.clamp_min(1)[:, None]).sum(0).cpu().numpy()
            self.share_images[t] += int((sc > 0).sum())

    def result(self) -> dict:
        out = {}
        for t in TOKEN_TYPES:
            if self.n_tokens[t] == 0:
                continue
            mat = self.sum[t] / np.maximum(self.n_images[t], 1)[None, :]
            out[t] = {"matrix": mat, "n_tokens": self.n_tokens[t], "n_images": int(self.n_images[t].max()),
                      "n_undefined": self.n_undefined[t], "column_sums": mat.sum(0),
                      "residual_share": self.share_sum[t] / max(self.share_images[t], 1)}
        return out


def attribution(store, clt, device: torch.device, max_tokens: int = 0, read_threads: int = 4) -> dict:
    acc = AttributionAccumulator(clt)
    for batch in iter_chunks(store, device, max_tokens, read_threads):
        acc.update(batch)
    return acc.result()


def to_rows(result: dict) -> list[dict]:
    rows = []
    for t, r in result.items():
        mat = r["matrix"]
        L = mat.shape[0]
        for i in range(L):
            for j in range(i, L):
                rows.append({"tokens": t, "source": i, "target": j, "c_proj": float(mat[i, j])})
    return rows
