"""`clt-pipe export`: a fitted CLT as circuit-tracer reads it, with the agreement measured on the store.

circuit-tracer (0.5) knows two activations, ReLU and JumpReLU (``z = pre · (pre > θ)``), and picks JumpReLU
when the files hold ``threshold_{i}``. It has no TopK: ReLU-TopK files without thresholds load without error
as a plain ReLU CLT (on the demo: ~245 active latents per token instead of 16, R² −2.4 to −6), which is why a
TopK run's ``clt/`` is written with keys circuit-tracer's loader refuses (``clt.export``). So:

* ``jumprelu`` / ``batchtopk`` CLTs are written as they are (batchtopk's per-layer inference threshold broadcast
  per feature), which circuit-tracer reproduces to float precision.
* ``relu_topk`` CLTs are converted to JumpReLU with per-feature thresholds calibrated on the store
  (``jumprelu_calibration``: fitted to the reported error by default, or matching TopK's firing rate). This needs
  ``--store``; without it the export is refused. circuit-tracer's JumpReLU has one threshold per feature at every
  position, so what TopK does per token cannot always be matched on every token type: the summary says so.
* ``abs_topk`` codes are signed, which neither circuit-tracer activation can produce: refused.

Agreement is measured on store rows *not* used for calibration (``ct_agreement``): R² of circuit-tracer's
reconstruction against ours and against the stored targets, and both L0s, per layer and per token type (CLS,
patches, all); a one-line warning names the worst token type and layer below ``--min-r2``. With circuit-tracer
installed the exported files are read back through its own ``load_clt``; otherwise through this package's loader,
which applies the same JumpReLU rule (the summary says which).

The input hook (``ct_hooks``): ``ln2.hook_normalized`` (LN2's weight and bias folded into the encoder, as
circuit-tracer 0.5 places that hook before them) or ``mlp.hook_in`` (as trained). ``config.yaml`` is what
circuit-tracer's hub loader (``load_transcoder_from_hub``) reads next to the weights.
Note for ViTs: circuit-tracer's attribution zeroes position 0 (``zero_positions=slice(0, 1)``, the BOS token of a
language model), which in a ViT is the CLS token.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clt_pipe.analyze import jumprelu_calibration as cal
from clt_pipe.analyze import ct_hooks
from clt_pipe.analyze.ct_agreement import agreement, shortfall
from clt_pipe.clt.export import fold_input_affine, fold_standardization, save_clt
from clt_pipe.clt.model import CrossLayerTranscoder
from clt_pipe.errors import CltPipeError

CALIBRATION_ROWS = 8192
HUB_CONFIG = "config.yaml"
MIN_R2 = 0.9  # the export warns when a token type's R² vs the CLT falls below this at any layer


# ------------------------------------------------------------------------------------------ store rows

@dataclass
class Rows:
    x: torch.Tensor  # [N, L, d] MLP inputs
    y: torch.Tensor  # [N, L, d] MLP outputs
    pos: np.ndarray  # [N] ViT position of each row (0 = CLS)


def store_rows(store, n_rows: int, device: torch.device, read_threads: int = 4) -> tuple[Rows, Rows]:
    """Two disjoint samples of up to ``n_rows`` valid token rows each, from chunks spread over the store.

    Even-numbered picked chunks feed the first (calibration), odd-numbered the second (evaluation).
    """
    from clt_pipe.analyze.stream import iter_chunks

    lay = store.layout
    want = max(1, -(-2 * n_rows // max(lay.rows_per_chunk, 1)))
    picked = sorted(set(np.linspace(0, lay.n_chunks - 1, min(want, lay.n_chunks)).round().astype(int).tolist()))
    parts: list[list[Rows]] = [[], []]
    got = [0, 0]
    for k, batch in enumerate(iter_chunks(store, device, 0, read_threads, chunks=picked)):
        side = k % 2 if len(picked) > 1 else 0
        keep = torch.from_numpy(batch.valid).to(batch.x.device)
        x, y, pos = batch.x[keep], batch.y[keep], batch.pos[batch.valid]
        room = n_rows - got[side]
        if room > 0 and x.shape[0]:
            parts[side].append(Rows(x[:room], y[:room], pos[:room]))
            got[side] += min(room, x.shape[0])

    def cat(ps: list[Rows]) -> Rows:
        return Rows(torch.cat([p.x for p in ps]), torch.cat([p.y for p in ps]), np.concatenate([p.pos for p in ps]))

    if len(picked) == 1:  # one chunk: split its rows
        r = cat(parts[0])
        h = r.x.shape[0] // 2
        return Rows(r.x[:h], r.y[:h], r.pos[:h]), Rows(r.x[h:], r.y[h:], r.pos[h:])
    return cat(parts[0]), cat(parts[1])


# ------------------------------------------------------------------------------------------ calibration

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

def circuit_tracer_reader(path: Path, device: torch.device, to_hook=None):
    """(name, fn x[N, L, d] -> (recon [N, L, d], active count [N, L])): the exported files read as circuit-tracer
    reads them; ``to_hook`` maps the store's x to what the export's input hook holds (None: x itself)."""
    hook = to_hook or (lambda x: x)
    try:
        from circuit_tracer.transcoder.cross_layer_transcoder import load_clt as ct_load_clt
        import circuit_tracer
    except Exception:  # noqa: BLE001 - not installed, or its optional stack broken: use the same rule ourselves
        from clt_pipe.clt.export import load_clt

        ours = load_clt(path, device=device)

        @torch.no_grad()
        def read(x):
            out = ours(hook(x))
            return out.recon.float(), (out.z != 0).float().sum(-1)

        return "clt_pipe (circuit-tracer's JumpReLU rule; circuit-tracer not installed)", read

    ct = ct_load_clt(str(path), device=device, dtype=torch.float32, lazy_decoder=False, lazy_encoder=False)
    version = getattr(circuit_tracer, "__version__", "?")

    @torch.no_grad()
    def read(x):
        xt = hook(x).transpose(0, 1).contiguous()  # circuit-tracer: [L, n_pos, d]
        z = ct.encode(xt)  # [L, n, F]
        return ct(xt).transpose(0, 1).float(), (z != 0).float().sum(-1).T

    return f"circuit-tracer {version} load_clt", read


# ------------------------------------------------------------------------------------------ the export

def write_hub_config(out: Path, clt: CrossLayerTranscoder, model: dict, input_hook: str) -> Path:
    """``config.yaml`` for circuit-tracer's hub loader. Written as JSON, which is valid YAML."""
    folded = input_hook == ct_hooks.LN2_NORMALIZED
    cfg = {
        "model_kind": "cross_layer_transcoder",
        "model_name": model.get("name", ""),
        "feature_input_hook": input_hook,
        "feature_output_hook": ct_hooks.OUTPUT_HOOK,
        "clt_pipe": {"sparsifier_trained": clt.spec.sparsifier, "n_layers": clt.n_layers, "d_model": clt.d_model,
                     "n_features": clt.n_features, "model": model,
                     "ln2_affine": ("folded into W_enc/b_enc: ln2.hook_normalized is before LN2's weight and bias "
                                    "(circuit-tracer 0.5, transformer-lens 3)") if folded else
                     "not folded: the encoder reads the LN2 output, weight and bias applied, as trained",
                     "note": "ViT: circuit-tracer's attribution zeroes position 0, which is the CLS token"},
    }
    path = out / HUB_CONFIG
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("# circuit-tracer hub config (written by clt-pipe export)\n" + json.dumps(cfg, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def export_for_circuit_tracer(run_dir: str | Path, out: str | Path, store_url: str = "", device: str = "cpu",
                              calibration_rows: int = CALIBRATION_ROWS, read_threads: int = 4, *,
                              calibration: str = "error", min_r2: float = MIN_R2,
                              input_hook: str = ct_hooks.LN2_NORMALIZED) -> dict:
    """Write ``out`` for circuit-tracer (see the module docstring); returns the export summary, whose
    ``warning`` (one line, or absent) says which token type falls below ``min_r2`` against the CLT, and why."""
    from clt_pipe.outdir import hold_out_dir

    if calibration not in cal.METHODS:
        raise CltPipeError(f"export: --calibration {calibration!r} is not one of {', '.join(cal.METHODS)}")
    if input_hook not in ct_hooks.INPUT_HOOKS:
        raise CltPipeError(f"export: --input-hook {input_hook!r} is not one of {', '.join(ct_hooks.INPUT_HOOKS)}")
    with hold_out_dir(out, "export"):
        return _export(run_dir, out, store_url, device, calibration_rows, read_threads, calibration, min_r2,
                       input_hook)


def _export(run_dir: str | Path, out: str | Path, store_url: str, device: str, calibration_rows: int,
            read_threads: int, calibration: str, min_r2: float, input_hook: str) -> dict:
    from clt_pipe.clt.rundir import load_fitted

    clt, run_meta = load_fitted(run_dir)
    sparsifier = clt.spec.sparsifier
    why = clt.spec.kind.circuit_tracer_refusal(bool(store_url))
    if why:
        raise CltPipeError(why)
    dev = torch.device(device)
    clt = clt.to(dev).eval()
    rows = None
    if store_url:
        from clt_pipe.store.reader import ActivationStore

        store = ActivationStore(store_url)
        if (store.n_layers, store.d_model) != (clt.n_layers, clt.d_model):
            raise CltPipeError(f"export: store {store_url} holds {store.n_layers} layers × {store.d_model}, the CLT "
                               f"{clt.n_layers} × {clt.d_model}")
        rows = store_rows(store, calibration_rows, dev, read_threads)
    model = store.model if store_url else (run_meta.get("store") or {}).get("model") or {}
    to_hook = None
    if input_hook == ct_hooks.LN2_NORMALIZED:
        gamma, beta = ct_hooks.ln2_affine(model, dev)

        def to_hook(x):
            return ct_hooks.normalized_from_ln_out(x, gamma, beta)
    summary: dict = {"out": str(out), "sparsifier": sparsifier, "min_r2": min_r2, "input_hook": input_hook}
    if sparsifier == "relu_topk":
        calib_rows = rows[0]
        c = cal.calibrate(clt, calib_rows.x, calib_rows.pos, calibration)
        exported = as_jumprelu(clt, c.thresholds)
        summary.update(exported_as=f"jumprelu (per-feature thresholds calibrated on the store: {c.chosen})",
                       calibration_rows=int(calib_rows.x.shape[0]),
                       calibration={"method": c.method, "chosen": c.chosen, "loss": c.loss,
                                    "cls_rows": int((calib_rows.pos == 0).sum())})
    else:
        exported = fold_standardization(clt)
        summary["exported_as"] = sparsifier if sparsifier == "jumprelu" else "jumprelu (batchtopk threshold)"
    if to_hook is not None:
        exported = fold_input_affine(exported, gamma, beta)
    out = Path(out)
    save_clt(exported, out, extra_meta={"run": run_meta.get("store", {}), "circuit_tracer": {
        "trained_sparsifier": sparsifier, "calibrated_on": store_url or None, "input_hook": input_hook,
        "ln2_affine_folded": to_hook is not None}})
    write_hub_config(out, clt, model, input_hook)
    if rows is not None:
        ev = rows[1]
        if ev.x.shape[0] == 0:
            raise CltPipeError(f"export: store {store_url} has no valid token rows to measure the agreement on")
        reader, read = circuit_tracer_reader(out, dev, to_hook)
        agr = agreement(clt, read, ev.x, ev.y, ev.pos)
        summary.update(reader=reader, agreement=agr)
        low = shortfall(agr, min_r2)
        if low is not None and sparsifier == "relu_topk":
            low["alone"] = alone_bound(clt, rows, low, calibration)
            summary["type_alone_bound"] = low["alone"]
        if low is not None:
            summary["warning"] = shortfall_line(low, min_r2, sparsifier)
        (out / "export_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


@torch.no_grad()
def alone_bound(clt: CrossLayerTranscoder, rows: tuple[Rows, Rows], low: dict, method: str) -> dict:
    """The short token type's R² vs the CLT at its worst layer (held-out rows) with thresholds calibrated on that
    type's rows alone, and the other type's R² there with those thresholds: what one threshold per feature
    costs, measured (circuit-tracer's JumpReLU rule, applied by this package)."""
    from clt_pipe.analyze.ct_agreement import r2_per_layer
    from clt_pipe.tokens import token_mask

    calib, ev = rows
    t, layer = low["type"], low["layer"]
    keep = token_mask(calib.pos, t)
    if not keep.any():
        return {}
    c = cal.calibrate(clt, calib.x[torch.as_tensor(keep, device=calib.x.device)], calib.pos[keep], method)
    alone = as_jumprelu(clt, c.thresholds)
    out: dict = {"type": t, "layer": layer}
    for name in ("cls", "patches"):
        m = torch.as_tensor(token_mask(ev.pos, name), device=ev.x.device)
        if bool(m.any()):
            x = ev.x[m]
            out[f"r2_{name}"] = r2_per_layer(alone(x).recon, clt(x).recon)[layer]
    return out


def shortfall_line(low: dict, min_r2: float, sparsifier: str) -> str:
    """One line: which token type and layer circuit-tracer reproduces worse than ``min_r2``, and why."""
    t = low["type"]
    line = (f"{t} tokens: R² of circuit-tracer's reading vs the CLT is {low['r2']:.3f} at layer "
            f"{low['layer']} (below --min-r2 {min_r2:g}; L0 {low['l0_circuit_tracer']:.1f} vs the CLT's "
            f"{low['l0_ours']:.1f})")
    if sparsifier != "relu_topk":
        return line
    alone = low.get("alone") or {}
    other = "patches" if t == "cls" else "cls"
    if alone.get(f"r2_{t}", -np.inf) >= min_r2:
        return line + (f"; circuit-tracer's JumpReLU has one threshold per feature at every position: thresholds "
                       f"fitted to {t} alone reach {alone[f'r2_{t}']:.3f} on {t} but "
                       f"{alone.get(f'r2_{other}', float('nan')):.3f} on {other}, so no one set serves both")
    return line + (f"; even thresholds fitted to {t} alone reach only {alone.get(f'r2_{t}', float('nan')):.3f}: "
                   f"TopK cuts each token at its own k-th value, which no per-feature threshold reproduces")


def summary_lines(summary: dict) -> list[str]:
    """What ``clt-pipe export`` prints: the export, then R² and L0 per token type (mean and worst layer) and
    per layer, and the warning line when a token type falls below ``min_r2``."""
    lines = [f"exported to {summary['out']} as {summary['exported_as']} (trained: {summary['sparsifier']}; "
             f"input hook {summary['input_hook']})"]
    agr = summary.get("agreement")
    if not agr:
        return lines + ["agreement not measured (pass --store to measure it)"]
    lines.append(f"agreement on {agr['n_rows']} held-out store rows, read by {summary['reader']}:")
    labels = (("r2_vs_ours", "R² circuit-tracer vs ours"), ("r2_vs_targets", "R² circuit-tracer vs targets"),
              ("r2_ours_vs_targets", "R² ours vs targets"), ("l0_ours", "L0 ours"),
              ("l0_circuit_tracer", "L0 circuit-tracer"))
    for t, block in agr["by_token_type"].items():
        lines.append(f" {t} ({block['n_rows']} rows)" + " " * max(0, 24 - len(t)) + "  mean    worst  per layer")
        for key, label in labels:
            v, pl = block["summary"][key], block["per_layer"][key]
            worst = v["max"] if key.startswith("l0") else v["min"]
            lines.append(f"  {label:30s} {v['mean']:7.3f} {worst:7.3f}  " + " ".join(f"{a:.3f}" for a in pl))
    if summary.get("warning"):
        lines.append("warning: " + summary["warning"])
    return lines
