"""The harvest batch loop: images -> capture on the device -> (host copy) -> writer thread -> shard commits.

The forward pass runs on the device while a writer thread compresses and writes the previous batch (bounded
queue), and a thread pool decodes and preprocesses the next images: with a GPU the three overlap. Shards are the
unit of work, commit and resume: a shard's batches are fixed by the layout, so rewriting an uncommitted shard
reproduces bit for bit what an uninterrupted run writes.
"""

from __future__ import annotations

import dataclasses
import errno
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from clt_pipe.backbone.capture import Captured, run_capture
from clt_pipe.backbone.loading import Backbone
from clt_pipe.config import HarvestConfig
from clt_pipe.datasets.base import BadImageError, ImageDataset
from clt_pipe.errors import StoreError, describe_io_error
from clt_pipe.prefetch import prefetched
from clt_pipe.progress import NullProgress
from clt_pipe.store.stats import Moments, tensor_moments
from clt_pipe.store.writer import ShardWriter, StoreWriter


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

    def put(self, fn, *args, times=None):
        self.check()
        if times is None:
            self.q.put((fn, args))
            return
        with times.stage("wait: writer thread busy (queue full)"):
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
            loop.commits.wait()
        finally:
            loop.writer_thread.stop()
            loop.commits.stop()
            loop.prefetch.close()
    except OSError as e:
        raise disk_error(e, writer.loc.url) from None
    return loop.counters


class Commits:
    """Shard commits on their own thread, in order: the writer thread hands a finished shard over and goes on
    adding the next shard's batches while this one waits for its chunk writes and fsyncs (before, the writer
    thread itself waited there at every shard boundary, and the forward pass waited on the writer thread)."""

    def __init__(self, counters: dict):
        self.counters = counters
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="clt-commit")
        self.futures: list = []
        self.failed: BaseException | None = None

    def submit(self, sw: ShardWriter) -> None:
        self.check()
        self.futures.append(self.pool.submit(self._commit, sw))

    def _commit(self, sw: ShardWriter) -> None:
        if self.failed is not None:  # fail fast, as when commits ran one after another on the writer thread
            raise RuntimeError(f"shard {sw.shard} not committed: an earlier shard's commit failed")
        try:
            _commit(sw, self.counters)
        except BaseException as e:
            self.failed = e
            raise

    def check(self) -> None:
        """Raise the first failed commit (e.g. a chunk write that failed); forget the finished ones."""
        done = [f for f in self.futures if f.done()]
        for f in done:
            f.result()
        self.futures = [f for f in self.futures if not f.done()]

    def wait(self) -> None:
        for f in self.futures:
            f.result()
        self.futures = []

    def stop(self) -> None:
        """Idempotent; returns once no commit runs. After a failure elsewhere, shards already handed over are
        complete and still commit (less to redo on resume); after a failed commit none is attempted."""
        self.pool.shutdown(wait=True)


class ShardHarvest:
    """The batch loop: images -> capture on the device -> (host copy) -> writer thread -> shard commits."""

    def __init__(self, cfg: HarvestConfig, writer: StoreWriter, dataset: ImageDataset, bb: Backbone, progress):
        self.cfg, self.writer, self.dataset, self.bb, self.progress = cfg, writer, dataset, bb, progress
        self.layout = writer.layout
        self.tokens = writer.meta.tokens.policy  # parsed once, when the plan was made
        self.out_dtype = torch.float16 if cfg.dtype == "fp16" else torch.bfloat16
        self.image_shape = (3, *bb.identity.image_hw)
        self.prefetch = ImagePrefetcher(dataset, bb.preprocess, cfg.data_workers, cfg.on_bad_image == "skip")
        self.writer_thread = WriterThread()
        self.counters = {"images": 0, "tokens": 0, "bytes": 0, "shards": 0}
        self.commits = Commits(self.counters)
        self.times = writer.times

    def batches(self, shards: list[int]) -> list[tuple[int, range]]:
        """Fixed by the layout alone, so a rewritten shard is computed in exactly the same batches."""
        out = []
        for s in shards:
            imgs = self.layout.shard_images(s)
            out += [(s, range(b, min(b + self.cfg.batch_size, imgs.stop))) for b in range(imgs.start, imgs.stop,
                                                                                          self.cfg.batch_size)]
        return out

    def run(self, shards: list[int]) -> None:
        shard_writer: ShardWriter | None = None
        for (shard, idx), futures in prefetched(self.batches(shards), lambda b: self.prefetch.submit(b[1])):
            with self.times.stage("main: wait for decoded images"):
                images, ok, errors = self.prefetch.collect(futures, idx, self.image_shape)
            if shard_writer is None or shard_writer.shard != shard:
                shard_writer = self.writer.shard(shard)  # the previous one is committed and released
            self.commits.check()
            self.step(shard_writer, idx, images, ok, errors)
            if idx.stop == self.layout.shard_images(shard).stop:
                self.writer_thread.put(self.commits.submit, shard_writer)

    def step(self, sw: ShardWriter, idx: range, images: torch.Tensor, ok: np.ndarray, errors: dict) -> None:
        dev, lay = self.bb.device, self.layout
        positions = np.stack([self.tokens.positions(self.bb.identity.n_positions, i, self.cfg.seed) for i in idx])
        labels = np.array([self.dataset.record(i).label for i in idx], np.int32)
        images = images.to(dev, non_blocking=dev.type == "cuda")
        pos_t = torch.from_numpy(positions.astype(np.int64)).to(dev)
        # On CUDA these stages only queue kernels (the GPU's time shows up as "writer: wait for device->host copy").
        with self.times.stage("main: forward + hooks"):
            cap = run_capture(self.bb, images, pos_t, self.out_dtype, self.cfg.precision,
                              all_tokens=self.tokens.all_tokens)
        moments, event = None, None  # on CPU the writer thread computes the moments, overlapping the forward
        if dev.type == "cuda":
            # Statistics of exactly the stored values, on the GPU (free for the CPU); then an async host copy.
            with self.times.stage("main: statistics (GPU)"):
                good = torch.from_numpy(ok.astype(bool)).to(dev)
                moments = {side: tensor_moments(t[good].flatten(0, 1)) for side, t in (("in", cap.mlp_in),
                                                                                      ("out", cap.mlp_out))}
            if self.writer.recompute:  # only the batch's first image's outputs are kept (the shard's check)
                cap = dataclasses.replace(cap, mlp_out=cap.mlp_out[:1])
            with self.times.stage("main: device->host copy (pinned)"):
                cap = _copy_to_pinned_host(cap)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(dev))  # the copies' stream, also when dev is not current
        self.writer_thread.put(_write_batch, sw, idx.start, cap, event, labels, positions, ok, errors, moments,
                               times=self.times)
        n_tok = len(idx) * lay.tokens_per_image
        nbytes = lay.activation_bytes(len(self.writer.act_names), n_tok)
        for key, v in (("images", len(idx)), ("tokens", n_tok), ("bytes", nbytes)):
            self.counters[key] += v
        self.progress.advance(len(idx), images=len(idx), tokens=n_tok, MB=nbytes / 1e6)


def disk_error(e: OSError, url: str) -> StoreError:
    if e.errno == errno.ENOSPC:
        return StoreError(f"disk full while writing {url}; the shard in progress was not committed, "
                          f"free space and re-run the same command to resume")
    return StoreError(f"cannot write {url}: {describe_io_error(e)}; the shard in progress was not committed, "
                      f"fix that and re-run the same command to resume")


def _copy_to_pinned_host(cap):
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
        with sw.store.times.stage("writer: wait for device->host copy"):
            event.synchronize()
    host = None if moments is None else {side: Moments(n, mean.cpu().numpy(), m2.cpu().numpy())
                                         for side, (n, mean, m2) in moments.items()}
    sw.add(first, _np_activation(cap.mlp_in), _np_activation(cap.mlp_out), cap.resid_final.numpy(),
           cap.embedding.numpy(), labels, positions, ok, errors, moments=host)


def _commit(sw: ShardWriter, counters: dict):
    sw.commit()
    counters["shards"] += 1


