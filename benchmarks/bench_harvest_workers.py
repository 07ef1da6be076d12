"""Harvest throughput: one process vs a dask LocalCluster of N workers (on one GPU they share it).

Runs what `clt-pipe harvest` runs (``run_harvest``: load, text classifier, images, finalize) on the same
images, alternating the two settings in each repeat; reports images/s of the images part (forward + write of
every shard; for dask it includes each worker loading its model) and the whole wall time, medians.

    python benchmarks/bench_harvest_workers.py --model clt_pipe/demo/assets/tiny-clip.json --images 512 --workers 2
    python benchmarks/bench_harvest_workers.py --model ViT-B-32 --images 2048 --batch 256 --device cuda --workers 2
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_harvest import make_images  # noqa: E402

from clt_pipe.config import HarvestConfig, build  # noqa: E402
from clt_pipe.harvest.run import run_harvest  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="clt_pipe/demo/assets/tiny-clip.json")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", default="all")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data-workers", type=int, default=2)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-workers-", dir=args.dir))
    try:
        make_images(tmp / "data", args.images, 40 if args.model.endswith(".json") else 256)
        base = {"model": args.model, "pretrained": "none", "dataset": "imagefolder", "data_root": str(tmp / "data"),
                "batch_size": args.batch, "tokens": args.tokens, "device": args.device,
                "data_workers": args.data_workers, "template_sets": ["single"]}
        settings = {"1 process": 0, f"dask, {args.workers} workers": args.workers}
        runs: dict[str, list[dict]] = {k: [] for k in settings}
        for r in range(args.repeats + 1):  # the first round warms caches and is not counted
            for name, workers in settings.items():
                store = tmp / f"s{workers}.zarr"
                shutil.rmtree(store, ignore_errors=True)
                s = run_harvest(build(HarvestConfig, {**base, "store": str(store), "workers": workers}),
                                log=lambda *a, **k: None)
                if r:
                    runs[name].append(s)
        print(f"{args.model} (random init), {args.images} images, batch {args.batch}, tokens {args.tokens}, "
              f"device {args.device}, {args.data_workers} image threads, medians of {args.repeats}")
        ips = {}
        for name, ss in runs.items():
            ips[name] = statistics.median(s["images_per_second"] for s in ss)
            wall = statistics.median(s["seconds"] for s in ss)
            parts = {k: statistics.median(s[f"seconds_{k}"] for s in ss)
                     for k in ("load", "text_classifier", "images", "finalize", "setup")}
            print(f"  {name:<18} images {ips[name]:8.1f} images/s, whole harvest {wall:6.2f} s "
                  f"({', '.join(f'{k} {v:.2f}' for k, v in parts.items())})")
        one, many = ips["1 process"], ips[f"dask, {args.workers} workers"]
        print(f"  dask/1 process images/s: **{many / one:.3f}**")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
