"""Peak memory of `clt-pipe atlas` (run_atlas) on a store and on one 10× larger: it must not grow with the store.

Each measurement runs in a fresh subprocess (peak RSS is per process): RSS before the atlas (torch, store and
CLT loaded), the process's peak RSS (VmHWM) after it, and the tracemalloc peak of Python/numpy allocations
during it. Stores: synthetic, with the demo's geometry (17 tokens, 6 layers, width 64, chunk_mb 1) and
RandomRows data, ``--images`` and 10× as many; a random CLT with the demo's 512 features per layer, k = 16.
Optionally also ``--demo-workdir`` (a finished `clt-pipe demo`): its real store and CLT.

    python benchmarks/bench_atlas_memory.py --images 1437 [--demo-workdir /tmp/atlas-demo]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, tracemalloc
import torch
torch.set_num_threads(2)
from clt_pipe.analyze.atlas.run import run_atlas
from clt_pipe.config import AtlasConfig, build
from clt_pipe.clt.rundir import load_fitted
from clt_pipe.store.reader import ActivationStore

def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
store, clt, out = sys.argv[1:4]
import clt_pipe.analyze.run, matplotlib.pyplot  # noqa: E401,F401 - warm imports so the baseline holds them
ActivationStore(store); load_fitted(clt)
base = vm("VmRSS")
tracemalloc.start()
t0 = time.perf_counter()
s = run_atlas(build(AtlasConfig, {"store": store, "clt": clt, "out": out, "device": "cpu", "read_threads": 2}))
sec = time.perf_counter() - t0
traced = tracemalloc.get_traced_memory()[1]
print(json.dumps({"rss_before": base, "rss_peak": vm("VmHWM"), "traced_peak": traced, "seconds": sec,
                  "scan_s": s["scan_s"], "features": s["n_features"]}))
"""


def make_synthetic(root: Path, n_images: int) -> dict:
    sys.path.insert(0, str(REPO))
    import torch

    from clt_pipe.clt.model import CrossLayerTranscoder
    from clt_pipe.clt.spec import CLTSpec
    from clt_pipe.clt.rundir import save_fitted
    from clt_pipe.store.reader import ActivationStore
    from clt_pipe.testing.synthstore import RandomRows, write_store

    T, L, d = 17, 6, 64
    url = str(root / f"random-{n_images}.zarr")
    write_store(url, n_images, T, L, d, RandomRows(T, L, d), chunk_mb=1.0, chunks_per_shard=2)
    store = ActivationStore(url)
    torch.manual_seed(0)
    run = root / f"clt-{n_images}"
    save_fitted(run, CrossLayerTranscoder(CLTSpec(L, d, 512, "relu_topk", 16)),
                {"store": {"url": url, "fingerprint": store.meta.fingerprint, "model": store.model,
                           "n_layers": L, "d_model": d}})
    return {"store": url, "clt": str(run), "n_images": n_images}


def measure(case: dict, out: Path) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, case["store"], case["clt"], str(out)], cwd=REPO,
                         capture_output=True, text=True, check=True)
    return {**case, **json.loads(res.stdout.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1437)
    ap.add_argument("--demo-workdir", default="")
    args = ap.parse_args()
    mib = 2 ** 20
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cases = []
        if args.demo_workdir:
            w = Path(args.demo_workdir)
            cases.append({"store": str(w / "digits-train.zarr"), "clt": str(w / "clt"), "n_images": "demo"})
        cases += [make_synthetic(root, args.images), make_synthetic(root, 10 * args.images)]
        print("config: run_atlas defaults (top_per_layer 8, top_images 8, thumb_px 96), cpu, 2 threads; "
              "synthetic stores 17 tokens × 6 layers × 64, CLT 512 features/layer relu_topk k=16")
        print(f"{'store':>40} {'images':>7} {'rss before':>11} {'rss peak':>9} {'growth':>7} {'traced':>8} {'s':>6}")
        for i, c in enumerate(cases):
            r = measure(c, root / f"out{i}")
            print(f"{Path(r['store']).name:>40} {r['n_images']!s:>7} {r['rss_before'] / mib:10.1f}M "
                  f"{r['rss_peak'] / mib:8.1f}M {(r['rss_peak'] - r['rss_before']) / mib:6.1f}M "
                  f"{r['traced_peak'] / mib:7.2f}M {r['seconds']:6.2f}")


if __name__ == "__main__":
    main()
