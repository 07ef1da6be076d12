"""Necessity / sufficiency ablations over layers (the paper's necessity / sufficiency table).

The paper does not state its protocol; this module's definitions (closed-loop, per token type T ∈ {cls, all}):

Ranking (``ablation_rank``):
* ``attribution`` (default): score(i) = Σ_j |C_proj_T[i→j]|, the absolute row sum of layer i in the attribution
  matrix of token type T (how much layer i's features write into the reconstructions, either sign); highest
  first. Ties break toward the earlier layer.
* ``fvu``: the worst-reconstructed layers first (highest FVU of token type T from the fidelity part).

Variants (every one a closed-loop pass; the *replacement model* substitutes the CLT at every layer):
* ``full``         — CLT replaces the MLP at all layers for tokens T (reference).
* ``drop_top1``    — necessity: the replacement model *without* the top-ranked layer's CLT replacement; that
  layer instead gets ``ablation_mode``: ``true`` = its real MLP output, ``zero`` = 0. With ``zero`` this reads
  directly as "remove the top layer's contribution" (how much accuracy depends on it); with ``true`` it measures
  how much of the replacement's error that one layer causes.
* ``keep_topk``    — sufficiency: only the top-``ablation_keep`` layers are replaced by the CLT; every other
  layer gets ``ablation_mode`` (``true``: real MLP, i.e. "CLT at the k most important layers suffices";
  ``zero``: those MLPs are removed, i.e. "the k layers' CLT features alone carry the computation").

Sources: a replaced layer j decodes from the live codes of layers floor..j, floor = the first replaced layer
(0 with ``sources_before_window``) — the same rule as the substitution windows.

Δ accuracy (pp) is reported against the unmodified model's closed-loop baseline (and against ``full``).
"""

from __future__ import annotations

import numpy as np

from clt_pipe.analyze.attribution import layer_scores
from clt_pipe.analyze.substitution import Plan
from clt_pipe.errors import CltPipeError

ABLATION_TOKENS = ("cls", "all")


def rank_layers(rule: str, tokens: str, attribution: dict | None, fidelity_rows: list[dict] | None,
                n_layers: int) -> tuple[list[int], list[float]]:
    """Layers ordered most important first, and their scores (by layer index)."""
    if rule == "attribution":
        if not attribution or tokens not in attribution:
            raise CltPipeError(f"ablation: ranking by attribution needs the {tokens} attribution matrix")
        scores = layer_scores(attribution[tokens]["matrix"])
    elif rule == "fvu":
        rows = [r for r in (fidelity_rows or []) if r["tokens"] == tokens]
        if len(rows) != n_layers:
            raise CltPipeError(f"ablation: ranking by fvu needs the {tokens} fidelity rows")
        scores = np.array([r["fvu"] for r in sorted(rows, key=lambda r: r["layer"])])
    else:
        raise CltPipeError(f"ablation_rank: unknown rule {rule!r}")
    order = sorted(range(n_layers), key=lambda i: (-scores[i], i))
    return order, [float(s) for s in scores]


def ablation_plans(tokens: str, order: list[int], n_layers: int, keep: int, mode: str,
                   sources_before_window: bool) -> list[Plan]:
    other = "zero" if mode == "zero" else None

    def plan(variant: str, clt_layers: list[int]) -> Plan:
        replace = {j: "clt" for j in clt_layers}
        if other:
            replace.update({j: other for j in range(n_layers) if j not in clt_layers})
        floor = 0 if sources_before_window or not clt_layers else min(clt_layers)
        return Plan(f"ablation:{tokens}:{variant}", tokens, replace, floor,
                    meta={"variant": variant, "clt_layers": ",".join(map(str, sorted(clt_layers)))})

    top1 = order[0]
    k = max(0, min(keep, n_layers))
    return [plan("full", list(range(n_layers))),
            plan("drop_top1", [j for j in range(n_layers) if j != top1]),
            plan(f"keep_top{k}", sorted(order[:k]))]


def ablation_rows(result: dict, plans: list[Plan], ranking: dict) -> list[dict]:
    rows = []
    full = {}
    for p in plans:
        if p.meta["variant"] == "full":
            full[p.tokens] = result["plans"][p.name]["top1"]
    for p in plans:
        r = result["plans"][p.name]
        rows.append({"tokens": p.tokens, "variant": p.meta["variant"], "clt_layers": p.meta["clt_layers"],
                     "ranking": ",".join(map(str, ranking[p.tokens]["order"])),
                     "top1": r["top1"], "top5": r["top5"], "n": r["n"], "cross_entropy": r["cross_entropy"],
                     "delta_top1_pp": r["delta_top1_pp"], "delta_top5_pp": r["delta_top5_pp"],
                     "delta_top1_vs_full_pp": r["top1"] - full.get(p.tokens, float("nan"))})
    return rows
