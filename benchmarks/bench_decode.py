"""Sparse-gather vs dense decode of TopK codes: forward + backward time at ViT-B sizes.

    python benchmarks/bench_decode.py --batch 128 --repeats 3 [--device cuda] [--skip-step] [--write]

Every path is timed as the trainer runs it: dense ``.grad`` buffers that persist across steps and are zeroed in
place (``zero_grad(set_to_none=False)``, included in the time), then forward + backward. Measured on the same
weights and codes, repeats interleaved (sparse, dense, old-sparse, sparse, ...), medians reported:

* decode: (indices, values) -> reconstruction -> backward to the values and every W_dec[s]; the part the sparse
  path changes. ``sparse`` is ``clt_pipe.clt.sparse_decode`` (B·k rows added into ``.grad`` in place), ``dense``
  the codes-times-W_dec GEMM, ``embedding_bag`` the previous sparse path (autograd's dense W_dec gradient).
* step:   the whole model forward (encoder, ReLU-TopK, decode) + backward, sparse vs dense.

``--write`` appends one line per measurement to benchmarks/BENCHMARKS.md (``bench_common.append_result``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import append_result, sync  # noqa: E402
from clt_pipe.clt import sparsifiers as sp  # noqa: E402
from clt_pipe.clt.model import CrossLayerTranscoder  # noqa: E402
from clt_pipe.clt.spec import CLTSpec  # noqa: E402


def interleaved(fns: dict[str, Callable[[], None]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median wall seconds of each fn; one warm-up call each, then ``repeats`` rounds calling each in turn."""
    for fn in fns.values():
        fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--features", type=int, default=6144)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                    help="auto = what the trainer runs: bf16 autocast on CUDA, fp32 on CPU")
    ap.add_argument("--skip-step", action="store_true", help="only time the decode")
    ap.add_argument("--skip-old", action="store_true", help="do not time the previous embedding_bag sparse path")
    ap.add_argument("--write", action="store_true", help="append the result lines to benchmarks/BENCHMARKS.md")
    args = ap.parse_args()

    device = torch.device(args.device)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    torch.manual_seed(0)
    spec = CLTSpec(args.layers, args.d_model, args.features, "relu_topk", args.k)
    with device:
        model = CrossLayerTranscoder(spec)
    model.materialize_grads()  # persistent dense .grad buffers, as a trainer using zero_grad(set_to_none=False)
    n_layers, n_feat, b, d = args.layers, args.features, args.batch, args.d_model

    # Random distinct indices per (token, layer) and positive values, like ReLU-TopK codes.
    idx = torch.rand(b, n_layers, n_feat, device=device).topk(args.k, dim=-1).indices
    val = (torch.rand(b, n_layers, args.k, device=device) + 0.1).requires_grad_(True)
    grad_out = torch.randn(b, n_layers, d, device=device)
    x = torch.randn(b, n_layers, d, device=device)
    val.grad = torch.zeros_like(val)

    def zero() -> None:
        model.zero_grad(set_to_none=False)
        val.grad.zero_()

    def amp():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def decode_sparse() -> None:
        zero()
        with amp():
            out = model._decode_std(None, idx, val, sparse=True)
        out.backward(grad_out.to(out.dtype))

    def decode_dense() -> None:
        zero()
        with amp():
            z = sp.dense_from_topk(idx, val, n_feat)
            out = model._decode_std(z, None, None, sparse=False)
        out.backward(grad_out.to(out.dtype))

    def decode_embedding_bag() -> None:
        # The previous sparse path: autograd through embedding_bag (dense F·(L-s)·d gradient per source).
        zero()
        recon = None
        for s, w in enumerate(model.W_dec):
            part = F.embedding_bag(idx[:, s].contiguous(), w.view(n_feat, -1),
                                   per_sample_weights=val[:, s].contiguous(),
                                   mode="sum").view(b, n_layers - s, d)
            if recon is None:
                recon = part
            else:
                recon[:, s:] += part
        recon.backward(grad_out)

    def step(mode: str) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=False)
            with amp():
                out = model(x, decode=mode).recon_std
            out.backward(grad_out.to(out.dtype))

        return run

    # Same values and gradients from both paths before timing anything.
    decode_sparse()
    g_sparse = [w.grad.clone() for w in model.W_dec] + [val.grad.clone()]
    decode_dense()
    for a, ref in zip(g_sparse, [w.grad for w in model.W_dec] + [val.grad]):
        if precision == "fp32":
            torch.testing.assert_close(a, ref, rtol=1e-3, atol=1e-3)
        else:  # bf16 GEMM inputs vs the sparse path's fp32 gather: compare in norm, single elements can be off
            rel = ((a.float() - ref.float()).norm() / ref.float().norm()).item()
            assert rel < 1e-2, f"sparse and dense gradients differ by {rel:.3g} (relative norm)"
    del g_sparse

    shape = f"L={n_layers} d={d} F={n_feat} k={args.k} B={b}, {device.type} {precision}"
    fns = {"sparse": decode_sparse, "dense": decode_dense, "zero_grad": zero}
    if not args.skip_old:
        fns["embedding_bag"] = decode_embedding_bag
    t = interleaved(fns, args.repeats, device)
    lines = [
        f"| decode fwd+bwd (zero_grad in place) | {shape} | sparse {t['sparse'] * 1e3:.0f} ms, "
        f"dense {t['dense'] * 1e3:.0f} ms"
        + (f", old embedding_bag sparse {t['embedding_bag'] * 1e3:.0f} ms" if "embedding_bag" in t else "")
        + f", of which zero_grad(set_to_none=False) {t['zero_grad'] * 1e3:.0f} ms"
        + f" (median of {args.repeats}) | dense/sparse {t['dense'] / t['sparse']:.1f}x"
        + (f", old/new sparse {t['embedding_bag'] / t['sparse']:.1f}x |" if "embedding_bag" in t else " |")
    ]
    if not args.skip_step:
        ts = interleaved({"sparse": step("sparse"), "dense": step("dense")}, args.repeats, device)
        lines.append(
            f"| CLT step fwd+bwd (zero_grad in place) | {shape} | sparse {ts['sparse'] * 1e3:.0f} ms, "
            f"dense {ts['dense'] * 1e3:.0f} ms (median of {args.repeats}) | "
            f"dense/sparse {ts['dense'] / ts['sparse']:.1f}x |"
        )
    for line in lines:
        print(line)
    if args.write:
        for line in lines:
            append_result(line)


if __name__ == "__main__":
    main()
