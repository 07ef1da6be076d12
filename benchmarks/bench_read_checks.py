"""Cost of checking every chunk on read: ChunkLoader rows/s with read checks (the default) / without.

    python benchmarks/bench_read_checks.py [--images 1400] [--repeats 5] [--write]

One synthetic store (clt_pipe/testing/synthstore.py: Gaussian fp16 rows, the default blosc-lz4-bitshuffle codec;
defaults 1400 images x 50 tokens, L 6, d 128, ~215 MB of mlp_in + mlp_out in 4 MB chunks) is written to --dir
once. One loader epoch (the fit defaults: seeded windows of --shuffle-chunks chunks decoded by --read-threads
threads, gathers of B rows, fp16 -> float32) is timed on a store opened with ``check_reads=True`` (every chunk's
decoded bytes crc32c'd against its commit record, on the read threads) and on one opened with
``check_reads=False``, interleaved (A, B, A, B, ...) from a warm page cache; medians and the median of paired
ratios are printed (the order of each pair alternates). Goal: checked / unchecked >= 0.95. The machine is shared: only the ratio means anything.
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

from bench_common import append_result  # noqa: E402
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


def loader_epoch(store: ActivationStore, args, seed: int) -> float:
    loader = ChunkLoader(store, args.batch, seed=seed, shuffle_chunks=args.shuffle_chunks,
                         read_threads=args.read_threads)
    n, t0 = 0, time.perf_counter()
    it = iter(loader)
    while True:
        next(it)
        if loader.state_dict()["epoch"] > 0:
            break
        n += 1
    dt = time.perf_counter() - t0
    loader.close()
    return n * args.batch / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/clt_bench_read_checks")
    ap.add_argument("--images", type=int, default=1400)
    ap.add_argument("--tokens", type=int, default=50)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--chunk-mb", type=float, default=4.0)
    ap.add_argument("--compressor", default="blosc-lz4-bitshuffle")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--shuffle-chunks", type=int, default=8)
    ap.add_argument("--read-threads", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch intra-op threads")
    ap.add_argument("--write", action="store_true", help="append the result to benchmarks/BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    url = build_store(args)
    checked, unchecked = ActivationStore(url), ActivationStore(url, check_reads=False)
    lay = checked.layout
    sizes = (f"{lay.n_tokens} rows L={lay.n_layers} d={lay.d_model}, {checked.meta['activations']['compressor']}, "
             f"{lay.n_chunks} chunks of {lay.rows_per_chunk} rows, B={args.batch}, window {args.shuffle_chunks} "
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
    loader_epoch(checked, args, seed=99)  # warm the page cache
    a, b = [], []
    for r in range(args.repeats):
        if r % 2:  # alternate which goes first, so drift in the machine's load does not favour one side
            b.append(loader_epoch(unchecked, args, seed=r))
            a.append(loader_epoch(checked, args, seed=r))
        else:
            a.append(loader_epoch(checked, args, seed=r))
            b.append(loader_epoch(unchecked, args, seed=r))
        print(f"  repeat {r}: checked {a[-1]:,.0f} rows/s   unchecked {b[-1]:,.0f} rows/s")
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"checksum share of a checked epoch: {epoch_bytes / crc_rate / (lay.n_tokens / ma):.2%} "
          f"(crc time / median epoch time: the cost without the machine's noise)")
    paired = statistics.median(x / y for x, y in zip(a, b))
    verdict = "met" if ma / mb >= 0.95 else "MISSED"
    line = (f"| loader rows/s, read checks on / off (bench_read_checks.py) | {sizes} | {ma:,.0f} / {mb:,.0f} | "
            f"{ma / mb:.3f} ({verdict}, goal >= 0.95; median of paired ratios {paired:.3f}) |")
    print(line)
    if args.write:
        append_result(line)


if __name__ == "__main__":
    main()
