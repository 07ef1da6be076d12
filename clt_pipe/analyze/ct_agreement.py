"""How closely circuit-tracer's reading of an export reproduces the CLT: R² and L0 per token type and layer.

Pooled over all rows a ViT's few CLS rows (1 in 17 on the demo, 1 in 197 for ViT-B/16) vanish among the patches,
so every figure is also given for ``cls`` and ``patches`` separately, and ``shortfall`` names the worst token
type and layer whose R² against the CLT falls below the user's bound.
"""

from __future__ import annotations

import numpy as np
import torch

from clt_pipe.clt.model import CrossLayerTranscoder
from clt_pipe.tokens import token_mask

TYPES = ("all", "cls", "patches")
KEYS = ("r2_vs_ours", "r2_vs_targets", "r2_ours_vs_targets", "l0_ours", "l0_circuit_tracer")


def r2_per_layer(pred: torch.Tensor, ref: torch.Tensor) -> list[float]:
    """Per layer 1 − SSE/SST over rows, pred/ref [N, L, d]."""
    p, r = pred.double(), ref.double()
    sse = (p - r).pow(2).sum((0, 2))
    sst = (r - r.mean(0, keepdim=True)).pow(2).sum((0, 2)).clamp_min(1e-30)
    return (1 - sse / sst).tolist()


def _block(rec, th, y, l0_ours, l0_ct) -> dict:
    per_layer = {
        "r2_vs_ours": r2_per_layer(th, rec),
        "r2_vs_targets": r2_per_layer(th, y),
        "r2_ours_vs_targets": r2_per_layer(rec, y),
        "l0_ours": l0_ours.mean(0).tolist(),
        "l0_circuit_tracer": l0_ct.mean(0).tolist(),
    }
    summ = {k: {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v))}
            for k, v in per_layer.items()}
    return {"n_rows": int(rec.shape[0]), "per_layer": per_layer, "summary": summ}


@torch.no_grad()
def agreement(ours: CrossLayerTranscoder, read, x: torch.Tensor, y: torch.Tensor, pos: np.ndarray,
              batch: int = 1024) -> dict:
    """``read``: x [B, L, d] -> (circuit-tracer's reconstruction [B, L, d], its active count per row [B, L]).

    ``per_layer``/``summary`` are over all rows; ``by_token_type`` holds the same for ``all``, ``cls`` and
    ``patches`` (a type with no rows is left out)."""
    recs, theirs, l0s_ours, l0s_ct = [], [], [], []
    for s in range(0, x.shape[0], batch):
        xb = x[s:s + batch]
        out = ours(xb)
        recs.append(out.recon.float())
        l0s_ours.append((out.z != 0).float().sum(-1))
        rt, l0 = read(xb)
        theirs.append(rt.float())
        l0s_ct.append(l0.float())
    rec, th = torch.cat(recs), torch.cat(theirs)
    l0_ours, l0_ct = torch.cat(l0s_ours), torch.cat(l0s_ct)
    by_type = {}
    for t in TYPES:
        m = torch.as_tensor(token_mask(pos, t), device=rec.device)
        if bool(m.any()):
            by_type[t] = _block(rec[m], th[m], y[m], l0_ours[m], l0_ct[m])
    pooled = by_type["all"]
    return {"n_rows": pooled["n_rows"], "per_layer": pooled["per_layer"], "summary": pooled["summary"],
            "by_token_type": by_type, "max_abs_diff": float((th - rec).abs().max()) if rec.numel() else 0.0}


def shortfall(agr: dict, min_r2: float) -> dict | None:
    """The token type and layer with the lowest R² of circuit-tracer's reading vs the CLT, if below ``min_r2``:
    {type, layer, r2, l0_ours, l0_circuit_tracer}; None when every type and layer reaches it."""
    worst = None
    for t, block in agr["by_token_type"].items():
        if t == "all" and len(agr["by_token_type"]) > 1:
            continue  # the pooled rows hide what the token types show; judge those
        pl = block["per_layer"]
        for layer, r2 in enumerate(pl["r2_vs_ours"]):
            if r2 < min_r2 and (worst is None or r2 < worst["r2"]):
                worst = {"type": t, "layer": layer, "r2": r2, "l0_ours": pl["l0_ours"][layer],
                         "l0_circuit_tracer": pl["l0_circuit_tracer"][layer]}
    return worst
