"""A store on an S3 server against the same store on the local disk: harvest wall time and fit steps/s.

Both sides run what the CLI ships (``pipeline.stage_config``, the CLI's code path, from the defaults), with only
the model, the images, the store, the device and, for fit, the number of steps set. The S3 server is Ceph radosgw
on loopback (``.ci/radosgw/start.sh``; key ``clttest``) unless ``--endpoint`` names another. Repeats interleave
local and S3 runs; medians are compared. Goals (issue 21): harvest S3/local <= 1.2, fit S3/local >= 0.9 steps/s.
Each S3 run's HTTP requests are counted too (clt_pipe/testing/s3requests.py), next to the objects it wrote.

    .ci/radosgw/start.sh
    python benchmarks/bench_s3.py [--images 2000 --steps 300 --repeats 3] [--write]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import append_result  # noqa: E402
from bench_harvest import make_images  # noqa: E402
from clt_pipe.config import FitConfig, HarvestConfig  # noqa: E402
from clt_pipe.fit.trainer import run_fit  # noqa: E402
from clt_pipe.harvest.run import run_harvest  # noqa: E402
from clt_pipe.pipeline import stage_config  # noqa: E402
from clt_pipe.testing.s3requests import count_s3_requests  # noqa: E402


def s3_environment(endpoint: str, key: str, secret: str):
    import s3fs

    os.environ.update({"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": endpoint})
    s3fs.S3FileSystem.clear_instance_cache()
    return s3fs.S3FileSystem()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "clt_pipe" / "demo" / "assets" / "tiny-clip.json"))
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--endpoint", default=os.environ.get("CLT_PIPE_TEST_S3_ENDPOINT", "http://127.0.0.1:7480"))
    ap.add_argument("--key", default=os.environ.get("CLT_PIPE_TEST_S3_KEY", "clttest"))
    ap.add_argument("--secret", default=os.environ.get("CLT_PIPE_TEST_S3_SECRET", "clttestsecret"))
    ap.add_argument("--bucket", default="clt-bench-s3")
    ap.add_argument("--dir", default="")
    ap.add_argument("--write", action="store_true", help="append the result to benchmarks/BENCHMARKS.md")
    args = ap.parse_args()

    fs = s3_environment(args.endpoint, args.key, args.secret)
    if not fs.exists(args.bucket):
        fs.mkdir(args.bucket)
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_s3_"))
    data = work / "images"
    if not data.exists():
        make_images(data, args.images, args.image_size)
    stores = {"local": str(work / "store.zarr"), "s3": f"s3://{args.bucket}/bench/store.zarr"}

    def harvest_cfg(where: str) -> HarvestConfig:
        return stage_config(HarvestConfig, "harvest", None, {
            "model": args.model, "pretrained": "none", "dataset": "imagefolder", "data_root": str(data),
            "store": stores[where], "device": args.device, "overwrite": True})

    def fit_cfg(where: str, out: Path) -> FitConfig:
        return stage_config(FitConfig, "fit", None, {"store": stores[where], "out": str(out), "device": args.device,
                                                     "steps": args.steps, "overwrite": True})

    print("harvest config:", harvest_cfg("s3"))
    print("fit config:", fit_cfg("s3", work / "run"))
    harvest_s, fit_sps, requests = {"local": [], "s3": []}, {"local": [], "s3": []}, []
    for r in range(args.repeats):
        for where in ("local", "s3") if r % 2 == 0 else ("s3", "local"):
            with count_s3_requests() as log:
                t0 = time.perf_counter()
                summary = run_harvest(harvest_cfg(where), log=lambda *a: None)
                harvest_s[where].append(time.perf_counter() - t0)
            if where == "s3":
                requests.append((len(log), len(fs.find(stores["s3"]))))
            parts = ", ".join(f"{k.removeprefix('seconds_')} {v:.1f}" for k, v in summary.items()
                              if k.startswith("seconds_"))
            print(f"repeat {r} harvest {where}: {harvest_s[where][-1]:.2f} s ({parts})"
                  + (f", {len(log)} requests for {requests[-1][1]} objects" if where == "s3" else ""), flush=True)
    for r in range(args.repeats):
        for where in ("local", "s3") if r % 2 == 0 else ("s3", "local"):
            out = work / f"run-{where}"
            shutil.rmtree(out, ignore_errors=True)
            with count_s3_requests() as log:
                res = run_fit(fit_cfg(where, out))
            fit_sps[where].append(res["steps_per_s"])
            print(f"repeat {r} fit {where}: {res['steps_per_s']:.2f} steps/s, window {res['window_chunks']} chunks"
                  + (f", {len(log)} requests" if where == "s3" else ""), flush=True)

    med_h = {k: statistics.median(v) for k, v in harvest_s.items()}
    med_f = {k: statistics.median(v) for k, v in fit_sps.items()}
    ratio_h, ratio_f = med_h["s3"] / med_h["local"], med_f["s3"] / med_f["local"]
    req, objs = requests[-1]
    print(f"harvest s3/local {ratio_h:.3f} (goal <= 1.2): local {med_h['local']:.2f} s, s3 {med_h['s3']:.2f} s; "
          f"{req} requests for {objs} objects")
    print(f"fit s3/local {ratio_f:.3f} (goal >= 0.9): local {med_f['local']:.2f}, s3 {med_f['s3']:.2f} steps/s")
    if args.write:
        server = "radosgw" if args.endpoint.endswith(":7480") else args.endpoint
        sizes = f"{Path(args.model).stem}, {args.images} images, CLI defaults, {args.device}, {server} on loopback"
        append_result(f"| bench_s3 harvest | {sizes} | local {med_h['local']:.2f} s, S3 {med_h['s3']:.2f} s; "
                      f"{req} requests / {objs} objects | S3/local **{ratio_h:.3f}** (goal <= 1.2) |")
        append_result(f"| bench_s3 fit | {sizes}, {args.steps} steps | local {med_f['local']:.2f}, S3 "
                      f"{med_f['s3']:.2f} steps/s | S3/local **{ratio_f:.3f}** (goal >= 0.9) |")
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)
    fs.rm(stores["s3"], recursive=True)


if __name__ == "__main__":
    main()
