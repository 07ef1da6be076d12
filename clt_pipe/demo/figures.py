"""The demo figures the docs quote, computed from a finished demo (never typed by hand).

    python -m clt_pipe.demo.figures runs/demo       # the --workdir of `clt-pipe demo`

Prints, from the demo's test store, CLT and report:
* the CLS R² at layer 1 of the truncated reconstruction (only in-window sources, window starting at layer 1:
  ``--sources-before-window false``) against the full one (README, docs/DECISIONS.md, analyze/sources.py);
* the report's headline comparisons: closed-loop substitution per window with images lost / gained, McNemar p
  and the paired interval beside mean- and zero-ablation; R² and cosine beside the per-position train-mean
  predictor; retrieval agreement beside the raw MLP input and chance.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def truncated_r2(store, clt, layer: int = 1, tokens: str = "cls") -> dict:
    """R² of layer ``layer``'s reconstruction from all sources vs only sources ≥ ``layer`` (the in-window rule
    for a window starting there), over the store's ``tokens`` rows."""
    from clt_pipe.analyze.stream import iter_chunks

    sse = {"full": 0.0, "window": 0.0}
    ys = []
    with torch.no_grad():
        for b in iter_chunks(store, torch.device("cpu"), 0, 2):
            m = torch.from_numpy(b.mask(tokens))
            if not bool(m.any()):
                continue
            x, y = b.x[m], b.y[m][:, layer].double()
            z = clt.encode(x)
            zs = [z[:, i] for i in range(layer + 1)]
            full = clt.decode_to(zs, layer).double()
            window = clt.decode_to([None] * layer + zs[layer:], layer).double()
            sse["full"] += float((full - y).pow(2).sum())
            sse["window"] += float((window - y).pow(2).sum())
            ys.append(y)
    y = torch.cat(ys)
    sst = float((y - y.mean(0)).pow(2).sum())
    return {f"{k}_r2": 1.0 - v / sst for k, v in sse.items()} | {"layer": layer, "tokens": tokens, "n": len(y)}


def report_figures(report_json: Path) -> list[str]:
    res = json.loads(report_json.read_text())["results"]
    lines = []
    base = res.get("closedloop_baseline") or {}
    if base:
        lines.append(f"closed-loop baseline top-1 {base['top1']:.2f} % (n={base['n']})")
    for r in (res.get("closedloop") or {}).get("rows", []):
        if r.get("reaches_readout") is False:
            lines.append(f"  closedloop {r['tokens']:>7} {r['window']:>4}: not run ({r['note']})")
            continue
        lines.append(f"  closedloop {r['tokens']:>7} {r['window']:>4} {r['replaced_by']:<27} top-1 {r['top1']:6.2f}"
                     f"  Δ {r['delta_top1_pp']:+6.2f} pp [{r['ci_lo_pp']:+.2f}, {r['ci_hi_pp']:+.2f}]"
                     f"  lost {r['lost']:>3} gained {r['gained']:>3}  McNemar p {r['mcnemar_p']:.3g}")
    for r in (res.get("openloop") or {}).get("rows", []):
        lines.append(f"  openloop       cls {r['window']:>4} {r['replaced_by']:<27} top-1 {r['top1']:6.2f}"
                     f"  Δ {r['delta_top1_pp']:+6.2f} pp  lost {r['lost']:>3} gained {r['gained']:>3}"
                     f"  McNemar p {r['mcnemar_p']:.3g}")
    fid = (res.get("fidelity") or {}).get("per_layer", [])
    for t in ("cls", "patches"):
        rs = [r for r in fid if r["tokens"] == t]
        if rs and "r2_mean_pred" in rs[0]:
            def rng(k: str, rs=rs) -> str:
                return f"{min(r[k] for r in rs):.3f}–{max(r[k] for r in rs):.3f}"

            lines.append(f"fidelity {t}: R² {rng('r2')} (train mean alone {rng('r2_mean_pred')}, skill over it "
                         f"{rng('skill_vs_mean')}); cosine {rng('cosine')} (train mean {rng('cosine_mean_pred')}, "
                         f"centred {rng('cosine_centred')}); FVU {rng('fvu')}")
    for r in (res.get("retrieval") or {}).get("per_layer", []):
        lines.append(f"retrieval layer {r['layer']}: agreement {r['label_agreement']:.3f} ± {r['se']:.3f} "
                     f"(raw MLP input {r['input_label_agreement']:.3f} ± {r['input_se']:.3f}, chance "
                     f"{r['chance']:.3f}; {r['n_queries']} queries × {r['k']})")
    return lines


def main(argv: list[str] | None = None) -> int:
    from clt_pipe.clt.rundir import load_fitted
    from clt_pipe.store.reader import ActivationStore

    args = sys.argv[1:] if argv is None else argv
    workdir = Path(args[0] if args else "runs/demo")
    store = ActivationStore(str(workdir / "digits-test.zarr"))
    clt, _ = load_fitted(str(workdir / "clt"))
    t = truncated_r2(store, clt.eval())
    print(f"truncated CLS R² at layer {t['layer']} (in-window sources only): {t['window_r2']:.2f}; "
          f"full reconstruction: {t['full_r2']:.3f}  ({t['n']} CLS tokens of the test split)")
    report = workdir / "report" / "report.json"
    if report.is_file():
        print("\n".join(report_figures(report)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
