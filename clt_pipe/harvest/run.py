"""`clt-pipe harvest`: images -> CLIP ViT -> activation store (plan, then the loop or the dask workers)."""

from __future__ import annotations

import contextlib
import os
import time

import torch

from clt_pipe import signals
from clt_pipe.backbone.capture import run_capture
from clt_pipe.backbone.loading import Backbone
from clt_pipe.backbone.mlp import mlp_weights
from clt_pipe.config import HarvestConfig
from clt_pipe.datasets.base import ImageDataset
from clt_pipe.harvest.loop import disk_error, harvest_shards
from clt_pipe.errors import StoreError
from clt_pipe.harvest.plan import head_weights, open_inputs, plan, resolved_root, store_meta, text_classifiers
from clt_pipe.progress import NullProgress
from clt_pipe.store.meta import StoreMeta
from clt_pipe.store import format as F
from clt_pipe.store.reader import ActivationStore
from clt_pipe.store.writer import StoreWriter, as_written_before, fingerprint


def estimate_seconds_per_image(bb: Backbone, batch_size: int, precision: str) -> float:
    """Time one forward on random pixels (after a warm-up) - for --dry-run."""
    x = torch.randn(min(batch_size, 8), 3, *bb.identity.image_hw, device=bb.device)
    pos = torch.zeros(x.shape[0], 1, dtype=torch.long, device=bb.device)
    run_capture(bb, x, pos, torch.float16, precision)
    t0 = time.perf_counter()
    run_capture(bb, x, pos, torch.float16, precision)
    if bb.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / x.shape[0]


def run_harvest(cfg: HarvestConfig, progress=NullProgress(), log=print) -> dict:
    """The summary's ``seconds`` is the whole wall time; ``seconds_<part>`` its parts (load = dataset index and
    model, text_classifier = the zero-shot prompts, images = forward + write of every shard, finalize = merged
    statistics, images.parquet, COMPLETE.json; setup = plan, store creation, model constants): on a CPU the
    model and the text classifier can take longer than the images."""
    t0 = time.perf_counter()
    parts: dict[str, float] = {}
    dataset, bb = open_inputs(cfg)
    parts["load"] = time.perf_counter() - t0
    hp = plan(cfg, dataset, bb)
    lay = hp.layout
    if cfg.dry_run:
        spi = estimate_seconds_per_image(bb, cfg.batch_size, cfg.precision)
        return {"dry_run": True, "n_images": lay.n_images, "tokens_per_image": lay.tokens_per_image,
                "n_tokens": lay.n_tokens, "bytes_uncompressed": hp.bytes_uncompressed, "n_shards": lay.n_shards,
                "n_chunks": lay.n_chunks, "rows_per_chunk": lay.rows_per_chunk,
                "estimated_seconds": spi * lay.n_images, "device": str(bb.device)}
    meta = store_meta(cfg, dataset, bb, hp)
    try:
        summary = _write_store(cfg, dataset, bb, meta, progress, log, parts)
    except OSError as e:
        raise disk_error(e, cfg.store) from None
    return with_timings(summary, time.perf_counter() - t0, parts)


def complete_with(url: str, meta: StoreMeta) -> bool:
    """The store at ``url`` is complete (checked as every reader checks it) and is the harvest ``meta`` describes."""
    try:
        store = ActivationStore(url)
    except StoreError:
        return False
    stored = store.group.attrs[F.ATTRS_KEY]
    return store.meta.fingerprint in (fingerprint(meta), fingerprint(as_written_before(meta.to_dict(), stored)))


def check_data_root(cfg: HarvestConfig, recorded: str) -> None:
    """Resuming reads the rest of the images: from the tree the committed ones came from, unless the user says
    the data moved (its content fingerprint, part of the store's identity, has matched already)."""
    here = resolved_root(cfg.data_root)
    if recorded and here and os.path.realpath(recorded) != here and not cfg.data_moved:
        raise StoreError(f"{cfg.store} was harvested from data root {recorded}, this run reads {here}: resuming "
                         f"would mix images of two trees in one store; if the data moved there, pass --data-moved "
                         f"(its files must still be the same)")


TIMED_PARTS = ("load", "text_classifier", "images", "finalize")


def with_timings(summary: dict, total: float, parts: dict[str, float]) -> dict:
    """The whole wall time and its parts; what no part names (plan, store creation, constants) is "setup"."""
    parts = {k: parts.get(k, 0.0) for k in TIMED_PARTS}
    out = {**summary, "seconds": total, **{f"seconds_{k}": v for k, v in parts.items()},
           "seconds_setup": max(0.0, total - sum(parts.values()))}
    if parts["images"] > 0 and summary.get("images"):
        out["images_per_second"] = summary["images"] / parts["images"]
    return out


def _write_store(cfg: HarvestConfig, dataset: ImageDataset, bb: Backbone, meta: StoreMeta, progress, log,
                 parts: dict) -> dict:
    try:
        writer = StoreWriter.open(cfg.store, meta, overwrite=cfg.overwrite, write_threads=cfg.write_threads)
    except StoreError as e:
        # A finished store on a read-only mount (or with read-only credentials) cannot be locked, and needs
        # no writing: this harvest is done if the store is complete and holds exactly it.
        if cfg.overwrite or not complete_with(cfg.store, meta):
            raise
        log(f"{cfg.store} is complete and holds this harvest; not writable ({e}): nothing to do")
        return {"already_complete": True, "store": cfg.store, "n_shards": meta.layout.n_shards, "read_only": True}
    try:
        return _fill_store(cfg, dataset, bb, writer, progress, log, parts)
    except BaseException:
        writer.close(cancel=True)
        raise
    finally:
        writer.release_lock()


def stopped_line(cfg: HarvestConfig, writer: StoreWriter, signum: int) -> str:
    """What a stopped harvest kept and how to resume (workers that were killed mid-shard left it uncommitted)."""
    with contextlib.suppress(Exception):  # the line must come out even if the store cannot be read now
        done = f"{len(writer.committed_shards())}/{writer.layout.n_shards} shards are committed"
        return (f"harvest stopped by {signals.signal_name(signum)} ({signals.seconds_since_request():.1f} s after "
                f"the signal): {done} in {cfg.store}; re-run the same command to resume")
    return (f"harvest stopped by {signals.signal_name(signum)}: committed shards of {cfg.store} are kept; re-run "
            f"the same command to resume")


def _fill_store(cfg: HarvestConfig, dataset: ImageDataset, bb: Backbone, writer: StoreWriter, progress,
                log, parts: dict) -> dict:
    lay = writer.layout
    if writer.is_complete():
        return {"already_complete": True, "store": cfg.store, "n_shards": lay.n_shards}
    check_data_root(cfg, writer.meta.dataset.data_root)
    if writer.missing_constants(cfg.template_sets):
        t = time.perf_counter()
        classifiers = text_classifiers(bb, dataset.class_names, dataset.templates, cfg.template_sets)
        parts["text_classifier"] = time.perf_counter() - t
        writer.write_constants(head_weights(bb), classifiers,
                               mlp_weights(bb.blocks) if cfg.targets == "recompute" else None)
    todo = sorted(set(range(lay.n_shards)) - writer.committed_shards())
    resumed = lay.n_shards - len(todo)
    if resumed:
        log(f"resuming: {resumed}/{lay.n_shards} shards already committed")
    t0 = time.perf_counter()
    progress.start("harvest", sum(len(lay.shard_images(s)) for s in todo))
    try:
        if cfg.workers or cfg.scheduler:
            from clt_pipe.harvest.dask import harvest_with_dask

            counters = harvest_with_dask(cfg, todo, progress)
            counters.pop("stage_seconds", None)  # the workers' breakdown: for benchmarks, not the summary
        else:
            with signals.stop_point():
                counters = harvest_shards(cfg, writer, dataset, bb, todo, progress)
        if counters.get("stopped"):
            raise signals.Stopped(signals.requested())
    except signals.Stopped as e:
        raise signals.Stopped(e.signum, stopped_line(cfg, writer, e.signum)) from None
    finally:
        progress.stop()
    parts["images"] = time.perf_counter() - t0
    t = time.perf_counter()
    records = [dataset.record(i) for i in range(lay.n_images)]
    summary = writer.finalize(records, dataset.split)
    parts["finalize"] = time.perf_counter() - t
    summary.pop("checksums", None)  # COMPLETE.json's record of every finalised array: for readers, not people
    summary.pop("record_crc32c", None)
    return {**summary, **counters, "resumed_shards": resumed, "store": cfg.store}
