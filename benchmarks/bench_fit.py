"""What `clt-pipe fit` ships, timed against the same step on rows already on the device.

    python benchmarks/bench_fit.py [--layers 12 --d-model 768 --batch 4096 --device cuda] [--data-only] [--write]

The configuration is the one `clt-pipe fit` builds (``pipeline.stage_config(FitConfig, ...)``, the CLI's
code path) from its defaults, with only these overrides: the store, the device, the batch size if given, and a
short ``--dead-tokens`` (default: two batches) so AuxK is active in the timed steps. One ``Trainer`` (model,
AdamW, dead-latent counters) is timed in interleaved blocks of steps fed by:

1. **product**: the trainer's own ``ChunkLoader`` (default shuffle window and memory budget, the device data
   path, kept rows on by default) reading a synthetic store (clt_pipe/testing/synthstore.py ``CrossLayerData``:
   a sparse cross-layer dictionary of 48 features, so that many CLT latents go quiet and AuxK has dead latents
   to work on; default codec). Its first epoch is drained before timing, so when the store fits the kept-rows
   budget these are the steps of epochs ≥ 2 (the tier is printed: "memory host" on CPU, "memory device" on CUDA);
2. **store**: a loader built the same way but with ``--no-keep-rows``: every epoch decodes the store again
   (what the product does with a store over the budget, and what it did before rows were kept);
3. **preloaded**: the same store's rows already on the device (fp16), batches by random index widened to
   float32 there: no host work at all;
4. **preloaded, --aux-k 0**: the same, with AuxK off (the only other difference), for the AuxK cost.

Before the steps, the data path alone (loaders built as the trainer builds them, no training): rows/s of an
epoch decoded from the store with the page cache dropped (``/proc/sys/vm/drop_caches``, when this process may
write it; else "cached only" is printed), with it warm, of an epoch served from the kept rows and of the
preloaded baseline's own batches, next to the rows/s the preloaded step consumes: the smallest of these names
what bounds a fit, and kept vs preloaded rows/s is the data-path cost the kept epochs add per step.

AuxK's cost grows with the number of dead latents, and after a few steps of a healthy run often none is dead:
every timed step therefore sees ``--dead-frac`` of each layer's latents counting as dead (the trainer's own
counters, set before each step: real dead latents would stay dead, these would revive). ``--dead-frac 0``
leaves the counters as training leaves them.

Both configurations are printed; the script refuses to compare (exit 2) if product and preloaded differ in
anything but the data source. Also printed: the start-up of a real ``run_fit`` (command → first step, with
its parts) on the same store, the loader's window size and the mean distinct images per batch vs uniform.
Medians of interleaved repeats; the machine may be shared, only the ratios are meant to be read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import append_result, drop_page_cache, sync  # noqa: E402
from clt_pipe.clt.losses import LossConfig  # noqa: E402
from clt_pipe.config import FitConfig  # noqa: E402
from clt_pipe.fit.trainer import Trainer, run_fit  # noqa: E402
from clt_pipe.pipeline import stage_config  # noqa: E402
from clt_pipe.store.loader import Batch, ChunkLoader, split_chunks  # noqa: E402
from clt_pipe.store.reader import ActivationStore  # noqa: E402
from clt_pipe.testing.synthstore import CrossLayerData, write_store  # noqa: E402


class Dictionary(CrossLayerData):
    """CrossLayerData's rows through BLAS matmuls (its einsums take minutes at ViT-B sizes)."""

    def __call__(self, first_image: int, n_images: int) -> tuple[np.ndarray, np.ndarray]:
        c = self.codes(first_image, n_images)
        rows = len(c)
        x = np.stack([c[:, i] @ self.E[i] for i in range(self.L)], axis=1)
        x += self.noise * np.random.default_rng([self.seed, first_image, n_images, 7]).standard_normal(
            x.shape, dtype=np.float32)
        y = np.zeros_like(x)
        for i in range(self.L):
            y[:, i:] += (c[:, i] @ self.D[i].reshape(self.n_true, -1)).reshape(rows, self.L - i, self.d)
        return x.astype(np.float32), y


def build_store(args) -> str:
    d = Path(args.dir)
    url = str(d / "store.zarr")
    key = dict(images=args.images, tokens=args.tokens, layers=args.layers, d=args.d_model, chunk_mb=args.chunk_mb)
    stamp = d / "settings.json"
    if not (stamp.exists() and json.loads(stamp.read_text()) == key):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        t0 = time.perf_counter()
        write_store(url, args.images, args.tokens, args.layers, args.d_model,
                    Dictionary(args.tokens, args.layers, args.d_model, seed=0), compressor="blosc-lz4-bitshuffle",
                    chunk_mb=args.chunk_mb, chunks_per_shard=4, batch_images=64)
        stamp.write_text(json.dumps(key))
        print(f"wrote {url} in {time.perf_counter() - t0:.1f}s")
    return url


def preloaded(store: ActivationStore, device: torch.device, batch: int):
    train, _ = split_chunks(store.layout.n_chunks, 0.0)
    xs, ys = zip(*(store.read_chunk(int(c)) for c in train))
    X = torch.from_numpy(np.concatenate(xs)).to(device)
    Y = torch.from_numpy(np.concatenate(ys)).to(device)
    tpi = store.layout.tokens_per_image
    gen = torch.Generator().manual_seed(0)
    while True:
        idx = torch.randint(len(X), (batch,), generator=gen)
        gidx = idx.to(device)
        yield Batch(X[gidx].float(), Y[gidx].float(), (idx // tpi).numpy())


def loader_like(cfg: FitConfig, store: ActivationStore, device: torch.device, **kw) -> ChunkLoader:
    """A loader built as the trainer builds its own from ``cfg`` (``kw`` overrides)."""
    opts = dict(tokens=cfg.tokens, split="train", holdout=cfg.holdout, seed=cfg.seed,
                shuffle_chunks=cfg.shuffle_chunks, shuffle_memory=cfg.shuffle_memory, read_threads=cfg.read_threads,
                device=device, keep_rows=cfg.keep_rows, keep_memory=cfg.keep_memory)
    return ChunkLoader(store, cfg.batch_size, **(opts | kw))


def epoch_rates(loader: ChunkLoader, device: torch.device, epochs: int) -> list[tuple[float, str]]:
    """(rows/s, tier) of each of the loader's first ``epochs`` epochs, from ``iter`` on: an epoch's time runs
    from the previous epoch's last batch to its own last batch."""
    it = iter(loader)
    t0 = time.perf_counter()
    ends, counts, tiers = [t0] * epochs, [0] * epochs, [set() for _ in range(epochs)]
    while True:
        b = next(it)
        sync(device)
        if loader.epoch >= epochs:
            break
        counts[loader.epoch] += 1
        tiers[loader.epoch].add(b.tier)
        ends[loader.epoch] = time.perf_counter()
    starts = [t0] + ends[:-1]
    return [(counts[e] * loader.batch_size / (ends[e] - starts[e]), "+".join(sorted(tiers[e])))
            for e in range(epochs)]


def data_path_rates(cfg: FitConfig, store: ActivationStore, device: torch.device) -> dict[str, tuple[float, str]]:
    """The data path alone, no training: rows/s of an epoch from the store (cold if the page cache could be
    dropped), from the store cached, from the kept rows, and of the preloaded baseline's batches."""
    out = {}

    def put(name: str, value: tuple[float, str]) -> None:
        out[name] = value
        print(f"  data path alone, {name}: {value[0]:,.0f} rows/s from {value[1]}", flush=True)

    cold = drop_page_cache()
    loader = loader_like(cfg, store, device, keep_rows=False)
    print(f"data path alone: window {loader.shuffle_chunks} chunks of {store.layout.n_chunks}, B {cfg.batch_size}")
    first, cached = epoch_rates(loader, device, 2)
    loader.close()
    if cold:
        put("store, cold (page cache dropped)", first)
    put("store, cached" + ("" if cold else " (the page cache could not be dropped: cached only)"), cached)
    kept = loader_like(cfg, store, device)
    put(f"kept rows ({kept.keep_plan.describe()})", epoch_rates(kept, device, 2)[1])
    n = kept.rows_per_epoch // kept.batch_size
    kept.close()
    del kept
    rows = preloaded(store, device, cfg.batch_size)
    next(rows)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        next(rows)
    sync(device)
    put("preloaded rows (random index, widened)", (n * cfg.batch_size / (time.perf_counter() - t0), "memory"))
    return out


def uniform_expected_distinct(n_images: int, tokens: int, batch: int) -> float:
    n = n_images * tokens
    lc = lambda a, b: math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)  # noqa: E731
    return n_images * (1 - math.exp(lc(n - tokens, batch) - lc(n, batch)))


def shipped_setup(args, prefix: str, overrides: dict, dead_tokens: int = 0):
    """Threads, the bench store, and the fit config as the CLI builds it from its defaults plus ``overrides`` (a
    0 value keeps the default). AuxK's dead threshold defaults to two batches, so AuxK runs in the timed steps."""
    if args.threads:
        torch.set_num_threads(args.threads)
    url = build_store(args)
    store = ActivationStore(url)
    over = {"store": url, "out": tempfile.mkdtemp(prefix=prefix), "device": args.device, "steps": 10**9}
    over.update({k: v for k, v in overrides.items() if v})
    defaults = stage_config(FitConfig, "fit", None, over)
    over["dead_tokens"] = dead_tokens or 2 * defaults.batch_size
    return url, store, torch.device(args.device), stage_config(FitConfig, "fit", None, over)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/clt_bench_fit")
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--tokens", type=int, default=50)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--chunk-mb", type=float, default=16.0, help="the harvest default")
    ap.add_argument("--batch", type=int, default=0, help="0 = the fit default")
    ap.add_argument("--dead-tokens", type=int, default=0, help="0 = two batches, so AuxK runs in the timed steps")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dead-frac", type=float, default=0.05,
                    help="share of latents per layer that count as dead at the start of every timed block (0 = "
                         "leave the trainer's counters as training left them; often no latent is dead then)")
    ap.add_argument("--steps", type=int, default=5, help="steps per timed block")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=4, help="untimed steps first (AuxK needs dead latents)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument("--skip-startup", action="store_true")
    ap.add_argument("--data-only", action="store_true", help="only the data path's rates (no model, no steps)")
    ap.add_argument("--write", action="store_true", help="append the result line to BENCHMARKS.md")
    args = ap.parse_args()
    url, store, device, cfg = shipped_setup(args, "bench_fit_", {"batch_size": args.batch}, args.dead_tokens)
    no_aux = dataclasses.replace(cfg, aux_k=0)
    runs = {"product": dict(dataclasses.asdict(cfg), data="ChunkLoader (as shipped), epochs >= 2"),
            "store": dict(dataclasses.asdict(cfg), keep_rows=False, data="ChunkLoader, --no-keep-rows"),
            "preloaded": dict(dataclasses.asdict(cfg), data="rows preloaded on the device, random index")}
    for name, c in runs.items():
        print(f"{name:>10}: {json.dumps(c, sort_keys=True)}")
    strip = lambda c: {k: v for k, v in c.items() if k != "data"}  # noqa: E731
    if strip(runs["product"]) != strip(runs["preloaded"]):
        print("refusing to compare: the configurations differ in more than the data source")
        sys.exit(2)
    diff = {k for k in dataclasses.asdict(cfg) if getattr(cfg, k) != getattr(no_aux, k)}
    assert diff == {"aux_k"}, diff
    assert {k for k, v in runs["store"].items() if runs["product"][k] != v} == {"keep_rows", "data"}

    rates_alone = data_path_rates(cfg, store, device)
    if args.data_only:
        return
    trainer = Trainer(cfg, store, device)
    store_loader = loader_like(cfg, store, device, keep_rows=False, shuffle_chunks=trainer.loader.shuffle_chunks)
    sources = {"product": iter(trainer.loader), "store": iter(store_loader),
               "preloaded": preloaded(store, device, cfg.batch_size)}
    while trainer.loader.epoch == 0:  # the product's first epoch (it decodes the store into the kept rows)
        next(sources["product"])
    tiers: set[str] = set()
    aux_cfg = (cfg, LossConfig.from_fit_config(cfg))
    off_cfg = (no_aux, LossConfig.from_fit_config(no_aux))
    distinct: list[int] = []
    dead: dict[str, list[float]] = {"product": [], "store": [], "preloaded": [], "preloaded_aux0": []}

    n_dead = int(round(args.dead_frac * trainer.spec.n_features))
    pinned = torch.randperm(trainer.spec.n_features, generator=torch.Generator().manual_seed(0))[:n_dead]
    pinned = pinned.to(trainer.since_fired.device)

    def block(name: str, n: int) -> float:
        trainer.cfg, trainer.loss_cfg = off_cfg if name == "preloaded_aux0" else aux_cfg
        batches = sources["preloaded" if name == "preloaded_aux0" else name]
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            batch = next(batches)
            if name == "product":
                distinct.append(len(np.unique(batch.image)))
                tiers.add(batch.tier)
            if n_dead:  # AuxK's cost grows with the dead set: every step sees the same one (a tiny op)
                trainer.since_fired.zero_()
                trainer.since_fired[:, pinned] = cfg.dead_tokens
            m = trainer.train_step(batch)
        sync(device)
        dt = time.perf_counter() - t0
        dead[name].append(float(m["dead_frac"].mean()))
        return n / dt

    block("product", args.warmup)
    block("store", 2)
    block("preloaded", 2)
    rates: dict[str, list[float]] = {k: [] for k in dead}
    names = list(rates)
    for r in range(args.repeats):
        # The order rotates each repeat: a block right after the AuxK-off one, or after another loader's reads,
        # is not always the same source's.
        for name in names[r % len(names):] + names[:r % len(names)]:
            rates[name].append(block(name, args.steps))
        print(f"  repeat {r}: " + "   ".join(f"{k} {v[-1]:.2f} steps/s" for k, v in rates.items()))
    trainer.loader.close()
    store_loader.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    paired = lambda a, b: statistics.median(x / y for x, y in zip(rates[a], rates[b]))  # noqa: E731
    lay = store.layout
    want = uniform_expected_distinct(lay.n_images, lay.tokens_per_image, cfg.batch_size)
    sizes = (f"L {lay.n_layers}, d {lay.d_model}, F {trainer.spec.n_features}, k {cfg.k}, B {cfg.batch_size}, "
             f"aux_k {cfg.aux_k}, dead_tokens {cfg.dead_tokens}, dead {args.dead_frac:.1%}, "
             f"{lay.n_images} images x {lay.tokens_per_image} "
             f"tokens, {lay.n_chunks} chunks, window {trainer.loader.shuffle_chunks} chunks, {args.device}, "
             f"{torch.get_num_threads()} torch threads")
    print(f"sizes: {sizes}")
    print(f"dead latents at each step: {n_dead} per layer ({args.dead_frac:.1%}, --dead-frac); "
          "dead fraction after the last step of each block (median; pinned latents that fired count as revived): "
          + ", ".join(f"{k} {statistics.median(v):.1%}" for k, v in dead.items()))
    tier = "+".join(sorted(tiers))
    print(f"kept rows: {trainer.loader.keep_plan.describe()}; the product's timed steps came from: {tier}")
    print(f"product (epochs >= 2) / preloaded: {med['product'] / med['preloaded']:.3f} "
          f"(paired {paired('product', 'preloaded'):.3f}); {med['product']:.2f} vs {med['preloaded']:.2f} steps/s")
    print(f"store (--no-keep-rows) / preloaded: {med['store'] / med['preloaded']:.3f} "
          f"(paired {paired('store', 'preloaded'):.3f}); {med['store']:.2f} vs {med['preloaded']:.2f} steps/s")
    step_rows = med["preloaded"] * cfg.batch_size
    print(f"data path alone (rows/s; the preloaded step consumes {step_rows:,.0f}):")
    for name, (rate, served) in rates_alone.items():
        bound = "bounds the fit" if rate < step_rows else "keeps up with the step"
        print(f"  {name}: {rate:,.0f} rows/s from {served}, {rate / step_rows:.2f}x the step: {bound}")
    print(f"AuxK on / off (preloaded): {med['preloaded'] / med['preloaded_aux0']:.3f} "
          f"(paired {paired('preloaded', 'preloaded_aux0'):.3f}); {med['preloaded']:.2f} vs "
          f"{med['preloaded_aux0']:.2f} steps/s")
    print(f"distinct images per batch: {np.mean(distinct):.1f} vs uniform {want:.1f} "
          f"({np.mean(distinct) / want:.3f})")
    line = ""
    if not args.skip_startup:
        out = Path(tempfile.mkdtemp(prefix="bench_fit_run_"))
        t0 = time.perf_counter()
        summary = run_fit(dataclasses.replace(cfg, out=str(out), steps=2, checkpoint_every=10**6))
        total = time.perf_counter() - t0
        shutil.rmtree(out, ignore_errors=True)
        parts = {k: summary.get(k) for k in ("open_s", "model_s", "first_window_s", "startup_s")}
        print(f"start-up (run_fit, command -> first step): {parts}; whole 2-step run {total:.1f}s")
        line = f", start-up {parts['startup_s']:.1f}s (first window {parts['first_window_s']:.1f}s)"
    if args.write:
        alone = ", ".join(f"{k.split(' (')[0]} {v[0]:,.0f}" for k, v in rates_alone.items())
        append_result(f"| bench_fit | {sizes} | product ({tier}) {med['product']:.2f}, store {med['store']:.2f}, "
                      f"preloaded {med['preloaded']:.2f}, AuxK off {med['preloaded_aux0']:.2f} steps/s; data path "
                      f"alone rows/s: {alone} vs the step's {step_rows:,.0f}{line} | product/preloaded "
                      f"{med['product'] / med['preloaded']:.3f}, "
                      f"store/preloaded {med['store'] / med['preloaded']:.3f}, "
                      f"AuxK on/off {med['preloaded'] / med['preloaded_aux0']:.3f} |")


if __name__ == "__main__":
    main()
