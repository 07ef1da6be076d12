"""Reconstruction fidelity per layer × token type, streamed over whole store chunks.

Definitions (per layer l and token type t ∈ {cls, patches, all}; y = true MLP output, ŷ = CLT reconstruction
in raw target space, including b_dec if the CLT has one; n = evaluated tokens, d = width):

* ``mse``      = SSE / (n·d), SSE = Σ_tokens ‖ŷ − y‖²
* ``mse_std``  = mse / mean_d(var_out[l]) with the store's per-layer, per-dim target variance over *all*
                 tokens, whatever t is (the paper's standardised MSE; not an FVU of token type t: use ``fvu``)
* ``sst``      = Σ_tokens ‖y − ȳ‖² around the per-dim mean ȳ over the evaluated tokens (streamed as
                 Σy² − (Σy)²/n in float64)
* ``r2``       = 1 − SSE/SST, ``fvu`` = SSE/SST
* ``cosine``   = mean over tokens of cos(ŷ, y)
* ``l0``       = mean number of active features per token at layer l
* ``never_fired_frac`` = fraction of layer l's features that never fired on the evaluated tokens of type t of
                 this split (not "dead": a feature silent on CLS tokens may fire on patches)

Baselines, when the per-position train means μ (``clt_pipe.analyze.means``) are given: the trivial predictor
ŷ = μ[l, position] (it knows nothing about the image):
* ``r2_mean_pred``     = 1 − SSE_μ/SST, ``cosine_mean_pred`` = mean cos(μ, y)
* ``skill_vs_mean``    = 1 − SSE/SSE_μ: the share of the mean predictor's error the CLT removes
* ``cosine_centred``   = mean cos(ŷ − μ, y − μ): cosine without the shared mean direction

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

    def __init__(self, clt, var_out: np.ndarray, rows_per_batch: int = 2048, means: torch.Tensor | None = None):
        self.clt = clt
        self.means = means  # [L, P, d] per-position train means, or None
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
                "sse_mean": torch.zeros(L, dtype=torch.float64, device=dev),
                "cos_mean": torch.zeros(L, dtype=torch.float64, device=dev),
                "cos_centred": torch.zeros(L, dtype=torch.float64, device=dev),
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
            base = self._mean_baseline(batch.pos[sl], recon, y) if self.means is not None else None
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
                if base is not None:
                    for key, v in base.items():
                        a[key] += v[m].sum(0)
                if isinstance(act, tuple):
                    idx, on = act[0][m], act[1][m]  # [r, L, k]
                    a["l0"] += on.double().sum((0, 2))
                    a["fired"] |= fired_from_topk(idx, on, self.F)
                else:
                    on = act[m]  # [r, L, F]
                    a["l0"] += on.double().sum((0, 2))
                    a["fired"] |= on.any(0)

    def _mean_baseline(self, pos: np.ndarray, recon: torch.Tensor, y: torch.Tensor) -> dict:
        """Per-row [R, L] terms of the mean predictor: squared error, cosine, centred cosine of the CLT."""
        p = torch.from_numpy(np.clip(pos, 0, self.means.shape[1] - 1)).to(y.device)
        mu = self.means[:, p].permute(1, 0, 2).to(y.dtype)  # [R, L, d]
        cos = torch.nn.functional.cosine_similarity
        return {"sse_mean": (y - mu).double().pow(2).sum(-1),
                "cos_mean": cos(mu, y, dim=-1, eps=1e-12).double(),
                "cos_centred": cos(recon - mu, y - mu, dim=-1, eps=1e-12).double()}

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
            base = self._baseline_columns(a, sse, sst, n)
            for layer in range(self.L):
                rows.append({
                    "tokens": t, "layer": layer, "n_tokens": n,
                    "mse": float(mse[layer]), "mse_std": float(mse[layer] / max(self.var_out_mean[layer], 1e-30)),
                    "r2": float(1.0 - fvu[layer]), "fvu": float(fvu[layer]),
                    **{k: float(v[layer]) for k, v in base.items() if k.startswith("r2")},
                    "cosine": float(cos[layer]),
                    **{k: float(v[layer]) for k, v in base.items() if not k.startswith("r2")},
                    "l0": float(l0[layer]), "never_fired_frac": float(dead[layer]),
                    "sse": float(sse[layer]), "sst": float(sst[layer]),
                })
            aggregate.append({
                "tokens": t, "n_tokens": n, "mse": float(mse.mean()),
                "mse_std": float((mse / np.maximum(self.var_out_mean, 1e-30)).mean()),
                "r2": float((1.0 - fvu).mean()), **{k: float(v.mean()) for k, v in base.items()},
                "cosine": float(cos.mean()), "fvu": float(fvu.mean()),
                "l0": float(l0.mean()), "never_fired_frac": float(dead.mean()),
            })
        return {"per_layer": rows, "aggregate": aggregate}

    def _baseline_columns(self, a: dict, sse: np.ndarray, sst: np.ndarray, n: int) -> dict:
        if self.means is None:
            return {}
        sse_mean = a["sse_mean"].cpu().numpy()
        return {"r2_mean_pred": 1.0 - sse_mean / np.maximum(sst, 1e-30),
                "skill_vs_mean": 1.0 - sse / np.maximum(sse_mean, 1e-30),
                "cosine_mean_pred": a["cos_mean"].cpu().numpy() / n,
                "cosine_centred": a["cos_centred"].cpu().numpy() / n}

