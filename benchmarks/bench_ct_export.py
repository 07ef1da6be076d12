"""circuit-tracer export of a relu_topk CLT: the two threshold calibrations side by side on one run and store.

    python benchmarks/bench_ct_export.py RUN_DIR STORE [--rows 8192] [--input-hook mlp.hook_in]

Prints, per calibration (``frequency``: TopK's firing rate, issue 14; ``error``: fitted to the reported error,
the default), the wall time and R² vs the CLT and L0 per token type and layer on the held-out rows, then the
paired difference error − frequency of the CLS R² at every layer with a bootstrap interval over the held-out CLS
rows (one per image, so resampling them resamples images). Both read the exported files through circuit-tracer
when it is installed (the export's own reader).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from clt_pipe.analyze.circuit_tracer import export_for_circuit_tracer, store_rows
from clt_pipe.clt.export import load_clt
from clt_pipe.clt.rundir import load_fitted
from clt_pipe.store.reader import ActivationStore


def _cls_sse(run: str, out: str, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per CLS row and layer: squared error of the exported CLT vs ours [N, L], and ours [N, L, d]."""
    ours, _ = load_fitted(run)
    exported = load_clt(out)
    with torch.no_grad():
        ref = ours(x).recon.double()
        got = exported(x).recon.double()
    return (got - ref).pow(2).sum(-1).numpy(), ref.numpy()


def _r2(sse: np.ndarray, ref: np.ndarray) -> np.ndarray:
    sst = ((ref - ref.mean(0, keepdims=True)) ** 2).sum((0, 2))
    return 1 - sse.sum(0) / sst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("store")
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--input-hook", default="mlp.hook_in", help="mlp.hook_in needs no ViT; the fold is exact")
    ap.add_argument("--boot", type=int, default=2000)
    a = ap.parse_args()
    torch.set_num_threads(1)  # the calibration's small steps lose far more to two contending threads than they gain
    print(f"config: run={a.run} store={a.store} calibration_rows={a.rows} input_hook={a.input_hook}")
    tmp = tempfile.mkdtemp(prefix="bench-ct-")
    sse = {}
    _, ev = store_rows(ActivationStore(a.store), a.rows, torch.device("cpu"))
    cls_x = ev.x[torch.as_tensor(ev.pos == 0)]
    for method in ("frequency", "error"):
        t0 = time.perf_counter()
        s = export_for_circuit_tracer(a.run, f"{tmp}/{method}", a.store, calibration_rows=a.rows,
                                      calibration=method, input_hook=a.input_hook, min_r2=0.9)
        dt = time.perf_counter() - t0
        print(f"\n{method}: {dt:.1f} s, kept {s['calibration']['chosen']}, calibration loss "
              f"{s['calibration']['loss']}, reader {s['reader']}")
        for t, b in s["agreement"]["by_token_type"].items():
            pl = b["per_layer"]
            print(f"  {t:8s} ({b['n_rows']:5d} rows)  R² vs CLT " + " ".join(f"{v:6.3f}" for v in pl["r2_vs_ours"])
                  + "   L0 " + " ".join(f"{v:5.1f}" for v in pl["l0_circuit_tracer"])
                  + "   (CLT L0 " + " ".join(f"{v:5.1f}" for v in pl["l0_ours"]) + ")")
        print(f"  warning: {s.get('warning', '-')}")
        sse[method], ref = _cls_sse(a.run, f"{tmp}/{method}", cls_x)
    rng = np.random.default_rng(0)
    n = ref.shape[0]
    diff = _r2(sse["error"], ref) - _r2(sse["frequency"], ref)
    boots = []
    for _ in range(a.boot):
        i = rng.integers(0, n, n)
        boots.append(_r2(sse["error"][i], ref[i]) - _r2(sse["frequency"][i], ref[i]))
    lo, hi = np.percentile(np.stack(boots), [2.5, 97.5], axis=0)
    print(f"\nCLS R² vs CLT, error − frequency, paired over {n} held-out CLS rows (95 % bootstrap):")
    for layer, (d, low, high) in enumerate(zip(diff, lo, hi)):
        print(f"  layer {layer}: {d:+.3f} [{low:+.3f}, {high:+.3f}]")


if __name__ == "__main__":
    main()
