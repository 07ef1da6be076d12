"""Harvest with several writers: dask.distributed workers each own disjoint shard ranges.

The client has already created the store (arrays at final size); each worker loads the model once, opens
the same store (its fingerprint must match what the worker computes itself, so a worker with other weights
or data refuses) and writes and commits only its shards. Nobody writes the same object twice, so no locks.
With CUDA, worker i uses GPU i mod n_gpus: several workers on one GPU share it (``--workers 2`` on a one-GPU
node runs two forwards and two writer paths side by side).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

from clt_pipe.config import HarvestConfig, build
from clt_pipe.harvest.loop import harvest_shards
from clt_pipe.harvest.plan import open_inputs, plan, store_meta
from clt_pipe.store.timing import StageTimes
from clt_pipe.store.writer import StoreWriter, default_write_threads


def _worker_index() -> int:
    try:
        from distributed import get_worker

        return int(str(get_worker().name).rsplit("-", 1)[-1])
    except (ImportError, ValueError):  # not in a worker, or a worker named without a trailing number
        return 0


def _worker_device(device: str, index: int | None = None) -> str:
    """The device of worker ``index``: an explicit "cuda:N" is kept, "cuda"/"auto" spread workers round-robin
    over the visible GPUs (so more workers than GPUs share them)."""
    if device.startswith("cuda:") or (not device.startswith("cuda") and device != "auto"):
        return device
    import torch

    if not torch.cuda.is_available():
        return "cpu" if device == "auto" else device  # resolve_device says that there is no CUDA device
    index = _worker_index() if index is None else index
    return f"cuda:{index % torch.cuda.device_count()}"


_INPUTS: dict[str, tuple] = {}  # per worker process: its model, loaded once for all of its shard groups


def _inputs(cfg: HarvestConfig) -> tuple:
    key = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
    if key not in _INPUTS:
        _INPUTS.clear()  # another harvest in the same worker: drop the previous model
        dataset, bb = open_inputs(cfg)
        _INPUTS[key] = (dataset, bb, store_meta(cfg, dataset, bb, plan(cfg, dataset, bb)))
    return _INPUTS[key]


def harvest_shard_group(cfg_dict: dict, shards: list[int], torch_threads: int = 0) -> dict:
    if torch_threads:  # local workers share the node's cores (the nanny starts them with 1 OpenMP thread)
        import torch

        torch.set_num_threads(torch_threads)
    cfg = build(HarvestConfig, cfg_dict)
    cfg = dataclasses.replace(cfg, device=_worker_device(cfg.device))
    dataset, bb, meta = _inputs(cfg)
    writer = StoreWriter.open(cfg.store, meta, clean_temp=False, write_threads=cfg.write_threads)
    try:
        # A group dask retries after its worker died (SIGTERM, preemption) skips what that worker committed.
        shards = sorted(set(shards) - writer.committed_shards())
        counters = harvest_shards(cfg, writer, dataset, bb, shards)
    except BaseException:
        writer.close(cancel=True)
        raise
    writer.close()
    return {**counters, "stage_seconds": writer.times.as_dict()}


def harvest_with_dask(cfg: HarvestConfig, todo: list[int], progress=None) -> dict:
    from distributed import Client, LocalCluster, as_completed

    cfg_dict = dataclasses.asdict(cfg)
    cfg_dict.update(workers=0, scheduler="", overwrite=False)  # workers write into the store the client made
    torch_threads = 0
    if cfg.workers and not cfg.scheduler:  # local workers share this node's cores (and memory bound)
        torch_threads = max(1, (os.cpu_count() or 1) // cfg.workers)
        if not cfg.write_threads:
            cfg_dict["write_threads"] = max(1, default_write_threads() // cfg.workers)
    if cfg.scheduler:
        client, cluster = Client(cfg.scheduler), None
    else:
        cluster = LocalCluster(n_workers=cfg.workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=logging.CRITICAL)
        client = Client(cluster)
    try:
        n_workers = max(1, len(client.scheduler_info()["workers"]))
        # A few groups per worker, so one slow worker does not hold a large tail of the work. Each group is a run
        # of consecutive shards: forward batches span shards (harvest/loop.py), and a batch's images outside
        # the group are computed and dropped, so interleaved groups would compute most images several times.
        n_groups = min(len(todo), 2 * n_workers)
        groups = [todo[len(todo) * i // n_groups:len(todo) * (i + 1) // n_groups] for i in range(n_groups)]
        futures = [client.submit(harvest_shard_group, cfg_dict, g, torch_threads, pure=False) for g in groups]
        totals = {"images": 0, "tokens": 0, "bytes": 0, "shards": 0}
        times = StageTimes()  # summed over the workers' groups
        for fut in as_completed(futures):
            counters = fut.result()
            for k in totals:
                totals[k] += counters.get(k, 0)
            times.merge(counters.get("stage_seconds", {}))
            if progress is not None:
                progress.advance(counters.get("images", 0), images=counters.get("images", 0))
        totals["workers"] = n_workers
        totals["stage_seconds"] = times.as_dict()
        return totals
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
