"""Sparse-gather vs dense decode of TopK codes: forward + backward time at ViT-B sizes.

    python benchmarks/bench_decode.py --batch 128 --repeats 3 [--device cuda] [--write]

Two measurements, each sparse and dense side by side on the same weights and codes:

* decode: (indices, values) -> reconstruction -> backward to values and every W_dec[s]; this is the part the
  sparse path changes (dense does F/k times the multiply-adds).
* step:   the whole model forward (encoder, ReLU-TopK, decode) + backward, i.e. what a training step pays.

Both paths must write a dense W_dec gradient (AdamW needs one), so the sparse path's floor is allocating and
zeroing that gradient; the script times this floor too. Gradients are reset to None between repeats, as ``optimizer.zero_grad(set_to_none=True)`` does, so neither path
pays for accumulating into an existing ``.grad``. ``--write`` appends the markdown rows to
benchmarks/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clt_pipe.clt import sparsifiers as sp  # noqa: E402
from clt_pipe.clt.model import CrossLayerTranscoder  # noqa: E402
from clt_pipe.clt.spec import CLTSpec  # noqa: E402

BENCH_FILE = Path(__file__).resolve().parent / "BENCHMARKS.md"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], repeats: int, device: torch.device) -> float:
    """Median wall seconds of ``fn`` after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--features", type=int, default=6144)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-step", action="store_true", help="only time the decode")
    ap.add_argument("--write", action="store_true", help=f"append the result rows to {BENCH_FILE.name}")
    args = ap.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    spec = CLTSpec(args.layers, args.d_model, args.features, "relu_topk", args.k)
    with device:
        model = CrossLayerTranscoder(spec)
    n_layers, n_feat, b = args.layers, args.features, args.batch

    # Random distinct indices per (token, layer) and positive values, like ReLU-TopK codes.
    idx = torch.rand(b, n_layers, n_feat, device=device).topk(args.k, dim=-1).indices
    val = (torch.rand(b, n_layers, args.k, device=device) + 0.1).requires_grad_(True)
    grad_out = torch.randn(b, n_layers, args.d_model, device=device)
    x = torch.randn(b, n_layers, args.d_model, device=device)

    def reset() -> None:
        model.zero_grad(set_to_none=True)
        val.grad = None

    def decode_sparse() -> None:
        reset()
        model._decode_std(None, idx, val, sparse=True).backward(grad_out)

    def decode_dense() -> None:
        reset()
        z = sp.dense_from_topk(idx, val, n_feat)
        model._decode_std(z, None, None, sparse=False).backward(grad_out)

    def grad_floor() -> None:
        # What any path pays to materialise dense W_dec gradients for AdamW: one fresh, zeroed 4·F·L(L+1)/2·d bytes.
        reset()
        for w in model.W_dec:
            w.grad = torch.zeros_like(w)

    def step(mode: str) -> Callable[[], None]:
        def run() -> None:
            reset()
            model(x, decode=mode).recon_std.backward(grad_out)

        return run

    rows = []
    stamp = dt.datetime.now().strftime("%Y-%m-%d")
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    shape = f"L={n_layers} d={args.d_model} F={n_feat} k={args.k} B={b}"
    sparse_t = timed(decode_sparse, args.repeats, device)
    dense_t = timed(decode_dense, args.repeats, device)
    rows.append(("decode fwd+bwd", sparse_t, dense_t))
    floor_t = timed(grad_floor, args.repeats, device)
    if not args.skip_step:
        rows.append(("full step fwd+bwd", timed(step("sparse"), args.repeats, device), timed(step("dense"), args.repeats, device)))

    print("| date | device | sizes | what | sparse (ms) | dense (ms) | dense/sparse |")
    print("|---|---|---|---|---|---|---|")
    lines = []
    for what, s_t, d_t in rows:
        line = f"| {stamp} | {where} | {shape} | {what} | {s_t * 1e3:.1f} | {d_t * 1e3:.1f} | {d_t / s_t:.1f}x |"
        lines.append(line)
        print(line)
    note = (
        f"(floor shared by both paths: allocating zeroed W_dec gradients, "
        f"{sum(w.numel() for w in model.W_dec) * 4 / 2**30:.2f} GiB, took {floor_t * 1e3:.1f} ms)"
    )
    print(note)
    lines.append(f"\n{note}")
    if args.write:
        new = not BENCH_FILE.exists()
        with BENCH_FILE.open("a") as fh:
            if new:
                fh.write("# Benchmarks\n\n")
            fh.write("\n## Sparse vs dense CLT decode (benchmarks/bench_decode.py)\n\n")
            fh.write("| date | device | sizes | what | sparse (ms) | dense (ms) | dense/sparse |\n|---|---|---|---|---|---|---|\n")
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
