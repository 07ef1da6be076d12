"""`clt-pipe fit`: train a CLT on a committed store, with exact resume.

Everything that decides the next update is checkpointed: weights, AdamW moments, the LR schedule, the
loader position, the dead-latent counters and the RNG states. So N straight steps and N/2 + kill + resume +
N/2 produce the same weights bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from clt_pipe.clt import rundir
from clt_pipe.clt.losses import LossConfig, clt_loss
from clt_pipe.clt.model import CrossLayerTranscoder
from clt_pipe.clt.spec import CLTSpec
from clt_pipe.config import FitConfig
from clt_pipe.device import resolve_device
from clt_pipe.errors import CheckpointError, StoreError
from clt_pipe import signals
from clt_pipe.fit import checkpoint as ckpt
from clt_pipe.fit import stopping
from clt_pipe.fit.distributed import Dist, init_distributed
from clt_pipe.fit.metrics import MetricsLog
from clt_pipe.outdir import clear_out_dir, hold_out_dir
from clt_pipe.precision import autocast_context
from clt_pipe.store.loader import ChunkLoader
from clt_pipe.store.reader import ActivationStore

# Fields that may change between an interrupted run and its resume without changing the result.
RESUMABLE_FIELDS = {"resume", "overwrite", "checkpoint_every", "log_every", "read_threads", "device", "store",
                    "out", "shuffle_memory", "keep_rows", "keep_memory"}  # the window size is in the loader position


def standardization(store: ActivationStore) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-layer input centring and scalar scales from the store's statistics (see clt/model.py)."""
    st = store.stats()
    for key, value in st.items():
        if not np.isfinite(value).all():
            raise StoreError(f"{store.url}: statistics {key} hold non-finite values; re-harvest the store")
    in_mean = torch.from_numpy(st["mean_in"]).float()
    in_scale = torch.from_numpy(np.sqrt(st["var_in"].mean(-1))).float().clamp_min(1e-6)
    out_scale = torch.from_numpy(np.sqrt(st["var_out"].mean(-1))).float().clamp_min(1e-6)
    return in_mean, in_scale, out_scale


def lr_lambda(cfg: FitConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.decay == "none":
            return 1.0
        span = max(cfg.steps - cfg.warmup_steps, 1)
        t = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        shape = 0.5 * (1 + math.cos(math.pi * t)) if cfg.decay == "cosine" else 1 - t
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return f


def _comparable(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in RESUMABLE_FIELDS}


def prepare_out_dir(cfg: FitConfig, store: ActivationStore) -> None:
    out = Path(cfg.out)
    run_file = out / rundir.RUN_FILE
    has_state = run_file.exists() or ckpt.list_checkpoints(out)
    if not has_state:
        return
    if cfg.overwrite:
        clear_out_dir(out)  # this process holds the folder (hold_out_dir): no other run is writing it
        return
    old = rundir.read_json(run_file, "") if run_file.exists() else ckpt.latest_config(out)
    old_cfg = (old or {}).get("config", {})
    if _comparable(old_cfg) != _comparable(dataclasses.asdict(cfg)):
        diff = sorted(k for k in _comparable(dataclasses.asdict(cfg))
                      if old_cfg.get(k) != getattr(cfg, k))
        raise CheckpointError(f"{out} holds a run with other settings ({', '.join(diff[:4])}); pass --overwrite "
                              f"to replace it or choose another --out")
    if (old or {}).get("store", {}).get("fingerprint") not in (None, store.meta.fingerprint):
        raise CheckpointError(f"{out} was trained on another store; pass --overwrite or choose another --out")
    if (old or {}).get("finished"):
        return  # same settings, already done: run_fit reports it
    if not cfg.resume:
        raise CheckpointError(f"{out} holds an unfinished run of these settings; pass --resume to continue it "
                              f"or --overwrite to start again")


def run_meta(cfg: FitConfig, store: ActivationStore, spec: CLTSpec) -> dict:
    return {"config": dataclasses.asdict(cfg), "spec": spec.to_dict(),
            "store": {"url": store.url, "fingerprint": store.meta.fingerprint, "model": store.model,
                      "dataset": store.meta.dataset.without_class_names(),
                      "tokens": store.meta.tokens.to_dict(), "n_layers": store.n_layers, "d_model": store.d_model}}


class Trainer:
    def __init__(self, cfg: FitConfig, store: ActivationStore, device: torch.device, dist: Dist | None = None,
                 spec: CLTSpec | None = None):
        self.cfg, self.store, self.device = cfg, store, device
        self.dist = dist or Dist()
        torch.manual_seed(cfg.seed)
        self.spec = spec or cfg.spec(store.n_layers, store.d_model)
        # Built on the device: on a GPU the random init is then milliseconds, not seconds of CPU randn (start-up).
        with torch.device(device):
            self.model = CrossLayerTranscoder(self.spec)
        self.model.set_standardization(*standardization(store))
        self.dist.broadcast_params(self.model)
        # Dense zero grads from the start: the sparse decode then adds its B*k rows into them in place.
        self.model.materialize_grads()
        self.loader = ChunkLoader(store, cfg.batch_size, tokens=cfg.tokens, split="train", holdout=cfg.holdout,
                                  seed=cfg.seed, shuffle_chunks=cfg.shuffle_chunks,
                                  shuffle_memory=cfg.shuffle_memory, read_threads=cfg.read_threads,
                                  device=device, rank=self.dist.rank, world_size=self.dist.world,
                                  keep_rows=cfg.keep_rows, keep_memory=cfg.keep_memory)
        # Ranks split the windows of one schedule, so they must agree on the window size (free memory differs).
        self.loader.set_window_chunks(min(self.dist.gather(self.loader.shuffle_chunks)))
        self.loader.prefetch()  # the first window reads while AdamW imports torch._dynamo (seconds)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     betas=(0.9, 0.999))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.loss_cfg = LossConfig.from_fit_config(cfg)
        self.since_fired = torch.zeros(self.spec.n_layers, self.spec.n_features, dtype=torch.long, device=device)
        self.step = 0

    # ---- state ---------------------------------------------------------------------------------------
    def state(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"step": self.step, "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "loader": self.dist.gather(self.loader.state_dict()), "since_fired": self.since_fired.cpu(), "rng": rng}

    def load_state(self, weights: dict, state: dict) -> None:
        self.model.load_state_dict(weights)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        loaders = state["loader"] if isinstance(state["loader"], list) else [state["loader"]]
        if len(loaders) != self.dist.world:
            raise CheckpointError(f"checkpoint was written by {len(loaders)} rank(s); resume it with as many "
                                  f"(got {self.dist.world})")
        self.loader.load_state_dict(loaders[self.dist.rank])
        self.since_fired = state["since_fired"].to(self.device)
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step = state["step"]

    # ---- one update ----------------------------------------------------------------------------------
    def amp(self):
        return autocast_context(self.device, self.cfg.precision)

    def train_step(self, batch) -> dict:
        self.model.train()
        dead = self.since_fired >= self.cfg.dead_tokens if self.spec.kind.auxk and self.cfg.aux_k else None
        with self.amp():
            out = self.model(batch.x, decode=self.cfg.decode)
            loss, metrics = clt_loss(self.model, out, batch.y, dead_mask=dead, cfg=self.loss_cfg,
                                     decode=self.cfg.decode)
        self.opt.zero_grad(set_to_none=False)
        loss.backward()
        self.dist.average_grads(self.model.parameters())
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.since_fired += batch.x.shape[0] * self.dist.world
        self.since_fired[self.dist.any_rank(metrics["fired"])] = 0
        self.step += 1
        metrics["loss"] = loss.detach()
        metrics["dead_frac"] = (self.since_fired >= self.cfg.dead_tokens).float().mean(-1)
        metrics["image_diversity"] = batch.image_diversity
        metrics["data_tier"] = batch.tier
        return metrics


def run_fit(cfg: FitConfig, console=None, on_step: Callable[[int], None] | None = None) -> dict:
    t_start = time.perf_counter()
    store = ActivationStore(cfg.store)  # refuses incomplete stores and unknown format versions
    dist, device = init_distributed(resolve_device(cfg.device))
    try:
        with hold_out_dir(cfg.out, "fit") if dist.is_main else contextlib.nullcontext():
            return _fit(cfg, store, dist, device, console if dist.is_main else None, on_step, t_start)
    finally:
        dist.close()


def _fit(cfg: FitConfig, store: ActivationStore, dist: Dist, device: torch.device, console, on_step,
         t_start: float) -> dict:
    startup = {"open_s": time.perf_counter() - t_start}
    if dist.is_main:
        prepare_out_dir(cfg, store)
    dist.barrier()
    out = Path(cfg.out)
    if (out / rundir.RUN_FILE).exists() and rundir.read_json(out / rundir.RUN_FILE, "").get("finished"):
        return {"already_finished": True, "out": str(out)}
    spec = cfg.spec(store.n_layers, store.d_model)  # k >= F and other spec errors before anything is written
    t = time.perf_counter()
    trainer = Trainer(cfg, store, device, dist, spec)
    startup["model_s"] = time.perf_counter() - t
    meta = dict(run_meta(cfg, store, trainer.spec), world_size=dist.world)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    loaded = ckpt.load_latest(out, device, log=(console.print if console else print)) if cfg.resume else None
    if loaded is not None:
        trainer.load_state(*loaded)
    elif dist.is_main:
        rundir.write_run(out, meta, finished=False)
    log = MetricsLog(out / "metrics.jsonl", trainer.spec.n_layers, console=console, total_steps=cfg.steps,
                     resume_step=trainer.step) if dist.is_main else None
    t0, start_step = time.perf_counter(), trainer.step
    batches = iter(trainer.loader)
    first = True

    def checkpoint() -> None:
        state = trainer.state()  # every rank: it gathers the loader positions
        if dist.is_main:
            ckpt.save_checkpoint(out, trainer.step, trainer.model.state_dict(), state, meta)

    stop_point = signals.stop_point().enter()  # SIGTERM/SIGINT now stop after the current step, checkpointed
    try:
        while trainer.step < cfg.steps:
            batch = next(batches)
            if first:  # the command's start-up: store, model, checkpoint, first shuffle window
                startup["first_window_s"] = time.perf_counter() - t0
                startup["startup_s"] = time.perf_counter() - t_start
                t0, first = time.perf_counter(), False
            metrics = trainer.train_step(batch)
            if log and (trainer.step % cfg.log_every == 0 or trainer.step == cfg.steps):
                log.write(trainer.step, metrics, lr=trainer.sched.get_last_lr()[0],
                          batch_size=cfg.batch_size * dist.world)
            if trainer.step % cfg.checkpoint_every == 0 and trainer.step < cfg.steps:
                checkpoint()
            if on_step is not None:
                on_step(trainer.step)
            signum = stopping.agreed_signal(dist)
            if signum and trainer.step < cfg.steps:
                if trainer.step % cfg.checkpoint_every:  # else written just above
                    checkpoint()
                dist.barrier()  # leave together: torchrun's agent SIGTERMs the other ranks when one exits
                raise stopping.stopped(signum, trainer.step, cfg.steps, out)
    finally:
        stop_point.exit()
        if log:
            log.close()
        trainer.loader.close()
    checkpoint()
    if dist.is_main:
        rundir.save_fitted(out, trainer.model.cpu(), meta)
    dist.barrier()
    elapsed = time.perf_counter() - t0
    steps = trainer.step - start_step
    tokens = steps * cfg.batch_size * dist.world
    return {"out": str(out), "steps": trainer.step, "ranks": dist.world, "seconds": elapsed,
            "steps_per_s": steps / max(elapsed, 1e-9), "tokens_per_s": tokens / max(elapsed, 1e-9),
            "window_chunks": trainer.loader.shuffle_chunks, "kept_rows": trainer.loader.keep_plan.describe(),
            "data_tiers": trainer.loader.tiers(), **{k: round(v, 3) for k, v in startup.items()},
            **(log.final_summary() if log else {})}
