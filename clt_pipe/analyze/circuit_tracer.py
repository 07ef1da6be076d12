"""`clt-pipe export`: a fitted CLT as circuit-tracer reads it, with the agreement measured on the store.

circuit-tracer (0.5) knows two activations, ReLU and JumpReLU (``z = pre · (pre > θ)``), and picks JumpReLU
when the files hold ``threshold_{i}``. It has no TopK: ReLU-TopK files without thresholds load without error
as a plain ReLU CLT (on the demo: ~245 active latents per token instead of 16, R² −2.4 to −6). So:

* ``jumprelu`` / ``batchtopk`` CLTs are written as they are (batchtopk's per-layer inference threshold broadcast
  per feature), which circuit-tracer reproduces to float precision.
* ``relu_topk`` CLTs are converted to JumpReLU with per-feature thresholds calibrated on the store: θ_f sits
  between the pre-activations where TopK keeps feature f and those where it does not, so that each feature fires
  on the calibration rows exactly as often as under TopK (crosslayer-coding converts BatchTopK to JumpReLU
  the same way, from the selected pre-activations; it averages their per-batch minimum instead). This needs
  ``--store``; without it the export is refused.
* ``abs_topk`` codes are signed, which neither circuit-tracer activation can produce: refused.

Agreement is measured on store rows *not* used for calibration: R² of circuit-tracer's reconstruction against
ours and against the stored targets, and both L0s, per layer. With circuit-tracer installed the exported files
are read back through its own ``load_clt``; otherwise through this package's loader, which applies the same
JumpReLU rule (the summary says which).

``config.yaml`` is what circuit-tracer's hub loader (``load_transcoder_from_hub``) reads next to the weights.
Note for ViTs: circuit-tracer's attribution zeroes position 0 (``zero_positions=slice(0, 1)``, the BOS token of a
language model), which in a ViT is the CLS token.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch

from clt_pipe.clt.export import fold_standardization, save_clt
from clt_pipe.clt.model import CrossLayerTranscoder
from clt_pipe.errors import CltPipeError

CALIBRATION_ROWS = 8192
HUB_CONFIG = "config.yaml"
# circuit-tracer hook names (TransformerLens naming, per block): the CLT reads the LN2 output, writes the MLP output
FEATURE_INPUT_HOOK = "ln2.hook_normalized"
FEATURE_OUTPUT_HOOK = "hook_mlp_out"
MIN_THRESHOLD = 1e-6  # JumpReLU thresholds must be > 0 (they are stored as log θ)


# ------------------------------------------------------------------------------------------ store rows

def store_rows(store, n_rows: int, device: torch.device, read_threads: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint samples of up to ``n_rows`` valid token rows (x, y) each, from chunks spread over the store.

    Even-numbered picked chunks feed the first (calibration), odd-numbered the second (evaluation).
    """
    from clt_pipe.analyze.stream import iter_chunks

    lay = store.layout
    want = max(1, -(-2 * n_rows // max(lay.rows_per_chunk, 1)))
    picked = sorted(set(np.linspace(0, lay.n_chunks - 1, min(want, lay.n_chunks)).round().astype(int).tolist()))
    parts: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[], []]
    got = [0, 0]
    for k, batch in enumerate(iter_chunks(store, device, 0, read_threads, chunks=picked)):
        side = k % 2 if len(picked) > 1 else 0
        keep = torch.from_numpy(batch.valid).to(batch.x.device)
        x, y = batch.x[keep], batch.y[keep]
        room = n_rows - got[side]
        if room > 0 and x.shape[0]:
            parts[side].append((x[:room], y[:room]))
            got[side] += min(room, x.shape[0])
    if len(picked) == 1:  # one chunk: split its rows
        x = torch.cat([p[0] for p in parts[0]])
        y = torch.cat([p[1] for p in parts[0]])
        h = x.shape[0] // 2
        return (x[:h], y[:h]), (x[h:], y[h:])
    return tuple((torch.cat([p[0] for p in ps]), torch.cat([p[1] for p in ps])) for ps in parts)  # type: ignore


# ------------------------------------------------------------------------------------------ calibration

@torch.no_grad()
def calibrate_thresholds(clt: CrossLayerTranscoder, x: torch.Tensor) -> torch.Tensor:
    """Per-feature JumpReLU thresholds [L, F] reproducing ``clt``'s TopK firing on the rows ``x`` [N, L, d].

    For feature f with n_f firing rows among N, θ_f is the midpoint between the (n_f+1)-th and n_f-th largest
    pre-activation, so exactly the n_f largest pass ``pre > θ_f`` (ties aside); never-firing features get a θ
    just above their largest pre-activation, always-firing ones just below their smallest.
    """
    L = clt.n_layers
    thr = torch.empty(L, clt.n_features, dtype=torch.float32, device=x.device)
    for layer in range(L):
        xl = x[:, layer]
        xs = (xl.to(clt.W_enc.dtype) - clt.in_mean[layer]) / clt.in_scale[layer]
        pre = torch.addmm(clt.b_enc[layer], xs, clt.W_enc[layer]).float()  # [N, F]
        fires = (clt.encode_layer(xl, layer) != 0).sum(0)  # [F]
        s = pre.sort(0).values  # ascending
        n = s.shape[0]
        lo_idx = (n - fires - 1).clamp(0, n - 1)  # largest non-firing value (when fires < n)
        hi_idx = (n - fires).clamp(0, n - 1)  # smallest firing value (when fires > 0)
        lo = s.gather(0, lo_idx[None]).squeeze(0)
        hi = s.gather(0, hi_idx[None]).squeeze(0)
        mid = (lo + hi) / 2
        pad = 1e-3 * s.abs().amax(0).clamp_min(1e-6)
        mid = torch.where(fires == 0, s[-1] + pad, mid)
        mid = torch.where(fires == n, s[0] - pad, mid)
        thr[layer] = mid.clamp_min(MIN_THRESHOLD)
    return thr


@torch.no_grad()
def as_jumprelu(clt: CrossLayerTranscoder, thresholds: torch.Tensor) -> CrossLayerTranscoder:
    """A JumpReLU CLT with ``clt``'s weights (standardisation folded) and the given per-feature thresholds."""
    src = fold_standardization(clt)
    spec = dataclasses.replace(src.spec, sparsifier="jumprelu")
    new = CrossLayerTranscoder(spec).to(src.W_enc.device, src.W_enc.dtype)
    new.W_enc.copy_(src.W_enc)
    new.b_enc.copy_(src.b_enc)
    for a, b in zip(new.W_dec, src.W_dec):
        a.copy_(b)
    if new.b_dec is not None:
        new.b_dec.copy_(src.b_dec)
    new.set_standardization(src.in_mean, src.in_scale, src.out_scale)
    new.log_threshold.copy_(thresholds.to(new.log_threshold.dtype).log())
    return new.eval()


# ------------------------------------------------------------------------------------------ agreement

def circuit_tracer_reader(path: Path, device: torch.device):
    """(name, fn x[N, L, d] -> (recon [N, L, d], l0 [L])) reading the exported files as circuit-tracer does."""
    try:
        from circuit_tracer.transcoder.cross_layer_transcoder import load_clt as ct_load_clt
        import circuit_tracer
    except Exception:  # noqa: BLE001 - not installed, or its optional stack broken: use the same rule ourselves
        from clt_pipe.clt.export import load_clt

        ours = load_clt(path, device=device)

        @torch.no_grad()
        def read(x):
            out = ours(x)
            z = ours.encode(x)
            return out.recon.float(), (z != 0).float().sum(-1).mean(0)

        return "clt_pipe (circuit-tracer's JumpReLU rule; circuit-tracer not installed)", read

    ct = ct_load_clt(str(path), device=device, dtype=torch.float32, lazy_decoder=False, lazy_encoder=False)
    version = getattr(circuit_tracer, "__version__", "?")

    @torch.no_grad()
    def read(x):
        xt = x.transpose(0, 1).contiguous()  # circuit-tracer: [L, n_pos, d]
        z = ct.encode(xt)  # [L, n, F]
        return ct(xt).transpose(0, 1).float(), (z != 0).float().sum(-1).mean(1)

    return f"circuit-tracer {version} load_clt", read


def _r2(pred: torch.Tensor, ref: torch.Tensor) -> list[float]:
    """Per layer 1 − SSE/SST over rows, pred/ref [N, L, d]."""
    p, r = pred.double(), ref.double()
    sse = (p - r).pow(2).sum((0, 2))
    sst = (r - r.mean(0, keepdim=True)).pow(2).sum((0, 2)).clamp_min(1e-30)
    return (1 - sse / sst).tolist()


@torch.no_grad()
def agreement(ours: CrossLayerTranscoder, read, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> dict:
    recs, theirs, l0_ours, l0_theirs = [], [], [], []
    for s in range(0, x.shape[0], batch):
        xb = x[s:s + batch]
        recs.append(ours(xb).recon.float())
        l0_ours.append((ours.encode(xb) != 0).float().sum(-1).sum(0))
        rt, l0 = read(xb)
        theirs.append(rt)
        l0_theirs.append(l0 * xb.shape[0])
    rec, th = torch.cat(recs), torch.cat(theirs)
    n = x.shape[0]
    per_layer = {
        "r2_vs_ours": _r2(th, rec),
        "r2_vs_targets": _r2(th, y),
        "r2_ours_vs_targets": _r2(rec, y),
        "l0_ours": (torch.stack(l0_ours).sum(0) / n).tolist(),
        "l0_circuit_tracer": (torch.stack(l0_theirs).sum(0) / n).tolist(),
    }
    summ = {k: {"mean": float(np.mean(v)), "min": float(np.min(v))} for k, v in per_layer.items()}
    return {"n_rows": n, "per_layer": per_layer, "summary": summ,
            "max_abs_diff": float((th - rec).abs().max()) if n else 0.0}


# ------------------------------------------------------------------------------------------ the export

def write_hub_config(out: Path, clt: CrossLayerTranscoder, run_meta: dict) -> Path:
    """``config.yaml`` for circuit-tracer's hub loader. Written as JSON, which is valid YAML."""
    model = (run_meta.get("store") or {}).get("model") or {}
    cfg = {
        "model_kind": "cross_layer_transcoder",
        "model_name": model.get("name", ""),
        "feature_input_hook": FEATURE_INPUT_HOOK,
        "feature_output_hook": FEATURE_OUTPUT_HOOK,
        "clt_pipe": {"sparsifier_trained": clt.spec.sparsifier, "n_layers": clt.n_layers, "d_model": clt.d_model,
                     "n_features": clt.n_features, "model": model,
                     "note": "ViT: circuit-tracer's attribution zeroes position 0, which is the CLS token"},
    }
    path = out / HUB_CONFIG
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("# circuit-tracer hub config (written by clt-pipe export)\n" + json.dumps(cfg, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def export_for_circuit_tracer(run_dir: str | Path, out: str | Path, store_url: str = "", device: str = "cpu",
                              calibration_rows: int = CALIBRATION_ROWS, read_threads: int = 4) -> dict:
    """Write ``out`` for circuit-tracer (see the module docstring); returns the export summary."""
    from clt_pipe.outdir import hold_out_dir

    with hold_out_dir(out, "export"):
        return _export(run_dir, out, store_url, device, calibration_rows, read_threads)


def _export(run_dir: str | Path, out: str | Path, store_url: str, device: str, calibration_rows: int,
            read_threads: int) -> dict:
    from clt_pipe.clt.rundir import load_fitted

    clt, run_meta = load_fitted(run_dir)
    sparsifier = clt.spec.sparsifier
    why = clt.spec.kind.circuit_tracer_refusal(bool(store_url))
    if why:
        raise CltPipeError(why)
    dev = torch.device(device)
    clt = clt.to(dev).eval()
    rows = None
    store = None
    if store_url:
        from clt_pipe.store.reader import ActivationStore

        store = ActivationStore(store_url)
        if (store.n_layers, store.d_model) != (clt.n_layers, clt.d_model):
            raise CltPipeError(f"export: store {store_url} holds {store.n_layers} layers × {store.d_model}, the CLT "
                               f"{clt.n_layers} × {clt.d_model}")
        rows = store_rows(store, calibration_rows, dev, read_threads)
    summary: dict = {"out": str(out), "sparsifier": sparsifier}
    if sparsifier == "relu_topk":
        (xc, _), _ = rows
        exported = as_jumprelu(clt, calibrate_thresholds(clt, xc))
        summary.update(exported_as="jumprelu (per-feature thresholds calibrated on the store)",
                       calibration_rows=int(xc.shape[0]))
    else:
        exported = clt
        summary["exported_as"] = sparsifier if sparsifier == "jumprelu" else "jumprelu (batchtopk threshold)"
    out = Path(out)
    save_clt(exported, out, extra_meta={"run": run_meta.get("store", {}), "circuit_tracer": {
        "trained_sparsifier": sparsifier, "calibrated_on": store_url or None}})
    write_hub_config(out, clt, run_meta)
    if rows is not None:
        (_, _), (xe, ye) = rows
        if xe.shape[0] == 0:
            raise CltPipeError(f"export: store {store_url} has no valid token rows to measure the agreement on")
        reader, read = circuit_tracer_reader(out, dev)
        agr = agreement(clt, read, xe, ye)
        summary.update(reader=reader, agreement=agr)
        (out / "export_summary.json").write_text(json.dumps(summary, indent=1))
    return summary
