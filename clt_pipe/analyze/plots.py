"""The report's result plots, each number beside its baseline and its paired interval.

* ``cascade.png``: zero-shot accuracy vs window start, one panel per loop × token type; the CLT's substitution
  beside mean- and zero-ablation of the same layers, each point with its paired bootstrap interval against the
  baseline (drawn as a line, not a band: the comparison is paired). Windows that cannot reach the readout are
  not drawn (the panel says so). A top-5 row only when top-5 can move (more than 5 classes).
* ``fidelity.png``: R² and cosine of the CLT per layer beside the per-position train-mean predictor (and the
  CLT's centred cosine), and the FVU of each token type against its own variance.
* ``ablation.png``: Δ top-1 of the CLT variants beside the same layers mean-ablated / zeroed in the real model,
  with paired intervals.

Matplotlib's object API only (``Figure``): no backend is selected and pyplot state is left alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

TOKEN_COLOURS = {"cls": "tab:red", "patches": "tab:blue", "all": "tab:green"}
REPLACEMENT_STYLE = {"CLT": ("-", "o", 1.0), "train mean (mean-ablation)": ("--", "^", 0.7),
                     "zero (zero-ablation)": (":", "x", 0.6)}


def save(fig, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def _panels(results: dict) -> list[tuple[str, dict, list[dict]]]:
    """(title, baseline, rows) per loop × token type."""
    out = []
    if "closedloop" in results:
        rows = results["closedloop"]["rows"]
        for t in dict.fromkeys(r["tokens"] for r in rows):
            out.append((f"closed loop, {t} tokens", results["closedloop"]["baseline"],
                        [r for r in rows if r["tokens"] == t]))
    if "openloop" in results:
        out.append(("open loop (cache), cls tokens", results["openloop"]["baseline_resid"],
                    results["openloop"]["rows"]))
    return out


def plot_cascade(path: Path, results: dict) -> bool:
    panels = _panels(results)
    if not panels:
        return False
    keys = ["top1"] + (["top5"] if any("top5_lost" in r for _, _, rows in panels for r in rows) else [])
    fig = Figure(figsize=(4.6 * len(panels) + 0.6, 4.0 * len(keys)))
    axes = fig.subplots(len(keys), len(panels), squeeze=False)
    for ki, key in enumerate(keys):
        pre = "" if key == "top1" else "top5_"
        for pi, (title, base, rows) in enumerate(panels):
            ax = axes[ki][pi]
            ax.axhline(base[key], color="0.3", lw=1.2, label="unmodified model")
            colour = TOKEN_COLOURS.get(rows[0]["tokens"], "k") if rows else "k"
            skipped = sorted({r["window"] for r in rows if r.get("reaches_readout") is False})
            for what, (ls, marker, alpha) in REPLACEMENT_STYLE.items():
                rs = sorted((r for r in rows if r.get("replaced_by", "CLT") == what
                             and r.get("reaches_readout") is not False), key=lambda r: r["first"])
                if not rs:
                    continue
                xs = np.array([r["first"] for r in rs], float)
                ys = np.array([r[key] for r in rs], float)
                lo = np.array([base[key] + r.get(f"{pre}ci_lo_pp", np.nan) for r in rs])
                hi = np.array([base[key] + r.get(f"{pre}ci_hi_pp", np.nan) for r in rs])
                err = np.vstack([np.clip(ys - lo, 0, None), np.clip(hi - ys, 0, None)])
                ax.errorbar(xs, ys, yerr=None if np.isnan(err).all() else err, ls=ls, marker=marker,
                            color=colour, alpha=alpha, capsize=3, label=what)
            ax.set_title(f"{title} (unmodified {base[key]:.2f})", fontsize=10)
            ax.set_xlabel("window start layer (window = start … last)")
            ax.set_ylabel(f"zero-shot {'top-1' if key == 'top1' else 'top-5'} (%)")
            ax.grid(alpha=0.3)
            ax.set_xticks(sorted({r["first"] for r in rows}))
            if skipped:
                ax.text(0.02, 0.02, "not drawn, cannot reach the readout: " + ", ".join(skipped),
                        transform=ax.transAxes, fontsize=7, color="0.3")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat[1:]:  # another panel may hold a replacement the first lacks
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle("substitution vs ablation of the same windows; bars: paired 95 % bootstrap interval vs the "
                 "unmodified model", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 / len(keys), 1, 1))
    fig.savefig(path, dpi=110)
    return True


def plot_fidelity(path: Path, fidelity: dict) -> bool:
    rows = fidelity.get("per_layer") or []
    if not rows:
        return False
    has_mean = any("r2_mean_pred" in r for r in rows)
    fig = Figure(figsize=(14, 4))
    axes = fig.subplots(1, 3)
    for t in dict.fromkeys(r["tokens"] for r in rows):
        rs = sorted((r for r in rows if r["tokens"] == t), key=lambda r: r["layer"])
        xs = [r["layer"] for r in rs]
        c = TOKEN_COLOURS.get(t, "k")
        axes[0].plot(xs, [r["r2"] for r in rs], marker="o", color=c, label=f"{t}: CLT")
        axes[1].plot(xs, [r["cosine"] for r in rs], marker="o", color=c, label=f"{t}: CLT")
        axes[2].plot(xs, [r["fvu"] for r in rs], marker="o", color=c, label=t)
        if has_mean:
            axes[0].plot(xs, [r["r2_mean_pred"] for r in rs], ls="--", marker="^", color=c, alpha=0.6,
                         label=f"{t}: train mean")
            axes[1].plot(xs, [r["cosine_mean_pred"] for r in rs], ls="--", marker="^", color=c, alpha=0.6,
                         label=f"{t}: train mean")
            axes[1].plot(xs, [r["cosine_centred"] for r in rs], ls=":", marker="s", color=c, alpha=0.8,
                         label=f"{t}: CLT, centred")
    titles = ("R² = 1 − SSE/SST (dashed: per-position train mean)",
              "mean cosine(ŷ, y) (dashed: train mean; dotted: CLT centred on it)",
              "FVU = SSE/SST of each token type")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.set_xticks(sorted({r["layer"] for r in rows}))
    if all(r["fvu"] > 0 for r in rows):
        axes[2].set_yscale("log")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=6)
    return save(fig, path)


def plot_ablation(path: Path, ablation: dict) -> bool:
    rows = ablation.get("rows") or []
    if not rows:
        return False
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    groups = list(dict.fromkeys((r["tokens"], r.get("model", "CLT")) for r in rows))
    fig = Figure(figsize=(max(7.0, 1.2 * len(variants) * len(groups) / 2), 4.4))
    ax = fig.subplots()
    w = 0.8 / len(groups)
    hatches = {"CLT": "", "real, mean-ablated": "//", "real, zero-ablated": ".."}
    for k, (t, model) in enumerate(groups):
        sel = [next((r for r in rows if r["tokens"] == t and r.get("model", "CLT") == model
                     and r["variant"] == v), None) for v in variants]
        vals = np.array([r["delta_top1_pp"] if r else np.nan for r in sel], float)
        lo = np.array([r.get("ci_lo_pp", np.nan) if r else np.nan for r in sel], float)
        hi = np.array([r.get("ci_hi_pp", np.nan) if r else np.nan for r in sel], float)
        err = np.vstack([np.clip(vals - lo, 0, None), np.clip(hi - vals, 0, None)])
        xs = np.arange(len(variants)) + (k - (len(groups) - 1) / 2) * w
        bars = ax.bar(xs, vals, w, color=TOKEN_COLOURS.get(t, "k"), alpha=1.0 if model == "CLT" else 0.45,
                      hatch=hatches.get(model, ""), edgecolor="k", lw=0.4, label=f"{t}, {model}",
                      yerr=None if np.isnan(err).all() else err, capsize=2)
        ax.bar_label(bars, fmt="%+.1f", fontsize=6)
    ax.axhline(0, color="k", lw=0.8)
    lo, hi = ax.get_ylim()
    span = max(hi - lo, 1e-6)
    ax.set_ylim(lo - 0.08 * span, hi + 0.12 * span)
    ax.set_xticks(range(len(variants)))
    ax.set_xticklabels(variants)
    ax.set_ylabel("Δ top-1 vs unmodified model (pp)")
    ax.set_title(f"ablations (protocol={ablation.get('protocol', 'replacement')}, rank={ablation['rank']}, "
                 f"drop={ablation['mode']}); bars: paired 95 % interval", pad=12, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, axis="y")
    return save(fig, path)
