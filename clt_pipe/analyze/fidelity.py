"""Reconstruction fidelity per layer × token type, streamed over whole store chunks.

Definitions (per layer l and token type t ∈ {cls, patches, all}; y = true MLP output, ŷ = CLT reconstruction
in raw target space, including b_dec if the CLT has one; n = evaluated tokens, d = width):

* ``mse``      = SSE / (n·d), SSE = Σ_tokens ‖ŷ − y‖²
* ``mse_std``  = mse / mean_d(var_out[l]) with the store's per-layer, per-dim target variance (all tokens)
* ``sst``      = Σ_tokens ‖y − ȳ‖² around the per-dim mean ȳ over the evaluated tokens (streamed as
                 Σy² − (Σy)²/n in float64)
* ``r2``       = 1 − SSE/SST, ``fvu`` = SSE/SST
* ``cosine``   = mean over tokens of cos(ŷ, y)
* ``l0``       = mean number of active features per token at layer l
* ``dead_frac``= fraction of layer l's features never active on any evaluated token of type t

The aggregate row per token type (the paper's table form) averages mse / mse_std / r2 / cosine over layers.
"""

from __future__ import annotations

import numpy as np
import torch

from clt_pipe.analyze.stream import ChunkBatch, row_batches
from clt_pipe.clt.sparsifiers import fired_from_topk
from clt_pipe.tokens import TOKEN_TYPES


class FidelityAccumulator:
    """Streaming fidelity statistics; ``update`` takes ChunkBatch objects, ``result`` returns rows."""

    def __init__(self, clt, var_out: np.ndarray, rows_per_batch: int = 2048):
        self.clt = clt
        L, d, F = clt.spec.n_layers, clt.spec.d_model, clt.spec.n_features
        self.L, self.d, self.F = L, d, F
        self.var_out_mean = np.asarray(var_out, np.float64).mean(axis=1)  # [L]
        self.rows_per_batch = rows_per_batch
        dev = next(clt.parameters()).device
        self.acc = {
            t: {
                "n": 0,
                "sse": torch.zeros(L, dtype=torch.float64, device=dev),
                "sum_y": torch.zeros(L, d, dtype=torch.float64, device=dev),
                "sum_y2": torch.zeros(L, dtype=torch.float64, device=dev),
                "cos": torch.zeros(L, dtype=torch.float64, device=dev),
                "l0": torch.zeros(L, dtype=torch.float64, device=dev),
                "fired": torch.zeros(L, F, dtype=torch.bool, device=dev),
            }
            for t in TOKEN_TYPES
        }

    @torch.no_grad()
    def update(self, batch: ChunkBatch) -> None:
        masks = {t: torch.from_numpy(batch.mask(t)).to(batch.x.device) for t in TOKEN_TYPES}
        for sl in row_batches(batch.x.shape[0], self.rows_per_batch):
            x, y = batch.x[sl], batch.y[sl]
            out = self.clt(x)
            recon = out.recon.float()
            err = (recon - y).double()
            sse = err.pow(2).sum(-1)  # [R, L]
            yd = y.double()
            cos = torch.nn.functional.cosine_similarity(recon, y, dim=-1, eps=1e-12).double()  # [R, L]
            act = out.active()
            for t in TOKEN_TYPES:
                m = masks[t][sl]
                if not bool(m.any()):
                    continue
                a = self.acc[t]
                a["n"] += int(m.sum())
                a["sse"] += sse[m].sum(0)
                a["sum_y"] += yd[m].sum(0)
                a["sum_y2"] += yd[m].pow(2).sum((0, 2))
                a["cos"] += cos[m].sum(0)
                if isinstance(act, tuple):
                    idx, on = act[0][m], act[1][m]  # [r, L, k]
                    a["l0"] += on.double().sum((0, 2))
                    a["fired"] |= fired_from_topk(idx, on, self.F)
                else:
                    on = act[m]  # [r, L, F]
                    a["l0"] += on.double().sum((0, 2))
                    a["fired"] |= on.any(0)

    def result(self) -> dict:
        rows, aggregate = [], []
        for t in TOKEN_TYPES:
            a = self.acc[t]
            n = a["n"]
            if n == 0:
                continue
            sse = a["sse"].cpu().numpy()
            sst = (a["sum_y2"] - a["sum_y"].pow(2).sum(-1) / n).cpu().numpy()
            mse = sse / (n * self.d)
            cos = a["cos"].cpu().numpy() / n
            l0 = a["l0"].cpu().numpy() / n
            dead = 1.0 - a["fired"].float().mean(-1).cpu().numpy()
            fvu = sse / np.maximum(sst, 1e-30)
            for layer in range(self.L):
                rows.append({
                    "tokens": t, "layer": layer, "n_tokens": n,
                    "mse": float(mse[layer]), "mse_std": float(mse[layer] / max(self.var_out_mean[layer], 1e-30)),
                    "r2": float(1.0 - fvu[layer]), "fvu": float(fvu[layer]), "cosine": float(cos[layer]),
                    "l0": float(l0[layer]), "dead_frac": float(dead[layer]),
                    "sse": float(sse[layer]), "sst": float(sst[layer]),
                })
            aggregate.append({
                "tokens": t, "n_tokens": n, "mse": float(mse.mean()),
                "mse_std": float((mse / np.maximum(self.var_out_mean, 1e-30)).mean()),
                "r2": float((1.0 - fvu).mean()), "cosine": float(cos.mean()), "fvu": float(fvu.mean()),
                "l0": float(l0.mean()), "dead_frac": float(dead.mean()),
            })
        return {"per_layer": rows, "aggregate": aggregate}

