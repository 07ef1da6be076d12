"""`clt-pipe harvest`: images -> CLIP ViT -> activation store.

The forward pass runs on the device while a writer thread compresses and writes the previous batch
(bounded queue), and a thread pool decodes and preprocesses the next images: with the GPU the three overlap.
Shards are the unit of work, commit and resume: a shard's batches are fixed by the layout, so rewriting an
uncommitted shard reproduces bit for bit what an uninterrupted run writes.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from clt_pipe.backbone.capture import run_capture, token_positions
from clt_pipe.backbone.loading import Backbone, load_backbone, resolve_device
from clt_pipe.config import HarvestConfig, parse_token_policy
from clt_pipe.datasets.base import BadImageError, ImageDataset
from clt_pipe.datasets.registry import open_dataset
from clt_pipe.errors import CltPipeError, StoreError
from clt_pipe.precision import resolve_precision
from clt_pipe.progress import NullProgress
from clt_pipe.store import format as F
from clt_pipe.store.stats import Moments, tensor_moments
from clt_pipe.store.targets import mlp_activation, mlp_weights
from clt_pipe.store.writer import ShardWriter, StoreWriter


@dataclass
class HarvestPlan:
    layout: F.StoreLayout
    bytes_uncompressed: int


def open_inputs(cfg: HarvestConfig) -> tuple[ImageDataset, Backbone]:
    dataset = open_dataset(cfg.dataset, cfg.data_root, cfg.split, coco_label_rule=cfg.coco_label_rule)
    bb = load_backbone(cfg.model, cfg.pretrained, resolve_device(cfg.device))
    return dataset, bb


def n_images(cfg: HarvestConfig, dataset: ImageDataset) -> int:
    return min(len(dataset), cfg.limit) if cfg.limit else len(dataset)


def plan(cfg: HarvestConfig, dataset: ImageDataset, bb: Backbone) -> HarvestPlan:
    policy, k = parse_token_policy(cfg.tokens)
    n_pos = bb.identity["n_positions"]
    T = len(token_positions(policy, k, n_pos, 0, cfg.seed))
    L, d = bb.identity["n_layers"], bb.identity["d_model"]
    layout = F.StoreLayout.plan(n_images(cfg, dataset), T, L, d, 2, cfg.chunk_mb, cfg.chunks_per_shard)
    n_arrays = 1 if cfg.targets == "recompute" else 2
    return HarvestPlan(layout, n_arrays * layout.n_tokens * L * d * 2)


@torch.inference_mode()
def text_classifiers(bb: Backbone, class_names: list[str], templates: dict[str, list[str]],
                     sets: list[str]) -> dict[str, np.ndarray]:
    """Per template set: the mean of normalised prompt embeddings per class, renormalised ([C, e])."""
    out = {}
    for name in sets:
        if name not in templates:
            raise CltPipeError(f"template_sets: {name!r} is not a template set of this dataset "
                               f"(has: {', '.join(templates)})")
        rows = []
        for c in class_names:
            tokens = bb.tokenizer([t.replace("{c}", c) for t in templates[name]]).to(bb.device)
            emb = bb.model.encode_text(tokens).float()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(0)
            rows.append((mean / mean.norm()).cpu().numpy())
        out[name] = np.stack(rows)
    return out


def sources_sha256(dataset: ImageDataset, n: int) -> str:
    """Identifies the exact images (and labels) of a harvest: another dataset of the same shape differs here."""
    h = hashlib.sha256()
    for i in range(n):
        r = dataset.record(i)
        h.update(f"{r.source}\t{r.label}\n".encode())
    return h.hexdigest()


def store_meta(cfg: HarvestConfig, dataset: ImageDataset, bb: Backbone, hp: HarvestPlan) -> dict:
    policy, k = parse_token_policy(cfg.tokens)
    pre = bb.visual.preprocess_cfg if hasattr(bb.visual, "preprocess_cfg") else {}
    return {
        "model": bb.identity,
        "preprocess": {k2: (list(v) if isinstance(v, tuple) else v) for k2, v in pre.items()},
        "dataset": {"name": dataset.name, "split": dataset.split, "n_images": hp.layout.n_images,
                    "class_names": list(dataset.class_names), "data_root": cfg.data_root,
                    "coco_label_rule": cfg.coco_label_rule if dataset.name == "coco" else None,
                    "sources_sha256": sources_sha256(dataset, hp.layout.n_images)},
        "templates": {k2: list(v) for k2, v in dataset.templates.items()},
        "tokens": {"policy": policy if policy != "cls+k" else f"cls+{k}", "k": k,
                   "tokens_per_image": hp.layout.tokens_per_image, "seed": cfg.seed},
        # The forward's precision is identity: resuming a CPU (fp32) harvest on a GPU (bf16 autocast) would mix
        # slightly different activations in one store.
        "activations": {"dtype": cfg.dtype, "storage_dtype": str(F.storage_dtype(cfg.dtype)),
                        "compressor": cfg.compressor, "forward_precision": resolve_precision(bb.device, cfg.precision),
                        # Only a recompute store names its targets, so stored-target identities stay as they were.
                        **({"targets": "recompute", "mlp_activation": mlp_activation(bb.blocks)}
                           if cfg.targets == "recompute" else {}),
                        "mlp_in": "ln_2 output (MLP input)", "mlp_out": "mlp output (before ls_2 and the residual add)"},
        "layout": hp.layout.to_dict(),
    }


def head_weights(bb: Backbone) -> dict[str, np.ndarray]:
    v = bb.visual
    return {"ln_post_weight": v.ln_post.weight.detach().float().cpu().numpy(),
            "ln_post_bias": v.ln_post.bias.detach().float().cpu().numpy(),
            "proj": v.proj.detach().float().cpu().numpy()}


class ImagePrefetcher:
    """Decodes and preprocesses images in a thread pool, one batch ahead of the forward pass."""

    def __init__(self, dataset: ImageDataset, preprocess, workers: int, skip_bad: bool):
        self.dataset = dataset
        self.preprocess = preprocess
        self.skip_bad = skip_bad
        self.pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="clt-img")

    def _load(self, i: int):
        try:
            return self.preprocess(self.dataset.load_image(i)), None
        except BadImageError as e:
            if not self.skip_bad:
                raise
            return None, str(e)

    def submit(self, indices: range):
        return [self.pool.submit(self._load, i) for i in indices]

    @staticmethod
    def collect(futures, indices: range, image_shape) -> tuple[torch.Tensor, np.ndarray, dict[int, str]]:
        tensors, ok, errors = [], np.ones(len(indices), np.uint8), {}
        for j, (i, fut) in enumerate(zip(indices, futures)):
            t, err = fut.result()
            if t is None:
                ok[j], errors[i] = 0, err
                t = torch.zeros(image_shape)
            tensors.append(t)
        return torch.stack(tensors), ok, errors

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)


class WriterThread:
    """Consumes captured batches; the bounded queue lets one batch compress while the next one computes."""

    def __init__(self, depth: int = 2):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="clt-writer", daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain after a failure; the main thread raises it
            fn, args = item
            try:
                fn(*args)
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                self.error = e

    def put(self, fn, *args):
        self.check()
        self.q.put((fn, args))

    def check(self):
        if self.error is not None:
            raise self.error

    def close(self):
        self.stop()
        self.check()

    def stop(self):
        """Idempotent: let the thread finish what is queued and exit."""
        if self.thread.is_alive():
            self.q.put(None)
            self.thread.join()


def harvest_shards(cfg: HarvestConfig, writer: StoreWriter, dataset: ImageDataset, bb: Backbone,
                   shards: list[int], progress=NullProgress()) -> dict:
    """Write (and commit) the given shards. Returns counters."""
    loop = ShardHarvest(cfg, writer, dataset, bb, progress)
    try:
        try:
            loop.run(shards)
            loop.writer_thread.close()
        finally:
            loop.writer_thread.stop()
            loop.prefetch.close()
    except OSError as e:
        raise _disk_error(e, writer.loc.url) from None
    return loop.counters


class ShardHarvest:
    """The batch loop: images -> capture on the device -> (host copy) -> writer thread -> shard commits."""

    def __init__(self, cfg: HarvestConfig, writer: StoreWriter, dataset: ImageDataset, bb: Backbone, progress):
        self.cfg, self.writer, self.dataset, self.bb, self.progress = cfg, writer, dataset, bb, progress
        self.layout = writer.layout
        self.policy, self.k = parse_token_policy(cfg.tokens)
        self.out_dtype = torch.float16 if cfg.dtype == "fp16" else torch.bfloat16
        img = bb.identity["image_size"]
        self.image_shape = (3, *(tuple(img) if isinstance(img, list) else (img, img)))
        self.prefetch = ImagePrefetcher(dataset, bb.preprocess, cfg.data_workers, cfg.on_bad_image == "skip")
        self.writer_thread = WriterThread()
        self.counters = {"images": 0, "tokens": 0, "bytes": 0, "shards": 0}

    def batches(self, shards: list[int]) -> list[tuple[int, range]]:
        """Fixed by the layout alone, so a rewritten shard is computed in exactly the same batches."""
        out = []
        for s in shards:
            imgs = self.layout.shard_images(s)
            out += [(s, range(b, min(b + self.cfg.batch_size, imgs.stop))) for b in range(imgs.start, imgs.stop,
                                                                                          self.cfg.batch_size)]
        return out

    def run(self, shards: list[int]) -> None:
        batches = self.batches(shards)
        pending = self.prefetch.submit(batches[0][1]) if batches else None
        shard_writer: ShardWriter | None = None
        for bi, (shard, idx) in enumerate(batches):
            futures = pending
            pending = self.prefetch.submit(batches[bi + 1][1]) if bi + 1 < len(batches) else None
            images, ok, errors = self.prefetch.collect(futures, idx, self.image_shape)
            if shard_writer is None or shard_writer.shard != shard:
                shard_writer = self.writer.shard(shard)  # the previous one is committed and released
            self.step(shard_writer, idx, images, ok, errors)
            if idx.stop == self.layout.shard_images(shard).stop:
                self.writer_thread.put(_commit, shard_writer, self.counters)

    def step(self, sw: ShardWriter, idx: range, images: torch.Tensor, ok: np.ndarray, errors: dict) -> None:
        dev, lay = self.bb.device, self.layout
        positions = np.stack([token_positions(self.policy, self.k, self.bb.identity["n_positions"], i,
                                              self.cfg.seed) for i in idx])
        labels = np.array([self.dataset.record(i).label for i in idx], np.int32)
        images = images.to(dev, non_blocking=dev.type == "cuda")
        pos_t = torch.from_numpy(positions.astype(np.int64)).to(dev)
        cap = run_capture(self.bb, images, pos_t, self.out_dtype, self.cfg.precision, all_tokens=self.policy == "all")
        moments, event = None, None  # on CPU the writer thread computes the moments, overlapping the forward
        if dev.type == "cuda":
            # Statistics of exactly the stored values, on the GPU (free for the CPU); then an async host copy.
            good = torch.from_numpy(ok.astype(bool)).to(dev)
            moments = {side: tensor_moments(t[good].flatten(0, 1)) for side, t in (("in", cap.mlp_in),
                                                                                  ("out", cap.mlp_out))}
            if self.writer.recompute:  # only the batch's first image's outputs are kept (the shard's check)
                cap = dataclasses.replace(cap, mlp_out=cap.mlp_out[:1])
            cap = _copy_to_pinned_host(cap)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(dev))  # the copies' stream, also when dev is not current
        self.writer_thread.put(_write_batch, sw, idx.start, cap, event, labels, positions, ok, errors, moments)
        n_tok = len(idx) * lay.tokens_per_image
        nbytes = len(self.writer.act_names) * n_tok * lay.n_layers * lay.d_model * 2
        for key, v in (("images", len(idx)), ("tokens", n_tok), ("bytes", nbytes)):
            self.counters[key] += v
        self.progress.advance(len(idx), images=len(idx), tokens=n_tok, MB=nbytes / 1e6)


def _disk_error(e: OSError, url: str) -> StoreError:
    what = "disk full" if e.errno == errno.ENOSPC else f"write failed ({e.strerror or e})"
    return StoreError(f"{what} while writing {url}; the shard in progress was not committed, "
                      f"free space and re-run the same command to resume")


def _copy_to_pinned_host(cap):
    from clt_pipe.backbone.capture import Captured

    def host(t):
        h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        h.copy_(t, non_blocking=True)
        return h

    return Captured(host(cap.mlp_in), host(cap.mlp_out), host(cap.resid_final), host(cap.embedding))


def _np_activation(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _write_batch(sw: ShardWriter, first: int, cap, event, labels, positions, ok, errors, moments):
    if event is not None:  # on CUDA: wait for this batch's device->host copy, not for the device
        event.synchronize()
    host = None if moments is None else {side: Moments(n, mean.cpu().numpy(), m2.cpu().numpy())
                                         for side, (n, mean, m2) in moments.items()}
    sw.add(first, _np_activation(cap.mlp_in), _np_activation(cap.mlp_out), cap.resid_final.numpy(),
           cap.embedding.numpy(), labels, positions, ok, errors, moments=host)


def _commit(sw: ShardWriter, counters: dict):
    sw.commit()
    counters["shards"] += 1


def estimate_seconds_per_image(bb: Backbone, batch_size: int, precision: str) -> float:
    """Time one forward on random pixels (after a warm-up) - for --dry-run."""
    img = bb.identity["image_size"]
    hw = tuple(img) if isinstance(img, list) else (img, img)
    x = torch.randn(min(batch_size, 8), 3, *hw, device=bb.device)
    pos = torch.zeros(x.shape[0], 1, dtype=torch.long, device=bb.device)
    run_capture(bb, x, pos, torch.float16, precision)
    t0 = time.perf_counter()
    run_capture(bb, x, pos, torch.float16, precision)
    if bb.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / x.shape[0]


def run_harvest(cfg: HarvestConfig, progress=NullProgress(), log=print) -> dict:
    dataset, bb = open_inputs(cfg)
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
        return _write_store(cfg, dataset, bb, meta, progress, log)
    except OSError as e:
        raise _disk_error(e, cfg.store) from None


def _write_store(cfg: HarvestConfig, dataset: ImageDataset, bb: Backbone, meta: dict, progress, log) -> dict:
    writer = StoreWriter.open(cfg.store, meta, overwrite=cfg.overwrite, write_threads=cfg.write_threads)
    try:
        return _fill_store(cfg, dataset, bb, writer, progress, log)
    except BaseException:
        writer.close(cancel=True)
        raise


def _fill_store(cfg: HarvestConfig, dataset: ImageDataset, bb: Backbone, writer: StoreWriter, progress,
                log) -> dict:
    lay = writer.layout
    if writer.is_complete():
        return {"already_complete": True, "store": cfg.store, "n_shards": lay.n_shards}
    if writer.missing_constants(cfg.template_sets):
        classifiers = text_classifiers(bb, dataset.class_names, dataset.templates, cfg.template_sets)
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
            from clt_pipe.scale.dask_harvest import harvest_with_dask

            counters = harvest_with_dask(cfg, todo, progress)
        else:
            counters = harvest_shards(cfg, writer, dataset, bb, todo, progress)
    finally:
        progress.stop()
    elapsed = time.perf_counter() - t0
    records = [dataset.record(i) for i in range(lay.n_images)]
    summary = writer.finalize(records, dataset.split)
    return {**summary, **counters, "seconds": elapsed, "resumed_shards": resumed, "store": cfg.store}
