"""Store loader throughput vs a contiguous memmap read, and fit speed with the loader vs rows preloaded in RAM.

    python benchmarks/bench_loader.py [--images 1400] [--repeats 5] [--fit-steps 15] [--write]

One synthetic store (clt_pipe/testing/synthstore.py, Gaussian fp16 rows, the default blosc-lz4-bitshuffle codec,
no ViT) of ``images x tokens`` rows of ``L x d`` (defaults: 1400 x 50 rows, L 6, d 128: ~215 MB of mlp_in + mlp_out,
chunks of --chunk-mb) is written to --dir once (reused when it already has these settings).
Everything is read from a warm page cache (the files were just written; nothing drops caches).

1. Loader rows/s. ``ChunkLoader`` (seeded chunk order, windows of --shuffle-chunks chunks decoded by a
   thread pool one window ahead, the window's rows permuted, sorted-index gathers of B rows, fp16 -> float32
   tensors) for one epoch, vs. the **memmap baseline**: the same fp16 rows of mlp_in and mlp_out as raw
   ``.npy`` files, read in order through ``np.memmap`` in blocks of one chunk's rows (copied to RAM),
   concatenated per window of --shuffle-chunks blocks, then cut into *contiguous* batches of B rows that are
   converted to float32 tensors exactly as the loader does. No permutation, no gather, no decode, no
   threads: the bytes-to-batches floor. Ratio = loader / memmap (goal >= 0.9).
2. Fit steps/s, AuxK active (dead_tokens = two batches, as in bench_fit.py). ``Trainer.train_step``
   (relu_topk CLT, expansion --expansion, batch --batch) fed by the store's ``ChunkLoader`` vs. fed from the
   same rows preloaded as fp16 tensors with batches by random index
   (``X[randint]`` -> float32). Both trainers are built once; blocks of --fit-steps steps alternate and the
   medians are compared. Ratio = loader / preloaded (goal >= 0.95).

Repeats are interleaved (A, B, A, B, ...) and medians reported, because the machine is shared.
``--write`` appends the result rows to benchmarks/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import add_store_args, loader_epoch, sync  # noqa: E402
from clt_pipe.config import FitConfig, build  # noqa: E402
from clt_pipe.fit.trainer import Trainer  # noqa: E402
from clt_pipe.store import format as F  # noqa: E402
from clt_pipe.store.loader import Batch, ChunkLoader, split_chunks  # noqa: E402
from clt_pipe.store.reader import ActivationStore  # noqa: E402
from clt_pipe.testing.synthstore import RandomRows, write_store  # noqa: E402

BENCH_FILE = Path(__file__).resolve().parent / "BENCHMARKS.md"


def build_store(args) -> tuple[str, Path, Path]:
    d = Path(args.dir)
    url = str(d / "store.zarr")
    key = dict(images=args.images, tokens=args.tokens, layers=args.layers, d=args.d_model, chunk_mb=args.chunk_mb,
               compressor=args.compressor)
    stamp = d / "settings.json"
    npy = (d / "mlp_in.npy", d / "mlp_out.npy")
    if not (stamp.exists() and json.loads(stamp.read_text()) == key and all(p.exists() for p in npy)):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        t0 = time.perf_counter()
        write_store(url, args.images, args.tokens, args.layers, args.d_model,
                    RandomRows(args.tokens, args.layers, args.d_model, seed=0), compressor=args.compressor,
                    chunk_mb=args.chunk_mb, chunks_per_shard=4, batch_images=256)
        store = ActivationStore(url)
        for name, path in zip(F.ACTIVATION_ARRAYS, npy):
            arr = store.array(name)
            mm = np.lib.format.open_memmap(path, mode="w+", dtype=arr.dtype, shape=arr.shape)
            for c in range(store.layout.n_chunks):
                r = store.layout.chunk_rows(c)
                mm[r.start:r.stop] = arr[r.start:r.stop]
            mm.flush()
            del mm
        stamp.write_text(json.dumps(key))
        print(f"wrote {url} and the .npy copies in {time.perf_counter() - t0:.1f}s")
    return url, npy[0], npy[1]


def device_epoch(store: ActivationStore, args) -> None:
    """Loader alone feeding the fit device (no training): rows/s delivered there, and where the consumer waited."""
    loader = ChunkLoader(store, args.batch, seed=7, shuffle_chunks=args.shuffle_chunks,
                         read_threads=args.read_threads, device=args.device)
    it = iter(loader)
    next(it)
    n, t0 = 0, time.perf_counter()
    while loader.state_dict()["epoch"] == 0:
        next(it)
        n += 1
    sync(args.device)
    dt_ = time.perf_counter() - t0
    loader.close()
    print(f"  loader -> {args.device} alone: {n * args.batch / dt_:,.0f} rows/s; waited on window reads "
          f"{loader.waits['read_s'] / dt_:.0%}, on batch gathers {loader.waits['gather_s'] / dt_:.0%} of the time")


def memmap_epoch(store: ActivationStore, npy_in: Path, npy_out: Path, args) -> tuple[int, float]:
    lay, B = store.layout, args.batch
    t0 = time.perf_counter()
    mm_in, mm_out = np.load(npy_in, mmap_mode="r"), np.load(npy_out, mmap_mode="r")
    rows = 0
    chunks = list(range(lay.n_chunks))
    win = args.window_chunks  # the loader's resolved window size
    for w in range(0, len(chunks), win):
        xs, ys = [], []
        for c in chunks[w:w + win]:
            r = lay.chunk_rows(c)
            xs.append(np.array(mm_in[r.start:r.stop]))
            ys.append(np.array(mm_out[r.start:r.stop]))
        x, y = np.concatenate(xs), np.concatenate(ys)
        for b in range(len(x) // B):
            xb = torch.from_numpy(x[b * B:(b + 1) * B]).float()
            yb = torch.from_numpy(y[b * B:(b + 1) * B]).float()
            rows += len(xb)
            del xb, yb
    del mm_in, mm_out
    return rows, time.perf_counter() - t0


def fit_trainers(url: str, args):
    cfg = build(FitConfig, dict(store=url, out="/nonexistent", k=args.k, expansion=args.expansion,
                                batch_size=args.batch, steps=10**9, warmup_steps=10, shuffle_chunks=args.shuffle_chunks,
                                read_threads=args.read_threads, device=args.device, seed=0,
                                dead_tokens=2 * args.batch))  # AuxK active in the timed steps, as shipped
    store = ActivationStore(url)
    device = torch.device(args.device)
    a = Trainer(cfg, store, device)
    b = Trainer(cfg, store, device)
    b.loader.close()
    train, _ = split_chunks(store.layout.n_chunks, 0.0)
    xs, ys = zip(*(store.read_chunk(int(c)) for c in train))
    # On a GPU the baseline is the strongest one: every row already in device memory, no host work at all.
    X, Y = torch.from_numpy(np.concatenate(xs)).to(device), torch.from_numpy(np.concatenate(ys)).to(device)
    tpi = store.layout.tokens_per_image
    gen = torch.Generator().manual_seed(0)

    def ram_batches():
        while True:
            idx = torch.randint(len(X), (args.batch,), generator=gen)
            gidx = idx.to(device)
            yield Batch(X[gidx].float(), Y[gidx].float(), (idx // tpi).numpy())

    return a, iter(a.loader), b, ram_batches(), len(X) * (X.element_size() * X[0].numel()) * 2


def time_steps(trainer: Trainer, batches, n: int, waits: list | None = None) -> float:
    """Wall seconds of n steps; ``waits`` gets the part spent in ``next(batches)`` (waiting for / making data)."""
    sync(trainer.device)
    t0 = time.perf_counter()
    wait = 0.0
    for _ in range(n):
        t1 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t1
        trainer.train_step(batch)
    sync(trainer.device)
    total = time.perf_counter() - t0
    if waits is not None:
        waits.append(wait / total)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_store_args(ap, "/tmp/clt_bench_loader")
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fit-steps", type=int, default=15, help="steps per timed block")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch intra-op threads")
    ap.add_argument("--skip-fit", action="store_true")
    ap.add_argument("--device", default="cpu", help="device of the fit comparison (cpu | cuda)")
    ap.add_argument("--write", action="store_true", help=f"append the result rows to {BENCH_FILE.name}")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    url, npy_in, npy_out = build_store(args)
    store = ActivationStore(url)
    lay = store.layout
    probe = ChunkLoader(store, args.batch, shuffle_chunks=args.shuffle_chunks, read_threads=1)
    args.window_chunks = probe.shuffle_chunks
    probe.close()
    nbytes = 2 * lay.n_tokens * lay.n_layers * lay.d_model * 2
    sizes = (f"{lay.n_tokens} rows L={lay.n_layers} d={lay.d_model} ({nbytes / 2**20:.0f} MiB fp16, "
             f"{store.meta.activations.compressor}), {lay.n_chunks} chunks of {lay.rows_per_chunk} rows, "
             f"B={args.batch}, window {args.window_chunks} chunks, {args.read_threads} read threads")
    print(sizes)

    loader_epoch(store, args, seed=99)  # warm the page cache and imports
    memmap_epoch(store, npy_in, npy_out, args)
    ld, mm = [], []
    for r in range(args.repeats):
        n, t = loader_epoch(store, args, seed=r)
        ld.append(n / t)
        n, t = memmap_epoch(store, npy_in, npy_out, args)
        mm.append(n / t)
        print(f"  repeat {r}: loader {ld[-1]:,.0f} rows/s   memmap {mm[-1]:,.0f} rows/s")
    ld_m, mm_m = statistics.median(ld), statistics.median(mm)
    rows = [("loader rows/s (one epoch)", "ChunkLoader", ld_m, "contiguous memmap + same batching", mm_m, 0.9,
             statistics.median(a / b for a, b in zip(ld, mm)), "")]

    if args.device != "cpu":
        device_epoch(store, args)
    if not args.skip_fit:
        a, a_batches, b, b_batches, _ = fit_trainers(url, args)
        time_steps(a, a_batches, 3)  # warm-up: first window, allocator, AdamW state
        time_steps(b, b_batches, 3)
        fa, fb, wa, wb = [], [], [], []
        for r in range(args.repeats):
            fa.append(args.fit_steps / time_steps(a, a_batches, args.fit_steps, wa))
            fb.append(args.fit_steps / time_steps(b, b_batches, args.fit_steps, wb))
            print(f"  repeat {r}: fit with loader {fa[-1]:.2f} steps/s (data {wa[-1]:.1%} of the time)   "
                  f"preloaded {fb[-1]:.2f} steps/s (data {wb[-1]:.1%})")
        a.loader.close()
        rows.append((f"fit steps/s (relu_topk, F={a.spec.n_features}, k={args.k})", "ChunkLoader",
                     statistics.median(fa), "rows preloaded in RAM, random index", statistics.median(fb), 0.95,
                     statistics.median(a / b for a, b in zip(fa, fb)),
                     f"; main thread waiting for data: loader {statistics.median(wa):.1%}, "
                     f"preloaded {statistics.median(wb):.1%} of step time"))

    stamp = dt.datetime.now().strftime("%Y-%m-%d")
    where = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads"
    if args.device.startswith("cuda"):
        where += f"; fit on {torch.cuda.get_device_name(torch.device(args.device))}"
    header = ("| date | device | what | measured | median | baseline | median | ratio of medians | "
              "median of paired ratios | goal |\n|---|---|---|---|---|---|---|---|---|---|")
    lines, notes = [], []
    for what, name, v, bname, bv, goal, paired, note in rows:
        ok = "met" if v / bv >= goal else "MISSED"
        lines.append(f"| {stamp} | {where} | {what} | {name} | {v:,.1f} | {bname} | {bv:,.1f} | "
                     f"{v / bv:.3f} ({ok}) | {paired:.3f} | >= {goal} |")
        if note:
            notes.append(note.lstrip("; "))
    print(header)
    print("\n".join(lines))
    print(f"(sizes: {sizes}; medians of {args.repeats} interleaved repeats{'; ' if notes else ''}{'; '.join(notes)})")
    if args.write:
        new = not BENCH_FILE.exists()
        with BENCH_FILE.open("a") as fh:
            if new:
                fh.write("# Benchmarks\n\n")
            fh.write("\n## Store loader vs memmap, fit with loader vs preloaded (benchmarks/bench_loader.py)\n\n")
            fh.write(f"Sizes: {sizes}; medians of {args.repeats} interleaved repeats, warm page cache, "
                     f"load average {os.getloadavg()[0]:.1f} at the end (shared machine).\n")
            for note in notes:
                fh.write(f"{note[0].upper()}{note[1:]}.\n")
            fh.write("\n")
            fh.write(header + "\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
