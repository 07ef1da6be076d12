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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from clt_pipe.clt import rundir
from clt_pipe.clt.losses import LossConfig, clt_loss
from clt_pipe.clt.model import CrossLayerTranscoder
from clt_pipe.clt.rundir import diverged, mark_diverged
from clt_pipe.clt.spec import CLTSpec
from clt_pipe.clt.sweepdir import SWEEP_FILE
from clt_pipe.config import FitConfig
from clt_pipe.device import resolve_device
from clt_pipe.errors import CheckpointError, StoreError
from clt_pipe import signals
from clt_pipe.fit import checkpoint as ckpt
from clt_pipe.fit import memory, stopping
from clt_pipe.fit.distributed import Dist, init_distributed
from clt_pipe.fit.divergence import DivergedError, diverged_line, loss_is_finite, weights_are_finite
from clt_pipe.fit.metrics import MetricsLog
from clt_pipe.fit.sweep import Member, SweepConfig, members, prepare_root
from clt_pipe.outdir import clear_out_dir, hold_out_dir
from clt_pipe.precision import autocast_context
from clt_pipe.store.loader import ChunkLoader, available_memory
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
    if (old or {}).get("finished") or diverged(out):
        return  # same settings, already done or diverged: run_fit reports it
    if not cfg.resume:
        raise CheckpointError(f"{out} holds an unfinished run of these settings; pass --resume to continue it "
                              f"or --overwrite to start again")


def run_meta(cfg: FitConfig, store: ActivationStore, spec: CLTSpec) -> dict:
    return {"config": dataclasses.asdict(cfg), "spec": spec.to_dict(),
            "store": {"url": store.url, "fingerprint": store.meta.fingerprint, "model": store.model,
                      "dataset": store.meta.dataset.without_class_names(),
                      "tokens": store.meta.tokens.to_dict(), "n_layers": store.n_layers, "d_model": store.d_model}}


def make_loader(cfg: FitConfig, store: ActivationStore, device: torch.device, dist: Dist) -> ChunkLoader:
    loader = ChunkLoader(store, cfg.batch_size, tokens=cfg.tokens, split="train", holdout=cfg.holdout,
                         seed=cfg.seed, shuffle_chunks=cfg.shuffle_chunks, shuffle_memory=cfg.shuffle_memory,
                         read_threads=cfg.read_threads, device=device, rank=dist.rank, world_size=dist.world,
                         keep_rows=cfg.keep_rows, keep_memory=cfg.keep_memory)
    # Ranks split the windows of one schedule, so they must agree on the window size (free memory differs).
    loader.set_window_chunks(min(dist.gather(loader.shuffle_chunks)))
    return loader


class Trainer:
    def __init__(self, cfg: FitConfig, store: ActivationStore, device: torch.device, dist: Dist | None = None,
                 spec: CLTSpec | None = None, loader: ChunkLoader | None = None):
        """``loader``: a sweep's shared loader (its members see the same batches); else this fit's own."""
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
        if loader is None:
            loader = make_loader(cfg, store, device, self.dist)
            loader.prefetch()  # the first window reads while AdamW imports torch._dynamo (seconds)
        self.loader = loader
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


@dataclass
class _Run:
    """One CLT being fitted: a single fit, or one member of a sweep (``name``)."""

    name: str | None
    cfg: FitConfig
    out: Path
    trainer: Trainer | None = None
    meta: dict = field(default_factory=dict)
    log: MetricsLog | None = None
    status: str = "training"  # training | finished | diverged
    note: str = ""


def run_fit(cfg: FitConfig, console=None, on_step: Callable[[int], None] | None = None,
            sweep: SweepConfig | None = None) -> dict:
    """Fit ``cfg``, or with ``sweep`` every member of it on one stream of batches (clt_pipe/fit/sweep.py)."""
    t_start = time.perf_counter()
    mems = members(cfg, sweep) if sweep is not None else None  # member configs are checked before the store
    store = ActivationStore(cfg.store)  # refuses incomplete stores and unknown format versions
    dist, device = init_distributed(resolve_device(cfg.device))
    try:
        with _hold(cfg, mems, dist):
            if mems is not None:
                return _fit_sweep(cfg, sweep, mems, store, dist, device, console if dist.is_main else None,
                                  on_step, t_start)
            return _fit(cfg, store, dist, device, console if dist.is_main else None, on_step, t_start)
    finally:
        dist.close()


@contextlib.contextmanager
def _hold(cfg: FitConfig, mems: list[Member] | None, dist: Dist):
    """Rank 0 holds --out, and in a sweep each member's folder, for as long as it writes (clt_pipe/outdir.py)."""
    with contextlib.ExitStack() as stack:
        if dist.is_main:
            stack.enter_context(hold_out_dir(cfg.out, "fit"))
            for m in mems or ():
                stack.enter_context(hold_out_dir(m.cfg.out, "fit"))
        yield


def _fit(cfg: FitConfig, store: ActivationStore, dist: Dist, device: torch.device, console, on_step,
         t_start: float) -> dict:
    startup = {"open_s": time.perf_counter() - t_start}
    out = Path(cfg.out)
    if (out / SWEEP_FILE).exists():
        raise CheckpointError(f"{out} holds a sweep; fit a single CLT into another --out")
    if dist.is_main:
        prepare_out_dir(cfg, store)
    dist.barrier()
    if (out / rundir.RUN_FILE).exists() and rundir.read_json(out / rundir.RUN_FILE, "").get("finished"):
        return {"already_finished": True, "out": str(out)}
    if diverged(out):
        raise DivergedError(diverged(out))
    spec = cfg.spec(store.n_layers, store.d_model)  # k >= F and other spec errors before anything is written
    t = time.perf_counter()
    run = _Run(None, cfg, out, Trainer(cfg, store, device, dist, spec))
    startup["model_s"] = time.perf_counter() - t
    run.meta = dict(run_meta(cfg, store, run.trainer.spec), world_size=dist.world)
    try:
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
        loaded = ckpt.load_latest(out, device, log=(console.print if console else print)) if cfg.resume else None
        _start(run, loaded, dist, console)
    except BaseException:
        run.trainer.loader.close()  # no read thread outlives a refused resume (the first window is being read)
        raise
    return _train([run], run.trainer.loader, dist, console, on_step, t_start, startup)


def _fit_sweep(base: FitConfig, sweep: SweepConfig, mems: list[Member], store: ActivationStore, dist: Dist,
               device: torch.device, console, on_step, t_start: float) -> dict:
    startup = {"open_s": time.perf_counter() - t_start}
    say = console.print if console else (lambda *a: None)
    specs = [m.cfg.spec(store.n_layers, store.d_model) for m in mems]  # before anything is written
    loader = make_loader(base, store, device, dist)
    try:
        window = 2 * loader.shuffle_chunks * store.layout.rows_per_chunk * loader.row_bytes()
        available = min(dist.gather(available_memory(device)))  # ranks refuse together or not at all
        kept = loader.keep_plan.need_bytes if loader.keep_plan.tier else 0
        plan = memory.plan(specs, base.batch_size, window, kept, available, device)
        say(plan.line())
        plan.check()  # before --overwrite removes anything
        if dist.is_main:
            prepare_root(base, sweep, mems)
            for m in mems:
                prepare_out_dir(m.cfg, store)
        dist.barrier()
        runs = [_Run(m.name, m.cfg, Path(m.cfg.out)) for m in mems]
        for run in runs:
            if (run.out / rundir.RUN_FILE).exists() and rundir.read_run(run.out).get("finished"):
                run.status, run.note = "finished", "finished earlier"
            elif diverged(run.out):
                run.status, run.note = "diverged", diverged(run.out)
        todo = [(r, s) for r, s in zip(runs, specs) if r.status == "training"]
        if not todo:
            loader.close()
            _raise_diverged(runs)
            return {"already_finished": True, "out": base.out, "members": len(runs)}
        loader.prefetch()
        t = time.perf_counter()
        for run, spec in todo:
            run.trainer = Trainer(run.cfg, store, device, dist, spec, loader=loader)
            run.meta = dict(run_meta(run.cfg, store, spec), world_size=dist.world)
            if dist.is_main:
                run.out.mkdir(parents=True, exist_ok=True)
        startup["model_s"] = time.perf_counter() - t
        active = [r for r, _ in todo]
        loaded = _common_checkpoint(active, device, say) if base.resume else [None] * len(active)
        for run, state in zip(active, loaded):
            _start(run, state, dist, None)
    except BaseException:
        loader.close()
        raise
    return _train(runs, loader, dist, console, on_step, t_start, startup)


def _common_checkpoint(runs: list[_Run], device: torch.device, say) -> list:
    """Every member's checkpoint of the latest step they all have (one loader position serves them all), or
    Nones where they share none: the sweep then starts again from step 0 (the same batches, the same result)."""
    common = set.intersection(*(set(ckpt.complete_steps(r.out)) for r in runs))
    if not common:
        if any(ckpt.complete_steps(r.out) for r in runs):
            say("sweep: the members share no checkpoint step; training every unfinished member from step 0")
        return [None] * len(runs)
    step = max(common)
    say(f"sweep: resuming {len(runs)} member(s) from step {step}")
    return [ckpt.load_step(r.out, step, device) for r in runs]


def _start(run: _Run, loaded, dist: Dist, console) -> None:
    if loaded is not None:
        run.trainer.load_state(*loaded)
    elif dist.is_main:
        rundir.write_run(run.out, run.meta, finished=False)
    if dist.is_main:
        run.log = MetricsLog(run.out / "metrics.jsonl", run.trainer.spec.n_layers, console=console,
                             total_steps=run.cfg.steps, resume_step=run.trainer.step)


def _train(runs: list[_Run], loader: ChunkLoader, dist: Dist, console, on_step, t_start: float,
           startup: dict) -> dict:
    """The one loop of single fits and sweeps: each batch is read once and stepped by every member in turn."""
    active = [r for r in runs if r.status == "training"]
    start_step = step = min(r.trainer.step for r in active)
    t0 = time.perf_counter()
    first = True
    sweep = runs[0].name is not None
    stop_point = signals.stop_point().enter()  # SIGTERM/SIGINT now stop after the current step, checkpointed
    try:
        for run in active:
            if run.trainer.step >= run.cfg.steps:  # stopped between its last checkpoint and its export
                _finish(run, dist)
        batches = iter(loader)
        while any(r.status == "training" for r in runs):
            batch = next(batches)
            if first:  # the command's start-up: store, model, checkpoint, first shuffle window
                startup["first_window_s"] = time.perf_counter() - t0
                startup["startup_s"] = time.perf_counter() - t_start
                t0, first = time.perf_counter(), False
            for run in runs:
                if run.status == "training":
                    _advance(run, batch, dist, console if sweep else None)
            step += 1
            if sweep and console and step % runs[0].cfg.log_every == 0:
                console.print(f"step {step}  " + "  ".join(_progress(r) for r in runs))
            if on_step is not None:
                on_step(step)
            signum = stopping.agreed_signal(dist)
            training = [r for r in runs if r.status == "training"]
            if signum and training:
                for run in training:
                    if run.trainer.step % run.cfg.checkpoint_every:  # else written just above
                        _checkpoint(run, dist)
                dist.barrier()  # leave together: torchrun's agent SIGTERMs the other ranks when one exits
                raise stopping.stopped(signum, step, max(r.cfg.steps for r in training), training[0].out)
    finally:
        stop_point.exit()
        for run in runs:
            if run.log:
                run.log.close()
        loader.close()
    _raise_diverged(runs)
    elapsed = time.perf_counter() - t0
    steps = step - start_step
    batch_size = runs[0].cfg.batch_size * dist.world
    summary = {"out": str(Path(runs[0].cfg.out).parent if sweep else runs[0].out), "steps": step,
               "ranks": dist.world, "seconds": elapsed, "steps_per_s": steps / max(elapsed, 1e-9),
               "tokens_per_s": steps * batch_size / max(elapsed, 1e-9), "window_chunks": loader.shuffle_chunks,
               "kept_rows": loader.keep_plan.describe(), "data_tiers": loader.tiers(),
               **{k: round(v, 3) for k, v in startup.items()}}
    if not sweep:
        return {**summary, **(runs[0].log.final_summary() if runs[0].log else {})}
    summary["members"] = len(runs)
    for run in runs:
        fvu = (run.log.final_summary() if run.log else {}).get("mean_fvu")
        summary[run.name] = run.note if fvu is None else f"{run.status}, mean FVU {fvu:.4f}"
    return summary


def _progress(run: _Run) -> str:
    if run.status == "diverged":
        return f"{run.name} diverged"
    loss = (run.log.last if run.log else {}).get("loss")
    return f"{run.name} loss {loss:.4g}" if loss is not None else f"{run.name} {run.status}"


def _advance(run: _Run, batch, dist: Dist, console) -> None:
    trainer, cfg = run.trainer, run.cfg
    metrics = trainer.train_step(batch)
    if not loss_is_finite(metrics["loss"], dist):
        _diverge(run, "the loss", dist, console)
        return
    if run.log and (trainer.step % cfg.log_every == 0 or trainer.step == cfg.steps):
        run.log.write(trainer.step, metrics, lr=trainer.sched.get_last_lr()[0], batch_size=cfg.batch_size * dist.world)
    if trainer.step >= cfg.steps:
        _finish(run, dist)
    elif trainer.step % cfg.checkpoint_every == 0:
        _checkpoint(run, dist, console)


def _checkpoint(run: _Run, dist: Dist, console=None) -> bool:
    """Write a checkpoint of finite weights (every rank: it gathers the loader positions); False if they are not."""
    if not weights_are_finite(run.trainer.model, dist):
        _diverge(run, "the weights", dist, console)
        return False
    state = run.trainer.state()
    if dist.is_main:
        ckpt.save_checkpoint(run.out, run.trainer.step, run.trainer.model.state_dict(), state, run.meta)
    return True


def _finish(run: _Run, dist: Dist) -> None:
    if not _checkpoint(run, dist):
        return
    if dist.is_main:
        rundir.save_fitted(run.out, run.trainer.model.cpu(), run.meta)
    dist.barrier()
    run.status = "finished"


def _diverge(run: _Run, what: str, dist: Dist, console) -> None:
    kept = ckpt.list_checkpoints(run.out)
    run.status = "diverged"
    run.note = diverged_line(run.out, what, run.trainer.step, kept[-1].name if kept else None)
    if dist.is_main:
        mark_diverged(run.out, run.note)
        if console:
            console.print(f"[red]diverged[/]: {run.note}")
    run.trainer.opt.state.clear()  # its moments are not used again: the other members may have the memory


def _raise_diverged(runs: list[_Run]) -> None:
    bad = [r for r in runs if r.status == "diverged"]
    if not bad:
        return
    if runs[0].name is None:
        raise DivergedError(bad[0].note)
    done = sum(r.status == "finished" for r in runs)
    raise DivergedError(f"sweep: member(s) {', '.join(r.name for r in bad)} diverged (see DIVERGED in their "
                        f"folders), {done} of {len(runs)} finished; analyze the finished ones with `clt-pipe "
                        f"analyze --clt {Path(runs[0].cfg.out).parent}`")
