"""The harvest batch loop: images -> capture on the device -> (host copy) -> writer thread -> shard commits.

The forward pass runs on the device while a writer thread compresses and writes the previous batch (bounded
queue), and a thread pool decodes and preprocesses the next images: with a GPU the three overlap. Forward
batches are --batch-size images whatever the shard size; their rows are split into shards after the forward.
Shards are the unit of commit and resume: the forward batches and the write batches (how rows are added to a
shard, which fixes the order its statistics merge in) are fixed by the layout and the batch size, so rewriting an
uncommitted shard reproduces bit for bit what an uninterrupted run writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from clt_pipe import signals
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


class ForwardAbandoned(Exception):
    """A stop was requested during a forward pass: its rows would only complete shards after the process had
    to be gone, so the pass is dropped at the next block (the shards it held are redone on resume)."""


@contextlib.contextmanager
def abandon_on_stop(bb: Backbone):
    """Check for a stop request before each transformer block, so a stop waits for at most one block, not a
    whole forward of --batch-size images (ViT-B/32 on 2 CPU cores: ~3 s at 64, ~11 s at 256; docker's grace
    is 10 s)."""

    def check(module, args):
        if signals.requested() is not None:
            raise ForwardAbandoned

    handles = [blk.register_forward_pre_hook(check) for blk in bb.blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def harvest_shards(cfg: HarvestConfig, writer: StoreWriter, dataset: ImageDataset, bb: Backbone,
                   shards: list[int], progress=NullProgress()) -> dict:
    """Write (and commit) the given shards. Returns counters."""
    loop = ShardHarvest(cfg, writer, dataset, bb, progress)
    try:
        try:
            with abandon_on_stop(bb):
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
        self.partial: dict[int, list[Rows]] = {}  # the writer thread's pieces of unfinished write batches
        self.commits = Commits(self.counters)
        self.times = writer.times

    def forward_batches(self, shards: list[int]) -> list[range]:
        """Forward batches of --batch-size images on a grid over the whole dataset, not cut at shard boundaries
        (shards hold ~72 ViT-B/32 images at all tokens: cut there, a GPU never saw batches of 256): those that
        hold an image of ``shards``. The grid is fixed by the layout and the batch size, so a shard rewritten on
        resume is computed in the batches of an uninterrupted run (on a GPU a row's bits can depend on its
        batch); images of a batch outside ``shards`` are computed and dropped."""
        lay, size = self.layout, self.cfg.batch_size
        ids = sorted({k for s in shards for k in range(lay.shard_images(s).start // size,
                                                        (lay.shard_images(s).stop - 1) // size + 1)})
        return [range(k * size, min((k + 1) * size, lay.n_images)) for k in ids]

    def shard_cut_batches(self, shards: list[int]) -> list[range]:
        """The forward batches before issue 24: --batch-size images from each shard's start, cut at its end. Not
        used by the harvest; benchmarks and tests compare against it (more forwards; the same store bytes where
        the forward is batch-invariant)."""
        size, out = self.cfg.batch_size, []
        for s in shards:
            imgs = self.layout.shard_images(s)
            out += [range(b, min(b + size, imgs.stop)) for b in range(imgs.start, imgs.stop, size)]
        return out

    def pieces(self, idx: range, todo: set[int]) -> list[Piece]:
        """The rows of forward batch ``idx`` that go into the shards of ``todo``, cut where a shard ends and
        where a write batch ends: write batches are --batch-size images from the shard's start (the batches
        forwards were cut into before), so each shard's statistics merge in the same order as they did."""
        lay, size, out = self.layout, self.cfg.batch_size, []
        for s in range(idx.start // lay.images_per_shard, (idx.stop - 1) // lay.images_per_shard + 1):
            if s not in todo:
                continue
            imgs = lay.shard_images(s)
            a, stop = max(idx.start, imgs.start), min(idx.stop, imgs.stop)
            while a < stop:
                end = min(imgs.start + ((a - imgs.start) // size + 1) * size, imgs.stop)
                out.append(Piece(s, range(a, min(stop, end)), end))
                a = min(stop, end)
        return out

    def run(self, shards: list[int]) -> None:
        """Shards whose rows are all computed are committed; on a stop request (clt_pipe.signals) the forward in
        flight is dropped at its next block and the loop ends: the shards whose rows were all computed before are
        written and committed, a shard only partly computed is not (resume redoes it)."""
        todo, open_shards = set(shards), {}
        for idx, futures in prefetched(self.forward_batches(shards), self.prefetch.submit):
            with self.times.stage("main: wait for decoded images"):
                images, ok, errors = self.prefetch.collect(futures, idx, self.image_shape)
            if signals.requested() is not None:
                self.counters["stopped"] = True
                return
            self.commits.check()
            pieces = self.pieces(idx, todo)
            for p in pieces:
                if p.shard not in open_shards:
                    open_shards[p.shard] = self.writer.shard(p.shard)
            try:
                self.step(open_shards, idx, pieces, images, ok, errors)
            except ForwardAbandoned:
                self.counters["stopped"] = True
                return
            for p in pieces:
                if p.rows.stop == self.layout.shard_images(p.shard).stop:  # complete: commit, then release it
                    self.writer_thread.put(self.commits.submit, open_shards.pop(p.shard))

    def step(self, open_shards: dict[int, ShardWriter], idx: range, pieces: list[Piece], images: torch.Tensor,
             ok: np.ndarray, errors: dict) -> None:
        dev, lay = self.bb.device, self.layout
        positions = np.stack([self.tokens.positions(self.bb.identity.n_positions, i, self.cfg.seed) for i in idx])
        labels = np.array([self.dataset.record(i).label for i in idx], np.int32)
        images = images.to(dev, non_blocking=dev.type == "cuda")
        pos_t = torch.from_numpy(positions.astype(np.int64)).to(dev)
        # On CUDA these stages only queue kernels (the GPU's time shows up as "writer: wait for device->host copy").
        with self.times.stage("main: forward + hooks"):
            cap = run_capture(self.bb, images, pos_t, self.out_dtype, self.cfg.precision,
                              all_tokens=self.tokens.all_tokens)
        spans = [(p.rows.start - idx.start, p.rows.stop - idx.start) for p in pieces]
        moments, event, out_rows = [None] * len(pieces), None, spans
        if dev.type == "cuda":
            # Statistics of exactly the stored values, on the GPU (free for the CPU); then an async host copy.
            with self.times.stage("main: statistics (GPU)"):
                good = torch.from_numpy(ok.astype(bool)).to(dev)
                moments = [{side: tensor_moments(t[a:b][good[a:b]].flatten(0, 1))
                            for side, t in (("in", cap.mlp_in), ("out", cap.mlp_out))} for a, b in spans]
            if self.writer.recompute:  # only each piece's first image's outputs are kept (its shard's check)
                cap = dataclasses.replace(cap, mlp_out=cap.mlp_out[[a for a, _ in spans]])
                out_rows = [(j, j + 1) for j in range(len(spans))]
            with self.times.stage("main: device->host copy (pinned)"):
                cap = _copy_to_pinned_host(cap)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(dev))  # the copies' stream, also when dev is not current
        for p, (a, b), (oa, ob), m in zip(pieces, spans, out_rows, moments):
            part = Rows(p.rows.start, cap.mlp_in[a:b], cap.mlp_out[oa:ob], cap.resid_final[a:b], cap.embedding[a:b],
                        labels[a:b], positions[a:b], ok[a:b], {i: e for i, e in errors.items() if i in p.rows}, m)
            self.writer_thread.put(_write_rows, open_shards[p.shard], part, p.end, event, self.partial,
                                   times=self.times)
        n_img = sum(len(p.rows) for p in pieces)
        n_tok = n_img * lay.tokens_per_image
        nbytes = lay.activation_bytes(len(self.writer.act_names), n_tok)
        for key, v in (("images", n_img), ("tokens", n_tok), ("bytes", nbytes)):
            self.counters[key] += v
        self.progress.advance(n_img, images=n_img, tokens=n_tok, MB=nbytes / 1e6)


@dataclasses.dataclass(frozen=True)
class Piece:
    """Consecutive images of one forward batch that go into one shard and one write batch (ending at ``end``)."""

    shard: int
    rows: range
    end: int


@dataclasses.dataclass
class Rows:
    """A piece's captured rows on the host (``mlp_out``: only the first row when targets are recomputed on a GPU)
    and its statistics when the GPU computed them."""

    first: int
    mlp_in: object
    mlp_out: object
    resid_final: object
    embedding: object
    labels: np.ndarray
    positions: np.ndarray
    ok: np.ndarray
    errors: dict
    moments: dict | None

    def host(self) -> "Rows":
        """Numpy arrays in the storage dtype; moments as ``Moments``."""
        moments = None if self.moments is None else {
            side: Moments(n, mean.cpu().numpy(), m2.cpu().numpy()) for side, (n, mean, m2) in self.moments.items()}
        return dataclasses.replace(self, mlp_in=_np_activation(self.mlp_in), mlp_out=_np_activation(self.mlp_out),
                                   resid_final=self.resid_final.numpy(), embedding=self.embedding.numpy(),
                                   moments=moments)

    @staticmethod
    def join(parts: list["Rows"]) -> "Rows":
        """One write batch from the pieces that two forward batches computed (host arrays, in order)."""
        if len(parts) == 1:
            return parts[0]
        cat = {name: np.concatenate([getattr(p, name) for p in parts])
               for name in ("mlp_in", "mlp_out", "resid_final", "embedding", "labels", "positions", "ok")}
        moments = None
        if parts[0].moments is not None:
            moments = dict(parts[0].moments)
            for p in parts[1:]:
                moments = {side: m.merge(p.moments[side]) for side, m in moments.items()}
        return Rows(parts[0].first, **cat, errors={k: v for p in parts for k, v in p.errors.items()},
                    moments=moments)


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


def _write_rows(sw: ShardWriter, part: Rows, end: int, event, partial: dict[int, list[Rows]]):
    """On the writer thread: add a write batch to its shard once all of its pieces are here (``partial`` holds
    the pieces of a write batch that the next forward batch completes)."""
    if event is not None:  # on CUDA: wait for this batch's device->host copy, not for the device
        with sw.store.times.stage("writer: wait for device->host copy"):
            event.synchronize()
    parts = partial.setdefault(sw.shard, [])
    parts.append(part.host())
    if part.first + len(part.ok) < end:
        return
    rows = Rows.join(partial.pop(sw.shard))
    sw.add(rows.first, rows.mlp_in, rows.mlp_out, rows.resid_final, rows.embedding, rows.labels, rows.positions,
           rows.ok, rows.errors, moments=rows.moments)


def _commit(sw: ShardWriter, counters: dict):
    sw.commit()
    counters["shards"] += 1


