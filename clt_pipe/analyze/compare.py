"""The paper's comparison as output: one table and plot across fitted CLTs (the members of a fit sweep, or any
analyzed runs), from their analyze reports.

``clt-pipe analyze --clt SWEEP_ROOT --out OUT`` analyzes every finished member into ``OUT/<member>/`` (the
single-run report, unchanged) and then writes the comparison into ``OUT``; ``clt-pipe compare REPORT... --out
OUT`` writes it from reports already made. The comparison:

* ``compare_fidelity.parquet`` — per member × token type: MSE, standardised MSE, R², cosine, FVU, L0 and dead
  fraction (the report's layer averages), with the member's sparsifier, k and width;
* ``compare_substitution.parquet`` — per member × substitution row (mode, tokens, window): top-1/top-5 with their
  binomial standard error, the baseline of that row's mode and the difference to it;
* ``compare.png`` — L0 against FVU per member and token type, R² and cosine per member, and closed-loop top-1
  per window against the baseline ± 1 s.e.;
* ``report.html`` (self-contained, linking each member's own report) and ``compare.json`` (every number, the
  settings; `clt-pipe run` takes matching settings as a finished analysis).
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path

from matplotlib.figure import Figure

from clt_pipe.analyze import report as R
from clt_pipe.analyze.plots import save
from clt_pipe.errors import CltPipeError

COMPARE_FILE = "compare.json"
FIDELITY_KEYS = ("mse", "mse_std", "r2", "cosine", "fvu", "l0", "dead_frac")
BASELINE_OF = {"openloop": "baseline_resid", "closedloop": "baseline_closedloop"}
MARKERS = {"cls": "o", "patches": "s", "all": "^"}


# ---- collecting --------------------------------------------------------------------------------------------
def _binomial_se(pct: float | None, n: int | None) -> float | None:
    if pct is None or not n:
        return None
    p = pct / 100
    return 100 * math.sqrt(max(p * (1 - p), 0.0) / n)


def fidelity_rows(name: str, report: dict) -> list[dict]:
    spec = report["identity"]["clt"]["spec"]
    rows = []
    for agg in (report["results"].get("fidelity") or {}).get("aggregate", []):
        rows.append({"member": name, "sparsifier": spec.get("sparsifier"), "k": spec.get("k"),
                     "n_features": spec.get("n_features"), "tokens": agg["tokens"], "n_tokens": agg["n_tokens"],
                     **{k: agg.get(k) for k in FIDELITY_KEYS}})
    return rows


def substitution_rows(name: str, report: dict) -> list[dict]:
    """The member's substitution rows, each beside the baseline of its mode (the number that makes it readable)."""
    rows = R.substitution_rows(report["results"])
    baselines = {r["mode"]: r for r in rows if r["mode"].startswith("baseline")}
    out = []
    for r in rows:
        if r["mode"].startswith("baseline"):
            continue
        base = baselines.get(BASELINE_OF.get(r["mode"], ""), {})
        top1, b1 = r.get("top1"), base.get("top1")
        out.append({"member": name, "mode": r["mode"], "tokens": r.get("tokens", ""), "window": r.get("window", ""),
                    "first": r.get("first"), "n": r.get("n"), "top1": top1, "top1_se": _binomial_se(top1, r.get("n")),
                    "top5": r.get("top5"), "baseline_top1": b1, "baseline_top1_se": _binomial_se(b1, base.get("n")),
                    "delta_top1_pp": None if top1 is None or b1 is None else top1 - b1,
                    # paired over the same images, where the report has it (issue 20's analysis/paired.py)
                    **{k: r.get(k) for k in ("ci_lo_pp", "ci_hi_pp", "mcnemar_p") if k in r}})
    return out


def load_report(report_dir: str | Path) -> dict:
    path = Path(report_dir) / "report.json"
    if not path.is_file():
        raise CltPipeError(f"{report_dir}: no report.json; run `clt-pipe analyze` into it first")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CltPipeError(f"{path}: unreadable ({e})") from None


def expand_reports(paths: list[str]) -> list[tuple[str, Path]]:
    """(name, report dir) per argument: an analyze report, or a comparison folder (its members)."""
    out: list[tuple[str, Path]] = []
    for p in map(Path, paths):
        if (p / COMPARE_FILE).is_file() and not (p / "report.json").is_file():
            rec = json.loads((p / COMPARE_FILE).read_text())
            out += [(m["name"], p / m["report"]) for m in rec["members"] if m.get("report")]
        else:
            out.append((p.name, p))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):  # two runs called "report": tell them apart by their parent folder
        out = [(f"{d.parent.name}/{d.name}", d) for _, d in out]
    if not out:
        raise CltPipeError("compare: no reports given")
    return out


# ---- writing -----------------------------------------------------------------------------------------------
def write_comparison(out: str | Path, members: list[tuple[str, Path]], *, settings: dict,
                     notes: list[str] | None = None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    reports = [(name, d, load_report(d)) for name, d in members]
    fid = [row for name, _, rep in reports for row in fidelity_rows(name, rep)]
    sub = [row for name, _, rep in reports for row in substitution_rows(name, rep)]
    stores = {json.dumps(rep["identity"]["store"].get("fingerprint")) for _, _, rep in reports}
    notes = list(notes or [])
    if len(stores) > 1:
        notes.append("the reports were measured on different stores: their numbers are not paired")
    files = {"parquet": [], "png": [], "json": [str(out / COMPARE_FILE)], "html": [str(out / "report.html")]}
    for name, rows in (("compare_fidelity", fid), ("compare_substitution", sub)):
        R._write_parquet(out / f"{name}.parquet", rows)
        files["parquet"].append(str(out / f"{name}.parquet"))
    png = out / "compare.png"
    if plot_comparison(png, [n for n, _, _ in reports], fid, sub):
        files["png"].append(str(png))
    write_html(out / "report.html", out, reports, fid, sub, png if files["png"] else None, notes, settings)
    record = {"settings": settings, "notes": notes, "files": files,
              "members": [{"name": n, "report": os.path.relpath(d, out)} for n, d, _ in reports],
              "fidelity": fid, "substitution": sub}
    tmp = out / f"{COMPARE_FILE}.tmp"
    tmp.write_text(json.dumps(R._jsonable(record), indent=1))
    tmp.replace(out / COMPARE_FILE)  # last: `clt-pipe run` reads it as the finished analysis
    return {"members": len(reports), "report": str(out / "report.html"),
            **{f"r2_all_{r['member']}": round(r["r2"], 4) for r in fid if r["tokens"] == "all"}}


def plot_comparison(path: Path, names: list[str], fid: list[dict], sub: list[dict]) -> bool:
    closed = [r for r in sub if r["mode"] == "closedloop" and r["top1"] is not None]
    panels = (1 if fid else 0) * 2 + (1 if closed else 0)
    if not panels:
        return False
    fig = Figure(figsize=(5.2 * panels, 4.4))
    axes = list(fig.subplots(1, panels, squeeze=False)[0])
    colours = {n: f"C{i % 10}" for i, n in enumerate(names)}
    if fid:
        ax = axes.pop(0)
        for r in fid:
            ax.scatter(r["l0"], r["fvu"], color=colours[r["member"]], marker=MARKERS.get(r["tokens"], "x"), s=40)
        for n in names:
            ax.scatter([], [], color=colours[n], label=n)
        for t, m in MARKERS.items():
            if any(r["tokens"] == t for r in fid):
                ax.scatter([], [], color="0.4", marker=m, label=f"{t} tokens")
        ax.set_xlabel("L0 (active features per token and layer, mean over layers)")
        ax.set_ylabel("FVU (mean over layers; lower is better)")
        ax.set_title("sparsity against fidelity")
        ax.legend(fontsize=7)
        ax = axes.pop(0)
        tokens = list(dict.fromkeys(r["tokens"] for r in fid))
        width = 0.8 / max(len(names), 1)
        for i, n in enumerate(names):
            rows = {r["tokens"]: r for r in fid if r["member"] == n}
            xs = [j + i * width for j in range(len(tokens))]
            ax.bar(xs, [rows[t]["r2"] if t in rows else 0 for t in tokens], width, color=colours[n], label=n)
            ax.scatter(xs, [rows[t]["cosine"] if t in rows else float("nan") for t in tokens], color="k",
                       marker="_", s=120, zorder=3)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tokens))])
        ax.set_xticklabels(tokens)
        ax.set_ylabel("R² (bars) and cosine (black ticks)")
        ax.set_title("fidelity per token type")
        ax.legend(fontsize=7)
    if closed:
        ax = axes.pop(0)
        base = next((r for r in closed if r["baseline_top1"] is not None), None)
        if base is not None:
            b, se = base["baseline_top1"], base["baseline_top1_se"] or 0.0
            ax.axhspan(b - se, b + se, color="0.85", label=f"baseline {b:.2f} ± 1 s.e.")
            ax.axhline(b, color="0.4", lw=1)
        for n in names:
            for t, style in (("cls", "-"), ("all", "--"), ("patches", ":")):
                rows = sorted((r for r in closed if r["member"] == n and r["tokens"] == t), key=lambda r: r["first"])
                if rows:
                    ax.errorbar([r["first"] for r in rows], [r["top1"] for r in rows],
                                yerr=[r["top1_se"] or 0 for r in rows], color=colours[n], ls=style, marker="o",
                                capsize=2, label=f"{n}, {t}")
        ax.set_xlabel("first substituted layer (window to the last layer)")
        ax.set_ylabel("closed-loop top-1 (%)")
        ax.set_title("zero-shot accuracy under substitution")
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax.legend(fontsize=7)
    return save(fig, path)


def _wide_substitution(sub: list[dict], names: list[str]) -> list[dict]:
    """One row per (mode, tokens, window): the baseline, then each member's top-1 ± s.e. and its difference."""
    rows: dict[tuple, dict] = {}
    for r in sub:
        key = (r["mode"], r["tokens"], r["window"])
        row = rows.setdefault(key, {"mode": r["mode"], "tokens": r["tokens"], "window": r["window"],
                                    "baseline top-1": _pm(r["baseline_top1"], r["baseline_top1_se"])})
        delta = "" if r["delta_top1_pp"] is None else f" ({r['delta_top1_pp']:+.2f}"
        if delta and r.get("ci_lo_pp") is not None:
            delta += f", 95% CI {r['ci_lo_pp']:+.2f}…{r['ci_hi_pp']:+.2f}"
        delta += ")" if delta else ""
        row[r["member"]] = _pm(r["top1"], r["top1_se"]) + delta
    cols = ("mode", "tokens", "window", "baseline top-1", *names)
    return [{k: row.get(k, "") for k in cols} for row in rows.values()]


def _pm(v: float | None, se: float | None) -> str:
    if v is None:
        return ""
    return f"{v:.2f} ± {se:.2f}" if se is not None else f"{v:.2f}"


def write_html(path: Path, out: Path, reports, fid, sub, png, notes, settings) -> None:
    names = [n for n, _, _ in reports]
    css = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;font-size:12px;"
           "margin-bottom:1em}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#eee}"
           "img{max-width:100%;border:1px solid #ddd;margin:4px 0}pre{background:#f6f6f6;padding:8px;"
           "font-size:11px;overflow:auto}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>CLT comparison</title><style>{css}</style>"
             f"</head><body><h1>Cross-layer transcoders compared ({len(reports)} members)</h1>"]
    st = reports[0][2]["identity"]["store"] if reports else {}
    parts.append(f"<p>Store <code>{html.escape(str(st.get('url')))}</code>, model "
                 f"{html.escape(str((st.get('model') or {}).get('name')))}. Every member was evaluated on the same "
                 f"tokens and images; accuracies carry ± 1 binomial standard error and stand beside the baseline of "
                 f"their mode (difference in percentage points in brackets); R² 0 (FVU 1) is what predicting each "
                 f"layer's mean output scores.</p>")
    for n in notes:
        parts.append(f"<p><strong>Note:</strong> {html.escape(n)}</p>")
    links = "".join(f"<li><a href='{html.escape(os.path.relpath(d / 'report.html', out))}'>{html.escape(n)}</a> — "
                    f"{html.escape(json.dumps(rep['identity']['clt']['spec']))}</li>" for n, d, rep in reports)
    parts.append(f"<h2>Members</h2><ul>{links}</ul>")
    if png is not None:
        parts.append(R._img(png))
    parts.append("<h2>Fidelity (means over layers)</h2>" + R._html_table(fid))
    if sub:
        parts.append("<h2>Zero-shot substitution (top-1 %)</h2>" + R._html_table(_wide_substitution(sub, names)))
    parts.append("<h2>Settings</h2><pre>" + html.escape(json.dumps(R._jsonable(settings), indent=1)) + "</pre>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")


# ---- entry points ------------------------------------------------------------------------------------------
def compare_reports(paths: list[str], out: str) -> dict:
    """`clt-pipe compare REPORT... --out OUT`."""
    members = expand_reports(paths)
    return write_comparison(out, members, settings={"reports": [str(d) for _, d in members]})
