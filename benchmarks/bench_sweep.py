"""A fit sweep as shipped against the sum of its members' steps on preloaded rows: is the read paid once?

    python benchmarks/bench_sweep.py [--layers 12 --d-model 768 --expansion 2 --device cuda] [--write]

The members are the ones `clt-pipe fit --sweep sparsifier=jumprelu,relu_topk,abs_topk` builds
(``fit.sweep.members`` over ``pipeline.stage_config(FitConfig, ...)``, the CLI's code path) from the fit
defaults, with only these overrides: the store, the device, the batch size and expansion if given, and a short
``--dead-tokens`` (two batches) so AuxK works in the timed steps. Each member is stepped by the sweep loop's own
per-member step (``trainer._advance``: the step, the divergence check, the log and checkpoint checks), fed by:

1. **sweep**: one shared ``ChunkLoader`` (default window and memory budget, the device data path) reading the
   synthetic store of bench_fit.py, each batch stepped by every member in turn: what `clt-pipe fit` runs;
2. **member i, preloaded**: member i alone on the store's rows already on the device, random index: no host
   work at all.

The goal reads sweep time per step / Σ_i (member i's preloaded time per step) ≤ 1.05. Interleaved blocks,
medians (and paired medians) of the repeats; the machine may be shared, only the ratio is meant to be read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import add_store_args, append_result, sync  # noqa: E402
from bench_fit import preloaded, shipped_setup  # noqa: E402
from clt_pipe.fit import trainer as T  # noqa: E402
from clt_pipe.fit.distributed import Dist  # noqa: E402
from clt_pipe.fit.sweep import SweepConfig, members  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_store_args(ap, "/tmp/clt_bench_fit")  # bench_fit.py's store (its codec is the default one)
    ap.set_defaults(images=400, layers=4, d_model=64, chunk_mb=16.0, batch=0)  # batch 0: the fit default
    ap.add_argument("--expansion", type=int, default=0, help="0 = the fit default")
    ap.add_argument("--sweep", default="sparsifier=jumprelu,relu_topk,abs_topk", help="KEY=V1,V2,... as --sweep")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=5, help="steps per timed block")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2, help="untimed sweep steps first")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument("--write", action="store_true", help="append the result line to BENCHMARKS.md")
    args = ap.parse_args()
    url, store, device, base = shipped_setup(args, "bench_sweep_", {
        "batch_size": args.batch, "expansion": args.expansion, "shuffle_chunks": args.shuffle_chunks,
        "read_threads": args.read_threads})
    mems = members(base, SweepConfig.from_cli([args.sweep], None))
    print(f"base: {json.dumps(dataclasses.asdict(base), sort_keys=True)}")
    for m in mems:
        print(f"member {m.name}: {m.overrides}")

    dist = Dist()
    loader = T.make_loader(base, store, device, dist)
    loader.prefetch()
    runs = []
    for m in mems:
        spec = m.cfg.spec(store.n_layers, store.d_model)
        runs.append(T._Run(m.name, m.cfg, Path(m.cfg.out), T.Trainer(m.cfg, store, device, dist, spec, loader=loader)))
    sources = {"sweep": iter(loader), "preloaded": preloaded(store, device, base.batch_size)}

    def block(name: str, n: int) -> float:
        """Seconds per step of ``name``: "sweep" (every member on each loader batch) or one member, preloaded."""
        stepped = runs if name == "sweep" else [r for r in runs if r.name == name]
        batches = sources["sweep" if name == "sweep" else "preloaded"]
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            batch = next(batches)
            for run in stepped:
                T._advance(run, batch, dist, None)
        sync(device)
        if any(r.status != "training" for r in runs):
            raise SystemExit(f"a member stopped: {[(r.name, r.note) for r in runs]}")
        return (time.perf_counter() - t0) / n

    block("sweep", args.warmup)
    for run in runs:
        block(run.name, 1)
    times: dict[str, list[float]] = {"sweep": [], **{r.name: [] for r in runs}}
    for rep in range(args.repeats):
        for name in times:
            times[name].append(block(name, args.steps))
        print(f"  repeat {rep}: " + "   ".join(f"{k} {v[-1] * 1e3:.0f} ms/step" for k, v in times.items()))
    loader.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    parts = sum(med[r.name] for r in runs)
    ratio = med["sweep"] / parts
    paired = statistics.median(times["sweep"][i] / sum(times[r.name][i] for r in runs) for i in range(args.repeats))
    spec = runs[0].trainer.spec
    lay = store.layout
    sizes = (f"{len(runs)} members ({', '.join(r.name for r in runs)}), L {lay.n_layers}, d {lay.d_model}, "
             f"F {spec.n_features}, k {base.k}, B {base.batch_size}, aux_k {base.aux_k}, dead_tokens "
             f"{base.dead_tokens}, {lay.n_images} images x {lay.tokens_per_image} tokens, window "
             f"{loader.shuffle_chunks} chunks, kept rows {loader.keep_plan.describe()}, {args.device}, "
             f"{torch.get_num_threads()} torch threads")
    print(f"sizes: {sizes}")
    print("median ms per step: " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in med.items()))
    print(f"sweep / sum of members preloaded: {ratio:.3f} (paired {paired:.3f}); {med['sweep'] * 1e3:.1f} vs "
          f"{parts * 1e3:.1f} ms per step; goal <= 1.05")
    if args.write:
        append_result(f"| bench_sweep | {sizes} | sweep {med['sweep'] * 1e3:.1f} ms/step, members preloaded "
                      f"{' + '.join(f'{med[r.name] * 1e3:.1f}' for r in runs)} ms | sweep / sum "
                      f"{ratio:.3f} (paired {paired:.3f}) |")


if __name__ == "__main__":
    main()
