"""Cost of checking every chunk on read: ChunkLoader rows/s with read checks (the default) / without.

    python benchmarks/bench_read_checks.py [--images 1400] [--repeats 5] [--write]

One synthetic store (clt_pipe/testing/synthstore.py: Gaussian fp16 rows, the default blosc-lz4-bitshuffle codec;
defaults 1400 images x 50 tokens, L 6, d 128, ~215 MB of mlp_in + mlp_out in 4 MB chunks) is written to --dir
once. One loader epoch (the fit defaults: seeded windows of --shuffle-chunks chunks decoded by --read-threads
threads, gathers of B rows, fp16 -> float32) is timed on a store opened with ``check_reads=True`` (every chunk's
decoded bytes crc32c'd against its commit record, on the read threads) and on one opened with
``check_reads=False``, interleaved (A, B, A, B, ...) from a warm page cache; medians and the median of paired
ratios are printed (the order of each pair alternates). Goal: checked / unchecked >= 0.95, judged on the median
of paired ratios. Then the part the checks change, alone: one window's decode (``read_chunks_into``) checked vs
unchecked, 4 x --repeats interleaved pairs. The machine is shared: only the ratio means anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import add_store_args, append_result, loader_epoch  # noqa: E402
from clt_pipe.checksums import crc32c  # noqa: E402
from clt_pipe.store.loader import ChunkLoader  # noqa: E402
from clt_pipe.store.reader import ActivationStore  # noqa: E402
from clt_pipe.testing.synthstore import RandomRows, write_store  # noqa: E402


def build_store(args) -> str:
    d = Path(args.dir)
    url = str(d / "store.zarr")
    key = dict(images=args.images, tokens=args.tokens, layers=args.layers, d=args.d_model, chunk_mb=args.chunk_mb,
               compressor=args.compressor)
    stamp = d / "settings.json"
    if not (stamp.exists() and json.loads(stamp.read_text()) == key):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        write_store(url, args.images, args.tokens, args.layers, args.d_model,
                    RandomRows(args.tokens, args.layers, args.d_model, seed=0), compressor=args.compressor,
                    chunk_mb=args.chunk_mb, chunks_per_shard=4, batch_images=256)
        stamp.write_text(json.dumps(key))
    return url


def window_reads(checked: ActivationStore, unchecked: ActivationStore, args) -> tuple[float, float, float]:
    """The part the checks change, alone: decode one loader window of whole chunks into buffers (one
    ``read_chunks_into`` call, as the loader does), checked vs unchecked, 4 x --repeats interleaved pairs.
    Returns the median rows/s of each and the median of paired ratios."""
    import numpy as np

    lay = checked.layout
    chunks = list(range(min(args.window_chunks, lay.n_chunks)))
    rows = sum(len(lay.chunk_rows(c)) for c in chunks)
    shape = (rows, lay.n_layers, lay.d_model)
    x, y = np.empty(shape, np.float16), np.empty(shape, np.float16)

    def once(store) -> float:
        pieces, at = [], 0
        for c in chunks:
            n = len(lay.chunk_rows(c))
            pieces.append((c, x[at:at + n], y[at:at + n]))
            at += n
        t0 = time.perf_counter()
        store.read_chunks_into(pieces)
        return rows / (time.perf_counter() - t0)

    once(checked)
    a, b = [], []
    for r in range(4 * args.repeats):
        if r % 2:
            b.append(once(unchecked))
            a.append(once(checked))
        else:
            a.append(once(checked))
            b.append(once(unchecked))
    return statistics.median(a), statistics.median(b), statistics.median(p / q for p, q in zip(a, b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_store_args(ap, "/tmp/clt_bench_read_checks")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch intra-op threads")
    ap.add_argument("--write", action="store_true", help="append the result to benchmarks/BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    url = build_store(args)
    checked, unchecked = ActivationStore(url), ActivationStore(url, check_reads=False)
    lay = checked.layout
    probe = ChunkLoader(checked, args.batch, shuffle_chunks=args.shuffle_chunks, read_threads=1)
    args.window_chunks = probe.shuffle_chunks  # the loader's own window (auto-sized at the shipped default 0)
    probe.close()
    sizes = (f"{lay.n_tokens} rows L={lay.n_layers} d={lay.d_model}, {checked.meta.activations.compressor}, "
             f"{lay.n_chunks} chunks of {lay.rows_per_chunk} rows, B={args.batch}, window {args.window_chunks} "
             f"chunks, {args.read_threads} read threads, {os.cpu_count()} cores ({platform.machine()}, shared)")
    print(sizes)
    x = checked.read_chunk(0)[0]
    t0 = time.perf_counter()
    for _ in range(20):
        crc32c(x)
    crc_rate = 20 * x.nbytes / (time.perf_counter() - t0)
    epoch_bytes = 2 * lay.n_tokens * lay.n_layers * lay.d_model * 2  # mlp_in + mlp_out, fp16
    print(f"crc32c alone: {crc_rate / 1e9:.2f} GB/s (one thread): {epoch_bytes / crc_rate * 1e3:.1f} ms of "
          f"checksumming per epoch of {epoch_bytes / 1e6:.0f} MB")
    def rows_per_s(store: ActivationStore, seed: int) -> float:
        rows, seconds = loader_epoch(store, args, seed)
        return rows / seconds

    loader_epoch(checked, args, seed=99)  # warm the page cache
    a, b = [], []
    for r in range(args.repeats):
        if r % 2:  # alternate which goes first, so drift in the machine's load does not favour one side
            b.append(rows_per_s(unchecked, r))
            a.append(rows_per_s(checked, r))
        else:
            a.append(rows_per_s(checked, r))
            b.append(rows_per_s(unchecked, r))
        print(f"  repeat {r}: checked {a[-1]:,.0f} rows/s   unchecked {b[-1]:,.0f} rows/s")
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"checksum share of a checked epoch: {epoch_bytes / crc_rate / (lay.n_tokens / ma):.2%} "
          f"(crc time / median epoch time: the cost without the machine's noise)")
    paired = statistics.median(x / y for x, y in zip(a, b))
    # The verdict uses the median of paired ratios: each pair ran back to back, so the shared machine's load
    # swings (2x between epochs here) cancel within a pair but not between two medians.
    verdict = "met" if paired >= 0.95 else "MISSED"
    line = (f"| loader rows/s, read checks on / off (bench_read_checks.py) | {sizes} | {ma:,.0f} / {mb:,.0f} | "
            f"median of paired ratios {paired:.3f} ({verdict}, goal >= 0.95; ratio of medians {ma / mb:.3f}; "
            f"{args.repeats} epochs each) |")
    wa, wb, wp = window_reads(checked, unchecked, args)
    wline = (f"| window decode rows/s (read_chunks_into, {args.window_chunks} chunks), read checks on / off "
             f"(bench_read_checks.py) | {sizes} | {wa:,.0f} / {wb:,.0f} | median of paired ratios {wp:.3f} "
             f"({'met' if wp >= 0.95 else 'MISSED'}, goal >= 0.95; ratio of medians {wa / wb:.3f}; "
             f"{4 * args.repeats} pairs) |")
    print(line)
    print(wline)
    if args.write:
        append_result(line)
        append_result(wline)


if __name__ == "__main__":
    main()
