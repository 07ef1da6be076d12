"""Necessity / sufficiency ablations over layers (the paper's necessity / sufficiency table).

The paper does not state its protocol; this module's definitions (closed-loop, per token type T ∈ {cls, all}):

Ranking (``ablation_rank``), a score per layer that does not grow with the number of targets a layer reaches
(an absolute C_proj row sum does: row i has L−i entries and C_proj[0→0] = 1, so it ranks 0, 1, 2, … whatever
the data):
* ``attribution`` (default): layer i's share of the total MLP write into the final residual,
  E_x[(1/T) Σ_t ⟨Σ_j c_t(i→j), Σ_j ŷ_t(j)⟩ / ‖Σ_j ŷ_t(j)‖²] (the shares sum to 1 over layers; for CLS this is
  the part of the residual that ln_post and the projection turn into the embedding). Highest first.
* ``final_layer``: C_proj_T[i→L−1], layer i's share of the last layer's reconstruction.
* ``fvu``: the worst-reconstructed layers first (highest FVU of token type T from the fidelity part).
Ties break toward the earlier layer.

Variants (closed-loop passes). "Drop layer i" is the same operation for every i; every CLT-replaced target
decodes from all sources 0..j (the full reconstruction, whatever ``sources_before_window`` says):
* ``full``       — the replacement model: the CLT replaces the MLP at every layer for tokens T (reference).
* ``drop_top1``  — necessity, per ``ablation_mode``:
  ``features`` (default): the replacement model with the top layer's *features* removed — they write into no
  target (every MLP is still the CLT's). ``true`` / ``zero``: the top layer's MLP output is its real output / 0;
  every other layer keeps the CLT reconstruction from all sources (the dropped layer's features included).
* ``keep_topk``  — sufficiency: ``features``: only the top-``ablation_keep`` layers' features write (every MLP
  replaced); ``true`` / ``zero``: only those layers' MLPs are replaced, the others keep their real output / 0.

Δ accuracy (pp) is reported against the unmodified model's closed-loop baseline (and against ``full``).
"""

from __future__ import annotations

import numpy as np

from clt_pipe.analyze.substitution import Plan
from clt_pipe.config import ABLATION_MODES
from clt_pipe.errors import CltPipeError
from clt_pipe.tokens import TokenType

ABLATION_TOKENS: tuple[TokenType, ...] = ("cls", "all")
RANK_DESCRIPTIONS = {
    "attribution": "share of the total MLP write into the final residual (Σ_j ŷ_j), per source layer",
    "final_layer": "C_proj[i→L−1]: share of the last layer's reconstruction, per source layer",
    "fvu": "fraction of variance unexplained (worst reconstructed first)",
}
MODE_DESCRIPTIONS = {
    "features": "drop layer i = its CLT features write into no target; every MLP is the CLT reconstruction",
    "true": "drop layer i = its MLP keeps its real output; others are the CLT reconstruction from all sources",
    "zero": "drop layer i = its MLP outputs 0; others are the CLT reconstruction from all sources",
}


def rank_layers(rule: str, tokens: TokenType, attribution: dict | None, fidelity_rows: list[dict] | None,
                n_layers: int) -> tuple[list[int], list[float]]:
    """Layers ordered most important first, and their scores (by layer index)."""
    if rule in ("attribution", "final_layer"):
        if not attribution or tokens not in attribution:
            raise CltPipeError(f"ablation: ranking by {rule} needs the {tokens} attribution matrix")
        a = attribution[tokens]
        scores = np.asarray(a["residual_share"] if rule == "attribution" else np.asarray(a["matrix"])[:, -1],
                            float)
    elif rule == "fvu":
        rows = [r for r in (fidelity_rows or []) if r["tokens"] == tokens]
        if len(rows) != n_layers:
            raise CltPipeError(f"ablation: ranking by fvu needs the {tokens} fidelity rows")
        scores = np.array([r["fvu"] for r in sorted(rows, key=lambda r: r["layer"])])
    else:
        raise CltPipeError(f"ablation_rank: unknown rule {rule!r}")
    order = sorted(range(n_layers), key=lambda i: (-scores[i], i))
    return order, [float(s) for s in scores]


def drop_plan(name: str, tokens: TokenType, n_layers: int, dropped: list[int], mode: str,
              meta: dict | None = None) -> Plan:
    """The replacement model with the layers in ``dropped`` ablated as ``mode`` says (module docstring)."""
    if mode not in ABLATION_MODES:
        raise CltPipeError(f"ablation_mode: {mode!r} is not one of {', '.join(ABLATION_MODES)}")
    replace = {j: "clt" for j in range(n_layers)}
    gone = frozenset(dropped)
    if mode == "features":
        return Plan(name, tokens, replace, 0, meta=dict(meta or {}), dropped_sources=gone)
    for j in gone:
        if mode == "zero":
            replace[j] = "zero"
        else:
            del replace[j]
    return Plan(name, tokens, replace, 0, meta=dict(meta or {}))


def ablation_plans(tokens: TokenType, order: list[int], n_layers: int, keep: int, mode: str) -> list[Plan]:
    def plan(variant: str, dropped: list[int]) -> Plan:
        kept = [j for j in range(n_layers) if j not in dropped]
        return drop_plan(f"ablation:{tokens}:{variant}", tokens, n_layers, dropped, mode,
                         meta={"variant": variant, "clt_layers": ",".join(map(str, kept)),
                               "dropped": ",".join(map(str, sorted(dropped)))})

    k = max(0, min(keep, n_layers))
    return [plan("full", []),
            plan("drop_top1", [order[0]]),
            plan(f"keep_top{k}", sorted(order[k:]))]


def ablation_rows(result: dict, plans: list[Plan], ranking: dict) -> list[dict]:
    rows = []
    full = {}
    for p in plans:
        if p.meta["variant"] == "full":
            full[p.tokens] = result["plans"][p.name]["top1"]
    for p in plans:
        r = result["plans"][p.name]
        rows.append({"tokens": p.tokens, "variant": p.meta["variant"], "clt_layers": p.meta["clt_layers"],
                     "dropped": p.meta["dropped"], "ranking": ",".join(map(str, ranking[p.tokens]["order"])),
                     "top1": r["top1"], "top5": r["top5"], "n": r["n"], "cross_entropy": r["cross_entropy"],
                     "delta_top1_pp": r["delta_top1_pp"], "delta_top5_pp": r["delta_top5_pp"],
                     "delta_top1_vs_full_pp": r["top1"] - full.get(p.tokens, float("nan"))})
    return rows
