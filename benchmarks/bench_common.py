"""Shared by the benchmark scripts: where results go."""

from __future__ import annotations

import datetime
import platform
from pathlib import Path

import torch

BENCH_FILE = Path(__file__).resolve().parent / "BENCHMARKS.md"
HEADER = """# Benchmarks

Ratios measured side by side in one run (interleaved repeats, medians). Each line names its machine.

| benchmark | setting | measured | ratio |
|---|---|---|---|
"""


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work, so a wall-clock interval covers it (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine() -> str:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()} threads"
    return f"{platform.machine()}, {dev}"


def append_result(line: str) -> None:
    if not BENCH_FILE.exists():
        BENCH_FILE.write_text(HEADER)
    stamp = datetime.date.today().isoformat()
    with BENCH_FILE.open("a") as fh:
        fh.write(line.rstrip() + f" <!-- {stamp}, {machine()} -->\n")


def add_store_args(ap, default_dir: str) -> None:
    """The synthetic store (clt_pipe/testing/synthstore.py) and loader options the loader benchmarks share; the
    loader's defaults are the shipped ones (auto shuffle window, default codec)."""
    ap.add_argument("--dir", default=default_dir)
    ap.add_argument("--images", type=int, default=1400)
    ap.add_argument("--tokens", type=int, default=50)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--chunk-mb", type=float, default=4.0)
    ap.add_argument("--compressor", default="blosc-lz4-bitshuffle")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--shuffle-chunks", type=int, default=0, help="0 = the shipped auto window")
    ap.add_argument("--read-threads", type=int, default=4)


def loader_epoch(store, args, seed: int) -> tuple[int, float]:
    """One epoch of the shipped loader over ``store`` with the benchmark's options: (rows, seconds)."""
    import time

    from clt_pipe.store.loader import ChunkLoader

    loader = ChunkLoader(store, args.batch, seed=seed, shuffle_chunks=args.shuffle_chunks,
                         read_threads=args.read_threads)
    n_batches, t0 = 0, time.perf_counter()
    it = iter(loader)
    while True:
        next(it)
        if loader.state_dict()["epoch"] > 0:
            break
        n_batches += 1
    seconds = time.perf_counter() - t0
    loader.close()
    return n_batches * args.batch, seconds


def drop_page_cache() -> bool:
    """Write dirty pages and drop the kernel's page cache (for cold-read figures); False if not permitted."""
    import os

    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False
