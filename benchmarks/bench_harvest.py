"""Harvest overhead: wall time of a full harvest / a bare forward pass over the same images.

Both sides use the same loaded model, the same images (an ImageFolder of random JPEGs), the same batch
size and the same image pipeline (thread-pool decode + open_clip preprocessing, one batch ahead). "Bare"
runs ``encode_image`` and discards the result; "harvest" adds the hooks, the device->host copies, the
writer thread (compression, crc32c, statistics) and the store's creation and finalisation. Repeats are
interleaved and medians compared.

The disk is measured in the same run on the same file system: a file of the store's size is written in 16 MiB
blocks and fsynced next to the store. Goal (issue 11): harvest <= 1.05 x max(bare forward, bytes written / disk
bandwidth). The per-stage seconds of the median harvest (clt_pipe/store/timing.py) name the bottleneck.

    python benchmarks/bench_harvest.py --model ViT-B-32 --images 64 --batch 32 [--write]
    python benchmarks/bench_harvest.py --model clt_pipe/demo/assets/tiny-clip.json --images 512 --batch 64
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clt_pipe.config import HarvestConfig, build  # noqa: E402
from clt_pipe.harvest.loop import ImagePrefetcher, ShardHarvest, harvest_shards  # noqa: E402
from clt_pipe.harvest.plan import head_weights, open_inputs, plan, store_meta  # noqa: E402
from clt_pipe.backbone.mlp import mlp_weights  # noqa: E402
from clt_pipe.store.writer import StoreWriter  # noqa: E402


def make_images(root: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"class{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i:05d}.jpg", quality=90)


@torch.inference_mode()
def bare_forward(cfg: HarvestConfig, dataset, bb) -> float:
    n = min(len(dataset), cfg.limit or len(dataset))
    shape = (3, *bb.identity.image_hw)
    pre = ImagePrefetcher(dataset, bb.preprocess, cfg.data_workers, skip_bad=False)
    batches = [range(b, min(b + cfg.batch_size, n)) for b in range(0, n, cfg.batch_size)]
    t0 = time.perf_counter()
    pending = pre.submit(batches[0])
    for i, idx in enumerate(batches):
        futs, pending = pending, (pre.submit(batches[i + 1]) if i + 1 < len(batches) else None)
        x, _, _ = pre.collect(futs, idx, shape)
        bb.model.encode_image(x.to(bb.device))
    if bb.device.type == "cuda":
        torch.cuda.synchronize()
    pre.close()
    return time.perf_counter() - t0


def disk_write(path: Path, nbytes: int, block: int = 16 << 20) -> float:
    """Seconds to write ``nbytes`` in ``block``-sized writes and fsync them (the file system's sequential speed)."""
    buf = np.random.default_rng(0).integers(0, 255, block, dtype=np.uint8).tobytes()
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, buf[:min(block, left)])
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds


def store_bytes(store: Path) -> int:
    return sum(f.stat().st_size for f in store.rglob("*") if f.is_file())


def full_harvest(cfg: HarvestConfig, dataset, bb, store: Path, times: dict | None = None,
                 forwards: str = "grid") -> float:
    """``forwards`` "shard": forward batches cut at shard boundaries, as before issue 24 (same store bytes)."""
    if forwards == "shard":
        real = ShardHarvest.forward_batches
        ShardHarvest.forward_batches = ShardHarvest.shard_cut_batches
        try:
            return full_harvest(cfg, dataset, bb, store, times)
        finally:
            ShardHarvest.forward_batches = real
    shutil.rmtree(store, ignore_errors=True)
    hp = plan(cfg, dataset, bb)
    t0 = time.perf_counter()
    writer = StoreWriter.open(str(store), store_meta(cfg, dataset, bb, hp), write_threads=cfg.write_threads)
    t1 = time.perf_counter()
    writer.write_constants(head_weights(bb), {"single": np.zeros((len(dataset.class_names), bb.identity.embed_dim))},
                           mlp_weights(bb.blocks) if cfg.targets == "recompute" else None)
    writer.times.add("setup: create store", t1 - t0)
    writer.times.add("setup: model constants (recompute: MLP weights)", time.perf_counter() - t1)
    harvest_shards(cfg, writer, dataset, bb, list(range(hp.layout.n_shards)))
    with writer.times.stage("finalize"):
        writer.finalize([dataset.record(i) for i in range(hp.layout.n_images)], dataset.split)
    if bb.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if times is not None:
        times[seconds] = writer.times
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", default="all")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data-workers", type=int, default=2, help="image decode threads (both sides)")
    ap.add_argument("--targets", default="stored", choices=("stored", "recompute"))
    ap.add_argument("--compressor", default="",
                    help="comma-separated: harvests with each, interleaved in the same repeats (default: the "
                         "harvest's default)")
    ap.add_argument("--write-threads", type=int, default=0, help="0: the harvest's default")
    ap.add_argument("--forwards", default="grid", help="comma-separated: grid (forward batches of --batch images "
                    "across shards, what ships) | shard (cut at shard boundaries, as before issue 24)")
    ap.add_argument("--dir", default=None, help="where the stores and the disk probe go (default: a temp dir)")
    ap.add_argument("--write", action="store_true", help="append the result to benchmarks/BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-harvest-", dir=args.dir))
    try:
        is_tiny = args.model.endswith(".json")
        make_images(tmp / "data", args.images, 40 if is_tiny else 256)
        base = {"model": args.model, "pretrained": "none", "dataset": "imagefolder", "data_root": str(tmp / "data"),
                "store": str(tmp / "s.zarr"), "batch_size": args.batch, "tokens": args.tokens,
                "device": args.device, "data_workers": args.data_workers, "targets": args.targets,
                "write_threads": args.write_threads}
        cfgs = [build(HarvestConfig, {**base, **({"compressor": c} if c else {})})
                for c in (args.compressor.split(",") if args.compressor else [""])]
        modes = args.forwards.split(",")
        cfgs, fwd = [c for c in cfgs for _ in modes], [m for _ in cfgs for m in modes]
        cfg = cfgs[0]
        dataset, bb = open_inputs(cfg)
        bare_forward(cfg, dataset, bb)  # warm-up (allocator, kernels, page cache)
        nbytes = []
        for c, m in zip(cfgs, fwd):  # warm-up of the writer path; sizes the stores and the disk probe
            full_harvest(c, dataset, bb, tmp / "s.zarr", forwards=m)
            nbytes.append(store_bytes(tmp / "s.zarr"))
        bare, disk = [], []
        full: list[list[float]] = [[] for _ in cfgs]
        times: list[dict] = [{} for _ in cfgs]
        for _ in range(args.repeats):
            bare.append(bare_forward(cfg, dataset, bb))
            for j, (c, m) in enumerate(zip(cfgs, fwd)):
                full[j].append(full_harvest(c, dataset, bb, tmp / "s.zarr", times[j], forwards=m))
            shutil.rmtree(tmp / "s.zarr", ignore_errors=True)
            disk.append(max(nbytes) / disk_write(tmp / "disk-probe.bin", max(nbytes)))
        mb, bw = statistics.median(bare), statistics.median(disk)
        print(f"bare runs {['%.2f' % t for t in bare]} s; disk {['%.2f' % (b / 1e9) for b in disk]} GB/s "
              f"(write + fsync of {max(nbytes) / 1e9:.3f} GB in 16 MiB blocks, next to the store)")
        for c, m, runs, nb, tms in zip(cfgs, fwd, full, nbytes, times):
            mf, md = statistics.median(runs), nb / bw
            setting = (f"{bb.name} (random init), {args.images} images, batch {args.batch}, tokens {args.tokens}, "
                       f"targets {args.targets}, compressor {c.compressor}, {bb.device}, {args.data_workers} image "
                       f"threads, {c.write_threads or 'default'} write threads, forward batches "
                       f"{'across shards' if m == 'grid' else 'cut at shards'}")
            line = (f"| harvest / max(bare forward, disk) | {setting} | bare {mb:.2f} s, disk {md:.2f} s "
                    f"({nb / 1e9:.3f} GB at {bw / 1e9:.2f} GB/s), harvest {mf:.2f} s ({nb / mf / 1e9:.3f} GB/s) "
                    f"| **{mf / max(mb, md):.3f}** (goal <= 1.05; / bare {mf / mb:.3f}) |")
            print(line)
            print(f"  harvest runs {['%.2f' % t for t in runs]} s")
            med = sorted(tms)[len(tms) // 2]
            print(f"  stage seconds of the median harvest ({med:.2f} s wall; threads overlap, so they sum to more):")
            print(tms[med].table(med))
            if args.write:
                from bench_common import append_result

                append_result(line)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
