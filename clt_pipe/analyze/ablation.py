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

Protocols (``ablation_protocol``): what the variants start from.

* ``replacement`` (default) — the replacement model: every variant replaces the MLP at every layer for tokens T
  with the CLT, and ``full`` (no layer dropped) is its reference. "Drop layer i" is the same operation for every
  i; every CLT-replaced target decodes from all sources 0..j (whatever ``sources_before_window`` says).
  ``drop_top1`` — necessity, per ``ablation_mode``: ``features`` (default): the top layer's *features* write
  into no target (every MLP is still the CLT's); ``zero``: the top layer's MLP outputs 0, every other layer
  keeps the CLT reconstruction from all sources. ``true`` puts the *real* MLP output at the top layer, so the
  variant is named ``real_top1`` (it restores, not drops). ``keep_topk`` — sufficiency: ``features``: only the
  top-``ablation_keep`` layers' features write (every MLP replaced); ``true`` / ``zero``: only those layers'
  MLPs are replaced, the others keep their real output / 0.
* ``real`` — the unmodified model, the protocol the paper's table needs: its keep-top-4 "all" accuracy on
  CIFAR-100 (61.65 − 1.69 = 59.96) lies far above its full all-token cascade (≈ 51.1), so its ablations cannot
  sit on a full replacement. ``keep_topk``: only the top-k layers' MLPs are the CLT's (full reconstruction),
  every other MLP real. ``drop_top1``: the real model without the top layer's CLT features — every MLP output
  they reach (j ≥ i) loses their live write z_i W_dec^{i→j} (``features``), or the top layer's MLP outputs 0
  (``zero``); ``true`` has nothing to drop there and is refused.

Beside the CLT variants, the same layers are ablated in the real model (``model`` = "real"): ``drop_top1``
mean-ablates / zeroes the top layer's MLP, ``keep_topk`` every MLP outside the top k; mean = the per-position
train mean (``clt_pipe.analyze.means``). Columns name what each MLP outputs (``mlp_clt``, ``mlp_real``,
``mlp_mean``, ``mlp_zero``, ``mlp_minus_features``) and which CLT source layers write (``clt_sources``).

Δ accuracy (pp) is reported against the unmodified model's closed-loop baseline, with its paired statistics
(``clt_pipe.analyze.paired``), and against ``full``.
"""

from __future__ import annotations

import numpy as np

from clt_pipe.analyze.paired import PAIRED_KEYS
from clt_pipe.analyze.substitution import Plan
from clt_pipe.config import ABLATION_MODES, ABLATION_PROTOCOLS
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
REAL_MODE_DESCRIPTIONS = {
    "features": "drop layer i = the real model without layer i's CLT features (their live writes subtracted from "
                "every MLP output they reach)",
    "zero": "drop layer i = the real model with layer i's MLP output 0",
}
PROTOCOL_DESCRIPTIONS = {
    "replacement": "variants start from the replacement model (the CLT at every MLP for the token type); "
                   "'full' is its reference",
    "real": "variants start from the unmodified model (the paper's table: its keep-top-4 lies above its full "
            "cascade): keep_topk replaces only the top-k layers' MLPs with the CLT",
}


def mode_description(protocol: str, mode: str) -> str:
    return (REAL_MODE_DESCRIPTIONS if protocol == "real" else MODE_DESCRIPTIONS)[mode]


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
              meta: dict | None = None, protocol: str = "replacement") -> Plan:
    """The ``protocol``'s model with the layers in ``dropped`` ablated as ``mode`` says (module docstring)."""
    if mode not in ABLATION_MODES:
        raise CltPipeError(f"ablation_mode: {mode!r} is not one of {', '.join(ABLATION_MODES)}")
    if protocol not in ABLATION_PROTOCOLS:
        raise CltPipeError(f"ablation_protocol: {protocol!r} is not one of {', '.join(ABLATION_PROTOCOLS)}")
    gone = frozenset(dropped)
    meta = dict(meta or {})
    if protocol == "real":
        if mode == "true":
            raise CltPipeError("ablation_mode true with ablation_protocol real: the real MLP is already there, "
                               "there is nothing to drop (use features or zero)")
        if mode == "zero":
            return Plan(name, tokens, {j: "zero" for j in gone}, 0, meta=meta)
        first = min(gone, default=n_layers)
        return Plan(name, tokens, {j: "minus" for j in range(first, n_layers)}, 0, meta=meta, dropped_sources=gone)
    replace = {j: "clt" for j in range(n_layers)}
    if mode == "features":
        return Plan(name, tokens, replace, 0, meta=meta, dropped_sources=gone)
    for j in gone:
        if mode == "zero":
            replace[j] = "zero"
        else:
            del replace[j]
    return Plan(name, tokens, replace, 0, meta=meta)


def keep_plan(name: str, tokens: TokenType, n_layers: int, kept: list[int], mode: str, meta: dict,
              protocol: str) -> Plan:
    """Sufficiency: only the ``kept`` layers' features / MLPs are the CLT's (module docstring)."""
    if protocol == "real":
        return Plan(name, tokens, {j: "clt" for j in kept}, 0, meta=meta)
    return drop_plan(name, tokens, n_layers, [j for j in range(n_layers) if j not in kept], mode, meta, protocol)


def real_model_plans(tokens: TokenType, variant: str, ablated: list[int]) -> list[Plan]:
    """The real model with the ``ablated`` layers' MLPs mean-ablated / zeroed: the CLT variant's counterpart."""
    return [Plan(f"ablation:{tokens}:{variant}:real-{m}", tokens, {j: m for j in ablated}, 0,
                 meta={"variant": variant, "model": f"real, {m}-ablated", "dropped": ",".join(map(str, ablated))})
            for m in ("mean", "zero")]


def ablation_plans(tokens: TokenType, order: list[int], n_layers: int, keep: int, mode: str,
                   protocol: str = "replacement") -> list[Plan]:
    k = max(0, min(keep, n_layers))
    top, rest = [order[0]], sorted(order[k:])
    drop_name = "real_top1" if mode == "true" and protocol == "replacement" else "drop_top1"
    keep_name = f"keep_top{k}"

    def meta(variant: str, dropped: list[int]) -> dict:
        return {"variant": variant, "model": "CLT", "dropped": ",".join(map(str, sorted(dropped)))}

    plans = [drop_plan(f"ablation:{tokens}:full", tokens, n_layers, [], "features", meta("full", []))]
    plans.append(drop_plan(f"ablation:{tokens}:{drop_name}", tokens, n_layers, top, mode, meta(drop_name, top),
                           protocol))
    plans.append(keep_plan(f"ablation:{tokens}:{keep_name}", tokens, n_layers, sorted(order[:k]), mode,
                           meta(keep_name, rest), protocol))
    plans += real_model_plans(tokens, drop_name, top)
    if rest:
        plans += real_model_plans(tokens, keep_name, rest)
    return plans


def ablation_rows(result: dict, plans: list[Plan], ranking: dict, n_layers: int) -> list[dict]:
    rows = []
    full = {}
    for p in plans:
        if p.meta["variant"] == "full":
            full[p.tokens] = result["plans"][p.name]["top1"]
    for p in plans:
        r = result["plans"][p.name]
        rows.append({"tokens": p.tokens, "variant": p.meta["variant"], "model": p.meta["model"],
                     "dropped": p.meta["dropped"], **p.layers(n_layers),
                     "ranking": ",".join(map(str, ranking[p.tokens]["order"])),
                     "top1": r["top1"], "top5": r["top5"], "n": r["n"], "cross_entropy": r["cross_entropy"],
                     **{k: v for k, v in r.items() if k.startswith(("delta_", "top5_")) or k in PAIRED_KEYS},
                     "delta_top1_vs_full_pp": r["top1"] - full.get(p.tokens, float("nan"))})
    return rows
