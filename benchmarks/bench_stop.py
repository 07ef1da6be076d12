"""Graceful stop: seconds from SIGTERM to the exit of a real `clt-pipe harvest` / `clt-pipe fit` process
(issue 24; docker stop's default grace is 10 s), and the stop checkpoint's write time at ViT-B x8 sizes.

harvest: a ViT (random init) over an ImageFolder of random JPEGs, CLI defaults except --batch-size. The signal is
sent at a random moment of a forward pass (after a commit plus a random delay up to one forward's time); the
harvest finishes the forward in flight, commits the shards it completed and exits 143. The same command then
resumes, and the next trial signals it again.

fit: a synthetic store of ViT-B/32 shapes (12 layers, d 768, 50 tokens), `clt-pipe fit` at CLI defaults (AuxK
on) but --expansion (--fit-expansion, default 2: at 8 the process holds ~10 GB) signalled after its second logged
step; it finishes the step, writes its checkpoint and exits. Then save_checkpoint alone is timed in this process
on weights + AdamW state of a CLT at --expansion (default 8: ~5 GB, ~7 GB of memory while it is written).

    python benchmarks/bench_stop.py --part harvest --model ViT-B-32 --images 768 --batch 64,256 --trials 3
    python benchmarks/bench_stop.py --part fit --expansion 8 --fit-expansion 2
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

ENV = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")


def start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "clt_pipe", *args], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"))


def stop(proc: subprocess.Popen, sig: int, log: Path, timeout: float = 600) -> tuple[float, int, str]:
    """(seconds from the signal to the exit, exit status, the `stopped:` line)."""
    t0 = time.monotonic()
    proc.send_signal(sig)
    proc.wait(timeout)
    seconds = time.monotonic() - t0
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("stopped:")]
    return seconds, proc.returncode, lines[-1] if lines else "(no stopped: line)"


def wait_until(proc: subprocess.Popen, cond, timeout: float = 1800) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if cond():
            return True
        time.sleep(0.01)
    return False


def n_commits(store: Path) -> int:
    return len(list((store / "commits").glob("shard-*.json")))


def bench_harvest(args, tmp: Path) -> list[str]:
    from bench_harvest import make_images

    make_images(tmp / "data", args.images, 256)
    out = []
    for batch in (int(b) for b in args.batch.split(",")):
        store = tmp / f"b{batch}.zarr"
        cmd = ["harvest", "--model", args.model, "--pretrained", "none", "--dataset", "imagefolder",
               "--data-root", str(tmp / "data"), "--store", str(store), "--batch-size", str(batch),
               "--device", args.device]
        stops, forward = [], None
        for trial in range(args.trials):
            log = tmp / f"harvest-{batch}-{trial}.log"
            proc = start(cmd, log)
            n0 = n_commits(store)
            if not wait_until(proc, lambda: n_commits(store) > n0):  # noqa: B023 - used before the loop moves on
                print(f"batch {batch}: harvest ended before a commit (rc {proc.poll()}); use more --images")
                break
            t_commit = time.monotonic()
            if forward is None:  # one forward's time: the next commit of this run (a batch completes a shard)
                n1 = n_commits(store)
                wait_until(proc, lambda: n_commits(store) > n1)  # noqa: B023
                forward = time.monotonic() - t_commit
                t_commit = time.monotonic()
            delay = random.uniform(0, forward)
            time.sleep(max(0.0, delay - (time.monotonic() - t_commit)))
            if proc.poll() is not None:
                print(f"batch {batch}: harvest finished before the signal; use more --images")
                break
            seconds, rc, line = stop(proc, signal.SIGTERM, log)
            stops.append(seconds)
            print(f"  batch {batch} trial {trial}: SIGTERM {delay:.1f} s after a commit -> exit {rc} in "
                  f"{seconds:.2f} s: {line}")
        if stops:
            where = "CPU" if args.device == "cpu" else args.device
            out.append(f"| harvest SIGTERM -> exit | {args.model} (random init), {where} ({os.cpu_count()} cores), "
                       f"all tokens, --batch-size {batch}, {len(stops)} signals at random moments of a forward "
                       f"(~{forward:.1f} s between commits) | median {statistics.median(stops):.2f} s, max "
                       f"{max(stops):.2f} s | docker's grace 10 s |")
        shutil.rmtree(store, ignore_errors=True)
    return out


def bench_fit(args, tmp: Path) -> list[str]:
    import torch

    from clt_pipe.fit import checkpoint as ckpt
    from clt_pipe.testing.synthstore import RandomRows, write_store

    L, d, T = 12, 768, 50  # ViT-B/32: 12 layers, width 768, 1 CLS + 49 patches
    store = str(tmp / "vitb.zarr")
    write_store(store, args.fit_images, T, L, d, RandomRows(T, L, d, seed=0), chunk_mb=16)
    out = tmp / "run"
    log = tmp / "fit.log"
    proc = start(["fit", "--store", store, "--out", str(out), "--expansion", str(args.fit_expansion), "--steps",
                  "100000", "--log-every", "1", "--device", "cpu"], log)
    metrics = out / "metrics.jsonl"
    lines = []
    if wait_until(proc, lambda: metrics.is_file() and metrics.stat().st_size > 0):
        t_first = time.monotonic()
        wait_until(proc, lambda: len(metrics.read_text().splitlines()) >= 2)
        step_s = time.monotonic() - t_first
        seconds, rc, line = stop(proc, signal.SIGTERM, log)
        size = sum(f.stat().st_size for f in (out / "checkpoints").rglob("*") if f.is_file())
        print(f"  fit x{args.fit_expansion}: one step ~{step_s:.1f} s; SIGTERM -> exit {rc} in {seconds:.2f} s, "
              f"checkpoint {size / 1e9:.2f} GB: {line}")
        lines.append(f"| fit SIGTERM -> exit | synthetic ViT-B/32 store (12 x 768, 50 tokens), expansion "
                     f"{args.fit_expansion}, CLI defaults, CPU | {seconds:.2f} s (step ~{step_s:.1f} s + checkpoint of "
                     f"{size / 1e9:.2f} GB) | docker's grace 10 s |")
    else:
        print(f"fit ended before its first step: {log.read_text()[-2000:]}")
        proc.kill()
    shutil.rmtree(out, ignore_errors=True)

    # The stop checkpoint alone: weights + AdamW moments (+ step) of a CLT of these sizes.
    from clt_pipe.clt.model import CrossLayerTranscoder
    from clt_pipe.config import FitConfig

    expansion = args.expansion
    while expansion > 1 and 4.5 * 4 * n_parameters(FitConfig(expansion=expansion).spec(L, d)) > mem_available():
        expansion //= 2  # weights + 2 AdamW moments + safetensors' copy while writing: a shared machine's memory
    spec = FitConfig(store=store, out=str(out), expansion=expansion).spec(L, d)
    model = CrossLayerTranscoder(spec)
    state = {"step": 1, "optimizer": {"state": {i: {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p),
                                                    "exp_avg_sq": torch.zeros_like(p)}
                                                for i, p in enumerate(model.parameters())}, "param_groups": []}}
    n_params = sum(p.numel() for p in model.parameters())
    times = []
    for i in range(args.ckpt_repeats):
        t0 = time.perf_counter()
        path = ckpt.save_checkpoint(out, i + 1, model.state_dict(), state, {"config": {}, "spec": {}})
        times.append(time.perf_counter() - t0)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    gbps = size / statistics.median(times) / 1e9
    print(f"  save_checkpoint: {n_params / 1e6:.0f} M parameters, {size / 1e9:.2f} GB, runs "
          f"{['%.2f' % t for t in times]} s")
    at = (f"x{expansion}" if expansion == args.expansion else
          f"x{expansion} (x{args.expansion} did not fit in this machine's free memory; x{args.expansion} holds "
          f"{size * n_parameters(FitConfig(expansion=args.expansion).spec(L, d)) / n_params / 1e9:.2f} GB: "
          f"~{size * n_parameters(FitConfig(expansion=args.expansion).spec(L, d)) / n_params / 1e9 / gbps:.1f} s "
          f"at this rate)")
    lines.append(f"| fit stop checkpoint (save_checkpoint) | CLT {at} on ViT-B (12 x 768): {n_params / 1e6:.0f} M "
                 f"parameters, weights + AdamW = {size / 1e9:.2f} GB, local disk, CPU | median "
                 f"{statistics.median(times):.2f} s ({gbps:.2f} GB/s incl. sha256) | in 10 s: ~{gbps * 10:.1f} GB |")
    return lines


def n_parameters(spec) -> int:
    from clt_pipe.clt.model import CrossLayerTranscoder

    with __import__("torch").device("meta"):
        return sum(p.numel() for p in CrossLayerTranscoder(spec).parameters())


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="harvest,fit")
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--images", type=int, default=768)
    ap.add_argument("--batch", default="64,256", help="comma-separated --batch-size values")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="harvest device (the fit part runs on CPU)")
    ap.add_argument("--expansion", type=int, default=8, help="of the CLT whose checkpoint write is timed")
    ap.add_argument("--fit-expansion", type=int, default=2, help="of the signalled fit (it holds weights, grads "
                    "and AdamW state: ~10 GB at 8)")
    ap.add_argument("--fit-images", type=int, default=64, help="images of the synthetic fit store")
    ap.add_argument("--ckpt-repeats", type=int, default=2)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--write", action="store_true", help="append the results to benchmarks/BENCHMARKS.md")
    args = ap.parse_args()
    random.seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-stop-", dir=args.dir))
    lines = []
    try:
        if "harvest" in args.part:
            lines += bench_harvest(args, tmp)
        if "fit" in args.part:
            lines += bench_fit(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for line in lines:
        print(line)
        if args.write:
            from bench_common import append_result

            append_result(line)


if __name__ == "__main__":
    main()
