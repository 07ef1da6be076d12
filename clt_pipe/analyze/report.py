"""The analysis report in ``--out``: report.json, Parquet tables, PNG plots, report.html.

Plots use matplotlib's object API (``matplotlib.figure.Figure``), so importing this module selects no backend
and leaves the caller's pyplot state alone.

* ``report.json`` — every number, the exact settings, and the store / CLT identity.
* ``fidelity.parquet`` (per layer × token type), ``fidelity_aggregate.parquet`` (paper form: averages over
  layers), ``attribution.parquet`` (source, target, c_proj per token type), ``substitution.parquet`` (baselines,
  open-loop and closed-loop windows), ``ablation.parquet``, ``retrieval.parquet`` (+ ``retrieval_layers``).
* PNGs: ``attribution.png`` (C_proj heatmaps, CLS vs patches), ``cascade.png``, ``fidelity.png`` and
  ``ablation.png`` (``clt_pipe.analyze.plots``: each beside its baseline, with paired intervals),
  ``retrieval_q<image>.png`` (rows = layers, columns = query + neighbours).
* ``graphs/image-<i>/`` — the graphs part: each chosen image's attribution graph as ``clt-pipe graph`` writes
  it (``graph.html``, ``graph.json``, circuit-tracer's files); ``graphs.parquet`` one row per image.
* ``report.html`` — self-contained: PNGs embedded as base64, tables as HTML.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from matplotlib.figure import Figure

from clt_pipe.analyze.paired import paired_text
from clt_pipe.analyze.plots import plot_ablation, plot_cascade, plot_fidelity


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def _write_parquet(path: Path, rows: list[dict]) -> None:
    cols: dict[str, list] = {}
    for r in rows:
        for k in r:
            cols.setdefault(k, [])
    table = pa.table({k: [r.get(k) for r in rows] for k in cols}) if rows else pa.table({})
    pq.write_table(table, path)


def substitution_rows(results: dict) -> list[dict]:
    rows = []
    keys = ("top1", "top5", "n", "cross_entropy")
    if "zeroshot" in results:
        z = results["zeroshot"]
        rows.append({"mode": "baseline_store", "tokens": "", "window": "", **{k: z.get(k) for k in keys}})
    if "openloop" in results:
        b = results["openloop"]["baseline_resid"]
        rows.append({"mode": "baseline_resid", "tokens": "", "window": "", **{k: b.get(k) for k in keys}})
        rows += results["openloop"]["rows"]
    if "closedloop_baseline" in results:
        b = results["closedloop_baseline"]
        rows.append({"mode": "baseline_closedloop", "tokens": "", "window": "", **{k: b.get(k) for k in keys}})
    if "closedloop" in results:
        rows += results["closedloop"]["rows"]
    return rows


# ------------------------------------------------------------------------------------------------ plots

def plot_attribution(path: Path, attribution: dict) -> bool:
    kinds = [t for t in ("cls", "patches") if t in attribution] or list(attribution)
    if not kinds:
        return False
    L = attribution[kinds[0]]["matrix"].shape[0]
    vmax = max(float(np.abs(attribution[t]["matrix"]).max()) for t in kinds) or 1.0
    fig = Figure(figsize=(5.2 * len(kinds) + 1, 4.8))
    axes = fig.subplots(1, len(kinds), squeeze=False)
    im = None
    for ax, t in zip(axes[0], kinds):
        mat = np.array(attribution[t]["matrix"], float)
        shown = np.where(np.triu(np.ones((L, L), bool)), mat, np.nan)
        im = ax.imshow(shown, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_title(f"C_proj, {t} tokens (n={attribution[t]['n_tokens']:,})")
        ax.set_xlabel("target layer j")
        ax.set_ylabel("source layer i")
        ticks = range(L) if L <= 16 else range(0, L, max(1, L // 12))
        ax.set_xticks(list(ticks))
        ax.set_yticks(list(ticks))
        if L <= 12:
            for i in range(L):
                for j in range(i, L):
                    v = mat[i, j]
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7 if L > 8 else 8,
                            color="white" if abs(v) > 0.6 * vmax else "black")
    fig.colorbar(im, ax=list(axes[0]), shrink=0.85, label="share of ŷ_j (columns sum to 1)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return True


def plot_retrieval(out: Path, retrieval: dict, class_names: list[str], dataset=None) -> list[Path]:
    paths = []
    rows = retrieval.get("rows") or []
    k = retrieval.get("k", 0)
    layers = sorted({r["layer"] for r in rows})
    if not layers:
        return paths

    def name(label: int) -> str:
        return class_names[label] if 0 <= label < len(class_names) else str(label)

    def show(ax, img_idx: int, label: int, title: str, colour: str):
        ax.set_xticks([])
        ax.set_yticks([])
        if dataset is not None:
            try:
                ax.imshow(np.asarray(dataset.load_image(img_idx).convert("RGB")))
            except Exception:  # noqa: BLE001 - a grid with a missing picture is still useful
                ax.text(0.5, 0.5, "?", ha="center", va="center")
        else:
            ax.text(0.5, 0.5, f"#{img_idx}\n{name(label)}", ha="center", va="center", fontsize=8,
                    transform=ax.transAxes)
        ax.set_title(title, fontsize=7, color=colour)
        for s in ax.spines.values():
            s.set_edgecolor(colour)
            s.set_linewidth(2 if colour != "black" else 0.5)

    for q in retrieval["queries"]:
        qrows = [r for r in rows if r["query"] == q]
        if not qrows:
            continue
        qlabel = qrows[0]["query_label"]
        fig = Figure(figsize=(1.25 * (k + 1) + 0.6, 1.25 * len(layers) + 0.6))
        axes = fig.subplots(len(layers), k + 1, squeeze=False)
        for li, layer in enumerate(layers):
            show(axes[li][0], q, qlabel, f"query #{q}\n{name(qlabel)}" if li == 0 else "query", "black")
            axes[li][0].set_ylabel(f"layer {layer}", fontsize=8)
            lr = sorted((r for r in qrows if r["layer"] == layer), key=lambda r: r["rank"])
            for c in range(k):
                ax = axes[li][c + 1]
                if c < len(lr):
                    r = lr[c]
                    show(ax, r["neighbour"], r["neighbour_label"], f"{name(r['neighbour_label'])} {r['cosine']:.2f}",
                         "tab:green" if r["same_label"] else "tab:red")
                else:
                    ax.axis("off")
        fig.suptitle("nearest images by each layer's CLS code (green = same label as the query)", fontsize=9)
        fig.tight_layout()
        p = out / f"retrieval_q{q}.png"
        fig.savefig(p, dpi=100)
        paths.append(p)
    return paths


# ------------------------------------------------------------------------------------------------ HTML

def _html_table(rows: list[dict], max_rows: int = 400) -> str:
    if not rows:
        return "<p><em>(empty)</em></p>"
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v):
        if isinstance(v, float):
            return "" if not math.isfinite(v) else f"{v:.4g}"
        return html.escape(str(v)) if v is not None else ""

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows[:max_rows])
    more = f"<p><em>{len(rows) - max_rows} more rows in the Parquet file</em></p>" if len(rows) > max_rows else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"


def _img(path: Path, width: int | None = None) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    size = f' width="{width}"' if width else ""
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}"{size}>'


def graphs_html(graphs: dict, out: Path) -> str:
    """The graphs part: one row per image, its total-influence heatmap linked to its graph page."""
    rows = []
    for r in graphs["rows"]:
        heat = out / r["heatmap"]
        img = (f"<a href='{html.escape(r['page'])}'>{_img(heat, 128)}</a>" if heat.is_file() else "")
        rows.append(
            f"<tr><td>{img}</td><td><a href='{html.escape(r['page'])}'>image {r['image']}</a></td>"
            f"<td>{html.escape(str(r['label']))}</td><td>{html.escape(str(r['predicted']))}</td>"
            f"<td>{html.escape(str(r['target']))}</td><td>{r['replacement_score']:.3f}</td>"
            f"<td>{r['completeness_score']:.3f}</td><td>{r['completeness_error']:.2g}</td>"
            f"<td>{r['kept_feature_nodes']} of {r['feature_nodes']}</td>"
            f"<td style='text-align:left'>{html.escape('; '.join(r['top_features']))}</td></tr>")
    positions = sorted({r.get("feature_positions", "") for r in graphs["rows"]} - {"", "every position"})
    head = "".join(f"<th>{c}</th>" for c in (
        "total influence per patch", "graph", "label", "predicted", "target", "replacement score",
        "completeness score", "completeness error", "kept feature nodes", "most influential kept features"))
    return ("<h2>Attribution graphs</h2><p>circuit-tracer's method on single images: "
            f"{html.escape(graphs['chosen'])}. Replacement score: the share of the target's influence reaching "
            "the graph's sources that ends at the image's embeddings rather than at error nodes (0: everything "
            "through the CLT's errors, 1: through features alone); completeness score: circuit-tracer's partial "
            "credit of the same; completeness error: how far edges and constants miss each node's input (≤ 1e-4 "
            "is exact in float32)." + ("" if graphs.get("atlas_linked") else
                                       " Feature nodes are not linked: the atlas part did not run.")
            + "".join(f" Feature nodes at {html.escape(t)}." for t in positions)
            + f"</p><table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def write_html(path: Path, results: dict, settings: dict, identity: dict, tables: dict, pngs: dict) -> None:
    css = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;font-size:12px;"
           "margin-bottom:1em}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#eee}"
           "img{max-width:100%;border:1px solid #ddd;margin:4px 0}pre{background:#f6f6f6;padding:8px;"
           "font-size:11px;overflow:auto}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>CLT analysis</title><style>{css}</style>"
             "</head><body><h1>Cross-layer transcoder analysis</h1>"]
    st = identity["store"]
    parts.append(f"<p>Store <code>{html.escape(str(st['url']))}</code> — model "
                 f"{html.escape(str(st['model'].get('name')))} ({st['model'].get('n_layers')} layers × "
                 f"{st['model'].get('d_model')}), dataset {html.escape(str(st['dataset'].get('name')))}/"
                 f"{html.escape(str(st['dataset'].get('split')))}; "
                 f"CLT <code>{html.escape(str(identity['clt']['path']))}"
                 f"</code> ({html.escape(json.dumps(identity['clt']['spec']))})</p>")
    for n in results.get("notes", []):
        parts.append(f"<p><strong>Note:</strong> {html.escape(n)}</p>")
    for label, text in rules(results):
        parts.append(f"<p><strong>{html.escape(label)}:</strong> {html.escape(text)}</p>")
    if "atlas" in results:
        a = results["atlas"]
        parts.append(f"<h2>Feature atlas</h2><p><a href='atlas/index.html'>Open the feature atlas</a> — "
                     f"{a['n_features']} features with their top images, patch heatmaps, decoder footprints and "
                     f"logit effects" + (f" (no thumbnails: {html.escape(a['images_note'])})"
                                         if a.get("images_note") else "") + ".</p>")
    if "graphs" in results:
        parts.append(graphs_html(results["graphs"], path.parent))
    sections = [
        ("Fidelity", ["fidelity_aggregate", "fidelity"], ["fidelity"]),
        ("Attribution C_proj", ["attribution_columns"], ["attribution"]),
        ("Zero-shot substitution", ["substitution"], ["cascade"]),
        ("Ablations", ["ablation_ranking", "ablation"], ["ablation"]),
        ("Retrieval", ["retrieval_layers", "retrieval"], ["retrieval"]),
    ]
    for title, tnames, pnames in sections:
        if not any(t in tables for t in tnames) and not any(p in pngs for p in pnames):
            continue
        parts.append(f"<h2>{title}</h2>")
        for p in pnames:
            for f in pngs.get(p, []):
                parts.append(_img(f))
        for t in tnames:
            if t in tables:
                parts.append(f"<h3>{t}</h3>" + _html_table(tables[t]))
    parts.append("<h2>Settings</h2><pre>" + html.escape(json.dumps(_jsonable(settings), indent=1)) + "</pre>")
    parts.append("<h2>Timings (s)</h2><pre>" + html.escape(json.dumps(_jsonable(results.get("timings_s", {})),
                                                                          indent=1)) + "</pre>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")


# ------------------------------------------------------------------------------------------------ entry

def write_report(out: str | Path, results: dict, settings: dict, identity: dict, class_names: list[str],
                 labels=None, dataset=None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tables: dict[str, list[dict]] = {}
    if "fidelity" in results:
        tables["fidelity"] = results["fidelity"]["per_layer"]
        tables["fidelity_aggregate"] = results["fidelity"]["aggregate"]
    if "attribution" in results:
        from clt_pipe.analyze.attribution import to_rows

        tables["attribution"] = to_rows(results["attribution"])
        tables["attribution_columns"] = [
            {"tokens": t, "target": j, "column_sum": float(r["column_sums"][j])}
            for t, r in results["attribution"].items() for j in range(len(r["column_sums"]))]
    subs = substitution_rows(results)
    if subs:
        tables["substitution"] = subs
    if "ablation" in results:
        tables["ablation"] = results["ablation"]["rows"]
        tables["ablation_ranking"] = [  # HTML only: the scores behind the order (also in report.json)
            {"tokens": t, "rank": pos, "layer": layer, "score": r["scores"][layer]}
            for t, r in results["ablation"]["ranking"].items() for pos, layer in enumerate(r["order"])]
    if "retrieval" in results:
        tables["retrieval"] = results["retrieval"]["rows"]
        tables["retrieval_layers"] = results["retrieval"]["per_layer"]
    if "graphs" in results:
        tables["graphs"] = results["graphs"]["rows"]
    files: dict[str, list[str]] = {"parquet": [], "png": []}
    for name in ("fidelity", "fidelity_aggregate", "attribution", "substitution", "ablation", "retrieval",
                 "retrieval_layers", "graphs"):
        if name in tables:
            p = out / f"{name}.parquet"
            _write_parquet(p, tables[name])
            files["parquet"].append(str(p))
    pngs: dict[str, list[Path]] = {}
    if "attribution" in results and plot_attribution(out / "attribution.png", results["attribution"]):
        pngs["attribution"] = [out / "attribution.png"]
    if plot_cascade(out / "cascade.png", results):
        pngs["cascade"] = [out / "cascade.png"]
    if "fidelity" in results and plot_fidelity(out / "fidelity.png", results["fidelity"]):
        pngs["fidelity"] = [out / "fidelity.png"]
    if "ablation" in results and plot_ablation(out / "ablation.png", results["ablation"]):
        pngs["ablation"] = [out / "ablation.png"]
    if "retrieval" in results:
        pngs["retrieval"] = plot_retrieval(out, results["retrieval"], class_names, dataset)
    files["png"] = [str(p) for ps in pngs.values() for p in ps]
    files["json"] = [str(out / "report.json")]
    files["html"] = [str(out / "report.html")]
    report = {"settings": settings, "identity": identity, "headline": summary(results, files), "results": results,
              "files": files}
    write_html(out / "report.html", results, settings, identity, tables, pngs)
    # Last: `clt-pipe run` treats a report.json with matching settings as a finished analysis.
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(_jsonable(report), indent=1))
    tmp.replace(out / "report.json")
    return files


def rules(results: dict) -> list[tuple[str, str]]:
    """The definitions this run used that change its numbers (also shown at the top of report.html)."""
    out = []
    if ("openloop" in results or "closedloop" in results) and results.get("substitution_rule"):
        r = results["substitution_rule"]
        out.append(("Substitution rule", f"{r['name']} — {r['text']}"))
    if results.get("mean_baseline"):
        out.append(("Mean baseline", results["mean_baseline"]["text"] + " (mean-ablation rows, the mean predictor)"))
    if "ablation" in results:
        a = results["ablation"]
        out.append(("Ablation protocol", f"{a.get('protocol', 'replacement')} — {a.get('protocol_rule', '')}"))
        out.append(("Ablation ranking", f"{a['rank']} — {a.get('rank_rule', '')}"))
        out.append(("Ablation drop", f"{a['mode']} — {a.get('mode_rule', '')}"))
    if any(k in results for k in ("openloop", "closedloop", "ablation")):
        out.append(("Paired comparison", "every accuracy Δ is against the unmodified model on the same images: "
                                         "lost / gained = images it got right / wrong that the variant does not, "
                                         "mcnemar_p = exact McNemar test, ci_lo_pp … ci_hi_pp = 95 % paired "
                                         "bootstrap interval of Δtop-1"))
    return out


def summary(results: dict, files: dict) -> dict:
    """The short dict the CLI prints."""
    s: dict = {"parts": ",".join(results.get("computed", []))}
    if ("openloop" in results or "closedloop" in results) and results.get("substitution_rule"):
        s["substitution_rule"] = results["substitution_rule"]["name"]
    if "ablation" in results:
        s["ablation_rank"] = results["ablation"]["rank"]
        s["ablation_mode"] = results["ablation"]["mode"]
    if "zeroshot" in results:
        s["baseline_top1"] = round(results["zeroshot"]["top1"], 2)
    for agg in (results.get("fidelity") or {}).get("aggregate", []):
        s[f"r2_{agg['tokens']}"] = round(agg["r2"], 4)
        s[f"cosine_{agg['tokens']}"] = round(agg["cosine"], 4)
        for key in ("r2_mean_pred", "skill_vs_mean", "cosine_mean_pred", "cosine_centred"):
            if key in agg:
                s[f"{key}_{agg['tokens']}"] = round(agg[key], 4)
    for r in (results.get("openloop") or {}).get("rows", []):
        if r.get("replaced_by", "CLT") == "CLT":
            s[f"openloop_cls_{r['window']}_top1"] = round(r["top1"], 2)
    for r in (results.get("closedloop") or {}).get("rows", []):
        if r.get("reaches_readout") is False:
            continue
        what = {"CLT": "", "train mean (mean-ablation)": "_mean_ablated", "zero (zero-ablation)": "_zeroed"}
        key = f"closedloop_{r['tokens']}_{r['window']}{what.get(r.get('replaced_by', 'CLT'), '_other')}"
        s[f"{key}_top1"] = round(r["top1"], 2)
        if "lost" in r and r.get("replaced_by", "CLT") == "CLT":
            s[f"{key}_vs_baseline"] = paired_text(r)
    for r in (results.get("ablation") or {}).get("rows", []):
        if r.get("model", "CLT") == "CLT":
            s[f"ablation_{r['tokens']}_{r['variant']}_dtop1_pp"] = round(r["delta_top1_pp"], 2)
    if "ablation" in results:
        s["ablation_protocol"] = results["ablation"].get("protocol", "replacement")
    if "atlas" in results:
        s["atlas"] = results["atlas"]["index"]
    if results.get("graphs", {}).get("rows"):
        g = results["graphs"]["rows"]
        s["graphs"] = len(g)
        s["graphs_completeness_error_max"] = max(r["completeness_error"] for r in g)
        s["graphs_replacement_score"] = ", ".join(f"{r['replacement_score']:.3f}" for r in g)
    s["report"] = (files.get("html") or [""])[0]
    s["seconds"] = round(results.get("timings_s", {}).get("total", 0.0), 1)
    return s
