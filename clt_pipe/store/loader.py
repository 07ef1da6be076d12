"""Shuffled training batches streamed from a store.

Order: a seeded permutation of the (training) chunks per epoch → windows of ``shuffle_chunks`` chunks from
across the whole store, one window read ahead by a thread pool (zarr/blosc decode releases the GIL) → a
*stratified* permutation of the window's rows → batches of B rows. Rows are never gathered from disk one by
one: whole chunks are read, and the permutation indexes memory.

Mixing. Chunks hold whole images, so a batch can only draw on the images of its window. The window is sized to
hold ``MIX_IMAGES`` · B images (bounded by a memory budget, ``shuffle_memory``), and its rows are ordered by
(random rank of the row within its image, random key): consecutive rows then come from distinct images, so a
batch touches about B images (uniform sampling from the whole store touches slightly fewer), where a plain
row permutation of the same window would touch ~B·(1 - e^{-x})/x with x the rows per image a batch expects.

Device data path. The host only decodes chunks. On CUDA they go, as stored (fp16, or bf16 bits), through a
small ring of pinned staging buffers and non-blocking copies on a side stream into a device-resident window,
while the previous window trains; the batch gather (``index_select``) and the widening to float32 run on the
GPU. On CPU the window is decoded straight into host memory and the same torch ops run there. Targets are
recomputed from the inputs on the device when the store keeps MLP weights instead of mlp_out.

Kept rows. When the training split's decoded rows fit a memory budget (``keep_memory``; store/keep.py), each
chunk is decoded once into a tensor that lives for the whole fit, and the epochs after the first gather their
windows' rows from it instead of decoding the store again: same windows, same row order, same batches.

A window's last partial batch is dropped, which keeps the position a tiny ``(epoch, window, batch)`` triple
(plus the window size, which the auto sizing may pick differently on another machine) that a checkpoint
restores exactly.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch

from clt_pipe.errors import CltPipeError, StoreError
from clt_pipe.store.keep import STORE, KeptRows, plan_keep
from clt_pipe.store.reader import ActivationStore

HOLDOUT_SALT = 0x5EED  # the held-out chunks do not change with the training seed
PREFETCH_WINDOWS = 1  # windows being read while the current one is consumed (memory: 2 windows)
MIX_IMAGES = 1.5  # images per window, in batches: ≥ 0.8x the distinct images of uniform sampling (see above)
MEMORY_SHARE = 0.25  # auto budget: this share of free device memory (CUDA) or available host memory (CPU)
STAGING_CHUNKS = 8  # chunks per pinned staging buffer (CUDA); two buffers alternate


def split_chunks(n_chunks: int, holdout: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) chunk ids. Chunks hold whole images, so this is a split by image."""
    perm = np.random.default_rng(HOLDOUT_SALT).permutation(n_chunks)
    n_held = int(round(holdout * n_chunks))
    if holdout > 0 and n_held == 0:
        n_held = 1
    return np.sort(perm[n_held:]), np.sort(perm[:n_held])


def stratified_order(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A permutation of the rows that visits every image once per round: rows sorted by (random rank of the row
    within its image, random key). ``image`` holds each row's image id, rows of one image contiguous."""
    n = len(image)
    if n == 0:
        return np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, image[1:] != image[:-1]])
    counts = np.diff(np.r_[starts, n])
    # Random rank within each image: positions of a per-image shuffle (rows stay in their image's block).
    within = np.lexsort((rng.random(n), np.repeat(np.arange(len(starts)), counts)))
    rank = np.empty(n, np.int64)
    rank[within] = np.arange(n) - np.repeat(starts, counts)
    return np.lexsort((rng.random(n), rank))


def available_memory(device: torch.device) -> int:
    """Bytes free on the device (CUDA) or available to this process on the host (CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


@dataclass
class Batch:
    x: torch.Tensor  # [B, L, d] float32 on the device: MLP inputs
    y: torch.Tensor  # [B, L, d] float32: MLP outputs
    image: np.ndarray  # [B] image index of each row
    tier: str = STORE  # where the rows came from: "store" (decoded), "memory host" or "memory device" (kept)

    @property
    def image_diversity(self) -> float:
        """Distinct images / rows: how well the shuffle mixes (1.0 = every row from another image)."""
        return len(np.unique(self.image)) / len(self.image)


@dataclass
class _Window:
    """A window being read: ``x``/``y`` in the store's dtype on the loader's device, filled once ``done``."""
    x: torch.Tensor
    y: torch.Tensor | None
    image: np.ndarray
    order: np.ndarray
    futures: list[Future]
    rows: np.ndarray | None = None  # kept rows: the row of x that holds each window row (None: x is the window)
    tier: str = STORE

    def result(self) -> "_Window":
        for f in self.futures:
            f.result()
        return self


class ChunkLoader:
    def __init__(self, store: ActivationStore, batch_size: int, *, tokens: str = "all", split: str = "train",
                 holdout: float = 0.0, seed: int = 0, shuffle_chunks: int = 0, shuffle_memory: float = 0.0,
                 read_threads: int = 4, device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1,
                 keep_rows: bool = True, keep_memory: float = 0.0):
        self.store = store
        self.batch_size = batch_size
        self.tokens = tokens
        self.seed = seed
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        train, held = split_chunks(store.layout.n_chunks, holdout)
        self.chunks = {"train": train, "heldout": held, "all": np.arange(store.layout.n_chunks)}[split]
        if len(self.chunks) == 0:
            raise CltPipeError(f"no chunks in split {split!r}")
        self._valid_rows = {int(c): int(store.token_type_mask(int(c), tokens).sum()) for c in self.chunks}
        self.rows_per_epoch = sum(self._valid_rows.values())
        if self.rows_per_epoch < batch_size:
            raise CltPipeError(f"split {split!r} holds {self.rows_per_epoch} {tokens} rows, fewer than one batch "
                               f"of {batch_size}")
        self.shuffle_chunks = self.plan_window(shuffle_chunks, shuffle_memory)
        self.read_threads = max(1, read_threads)
        self.pool = ThreadPoolExecutor(self.read_threads, thread_name_prefix="clt-read")
        self._closed = False
        self.epoch, self.window, self.batch_in_window = 0, 0, 0
        self._cuda = self.device.type == "cuda"
        self._np_dtype = store.array("mlp_in").dtype  # float16, or uint16 holding bf16 bits
        self._dtype = torch.float16 if self._np_dtype == np.float16 else torch.int16  # same bytes in torch
        self._targets = store.targets_on(self.device) if store.recompute else None
        self._staging: list | None = None
        # Every rank keeps the whole split (the windows move between ranks each epoch); ranks on one CPU host
        # share its memory.
        self.keep_plan = plan_keep(keep_rows, self.rows_per_epoch * self.row_bytes(), keep_memory,
                                   available_memory(self.device), device=self.device,
                                   shared_by=world_size if self.device.type == "cpu" else 1)
        self._kept: KeptRows | None = None
        self.served: dict[int, set[str]] = {}  # epoch -> the tiers its windows came from
        self._staging_lock = threading.Lock()  # one window read at a time uses the staging buffers
        self._early: tuple[int, int, _Window] | None = None  # a first window read before iteration (start-up)
        # Seconds the consumer waited on window reads: where a slow input pipeline shows up.
        self.waits = {"read_s": 0.0, "gather_s": 0.0}

    # ---- window size -------------------------------------------------------------------------------------
    def row_bytes(self) -> int:
        lay = self.store.layout
        return lay.n_layers * lay.d_model * 2 * (1 if self.store.recompute else 2)

    def plan_window(self, shuffle_chunks: int, shuffle_memory: float) -> int:
        """Chunks per window: ``shuffle_chunks`` if set, else enough for MIX_IMAGES · B images within the memory
        budget (``shuffle_memory`` GiB, or MEMORY_SHARE of what is free; two windows are resident at once);
        always at least two batches' rows, and at most what leaves every rank a window."""
        n = len(self.chunks)
        rows_per_chunk = self.rows_per_epoch / n
        if shuffle_chunks > 0:
            win = shuffle_chunks
        else:
            lay = self.store.layout
            images = sum(len(lay.chunk_images(int(c))) for c in self.chunks)
            want = math.ceil(MIX_IMAGES * self.batch_size / (images / n))
            budget = shuffle_memory * 2**30 if shuffle_memory > 0 else MEMORY_SHARE * available_memory(self.device)
            cap = int(budget // (2 * max(rows_per_chunk, 1) * self.row_bytes()))
            win = max(1, min(want, cap))
        win = max(win, math.ceil(2 * self.batch_size / max(rows_per_chunk, 1)))
        win = min(win, max(1, n // self.world_size))
        if len(range(self.rank, -(-n // win), self.world_size)) == 0:
            raise CltPipeError(f"rank {self.rank} of {self.world_size} has no chunks to read: the split has {n} "
                               f"chunks; use at most {n} ranks")
        return win

    def set_window_chunks(self, n: int) -> None:
        """Use another window size (ranks agree on the smallest, a resume restores the saved one)."""
        self.shuffle_chunks = n

    # ---- position ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "window": self.window, "batch_in_window": self.batch_in_window,
                "seed": self.seed, "window_chunks": self.shuffle_chunks}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise ValueError("loader state was saved with another seed")
        self.epoch, self.window, self.batch_in_window = state["epoch"], state["window"], state["batch_in_window"]
        if "window_chunks" in state:
            self.shuffle_chunks = int(state["window_chunks"])

    # ---- reading -------------------------------------------------------------------------------------
    def _windows(self, epoch: int) -> list[np.ndarray]:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.chunks)
        wins = [order[i:i + self.shuffle_chunks] for i in range(0, len(order), self.shuffle_chunks)]
        return wins[self.rank::self.world_size]

    def _chunk_images(self, chunk: int) -> np.ndarray:
        """The image index of every row of a chunk."""
        lay = self.store.layout
        return lay.chunk_images(chunk).start + np.arange(len(lay.chunk_rows(chunk))) // lay.tokens_per_image

    def _is_whole(self, chunk: int) -> bool:
        return self._valid_rows[chunk] == len(self.store.layout.chunk_rows(chunk))

    def _read_into(self, chunks: list[tuple[int, int]], x: np.ndarray, y: np.ndarray | None) -> None:
        """Chunks' wanted rows into ``x``/``y`` at the given offsets: whole chunks decoded by zarr straight into
        place in one call (zarr decodes them concurrently), token-filtered ones decoded then compressed."""
        whole = [(c, at) for c, at in chunks if self._is_whole(c)]
        pieces = [(c, x[at:at + self._valid_rows[c]], None if y is None else y[at:at + self._valid_rows[c]])
                  for c, at in whole]
        if pieces:
            self.store.read_chunks_into(pieces)
        for c, at in chunks:
            if self._is_whole(c):
                continue
            mask = self.store.token_type_mask(c, self.tokens)
            n = int(mask.sum())
            cx, cy = self.store.read_chunk(c)
            np.compress(mask, cx, axis=0, out=x[at:at + n])
            if cy is not None:
                np.compress(mask, cy, axis=0, out=y[at:at + n])

    def _np(self, t: torch.Tensor | None) -> np.ndarray | None:
        """A host tensor as numpy in the store's dtype (the bytes zarr decodes into)."""
        return None if t is None else t.numpy().view(self._np_dtype)

    def _staging_buffers(self) -> list:
        if self._staging is None:
            lay = self.store.layout
            rows = STAGING_CHUNKS * lay.rows_per_chunk
            shape = (rows, lay.n_layers, lay.d_model)
            self._staging = [
                [torch.empty(shape, dtype=self._dtype, pin_memory=True),
                 None if self.store.recompute else torch.empty(shape, dtype=self._dtype, pin_memory=True),
                 None]  # the event that marks the end of the buffer's last copy
                for _ in range(2)]
        return self._staging

    def _read_cuda(self, chunks: list[tuple[int, int]], x: torch.Tensor, y: torch.Tensor | None,
                   writable: "torch.cuda.Event") -> None:
        """Groups of chunks decoded into pinned staging buffers, each copied without blocking into the device
        window on a side stream while the next group decodes; returns once every copy has landed."""
        with self._staging_lock:  # a dropped early read may still be running
            self._read_cuda_staged(chunks, x, y, writable)

    def _read_cuda_staged(self, chunks: list[tuple[int, int]], x: torch.Tensor, y: torch.Tensor | None,
                          writable: "torch.cuda.Event") -> None:
        stream = torch.cuda.Stream(self.device)
        stream.wait_event(writable)  # the memory's previous users on the training stream are done
        staging = self._staging_buffers()
        for g, i in enumerate(range(0, len(chunks), STAGING_CHUNKS)):
            if self._closed:
                break
            group = chunks[i:i + STAGING_CHUNKS]
            buf = staging[g % 2]
            if buf[2] is not None:
                buf[2].synchronize()
            first = group[0][1]
            n = sum(self._valid_rows[c] for c, _ in group)
            local = [(c, at - first) for c, at in group]
            self._read_into(local, self._np(buf[0]), self._np(buf[1]))
            with torch.cuda.stream(stream):
                x[first:first + n].copy_(buf[0][:n], non_blocking=True)
                if y is not None:
                    y[first:first + n].copy_(buf[1][:n], non_blocking=True)
                buf[2] = torch.cuda.Event()
                buf[2].record(stream)
        stream.synchronize()

    def _submit(self, epoch: int, window: int, chunks: np.ndarray) -> _Window:
        lay = self.store.layout
        counts = [self._valid_rows[int(c)] for c in chunks]
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
        placed = [(int(c), int(o)) for c, o in zip(chunks, offsets)]
        total = int(sum(counts))
        if self.keep_plan.tier:
            return self._submit_kept(epoch, window, placed, counts, total)
        shape = (total, lay.n_layers, lay.d_model)
        # Allocated here, on the consumer's thread and stream: the caching allocator hands out memory whose
        # previous users are queued on this stream, so the copies wait for the event recorded after them.
        x = torch.empty(shape, dtype=self._dtype, device=self.device)
        y = None if self.store.recompute else torch.empty(shape, dtype=self._dtype, device=self.device)
        win = _Window(x, y, np.empty(total, np.int64), np.empty(0, np.int64), [])
        # The row order is planned off the training thread too (sorting a large window takes ~0.1 s).
        win.futures.append(self.pool.submit(self._plan_rows, win, placed, epoch, window))
        win.futures += self._read(placed, x, y)
        return win

    def _read(self, placed: list[tuple[int, int]], x: torch.Tensor, y: torch.Tensor | None) -> list[Future]:
        """Start decoding chunks into ``x``/``y`` at the given row offsets."""
        if self._cuda:
            writable = torch.cuda.Event()
            writable.record(torch.cuda.current_stream(self.device))
            return [self.pool.submit(self._read_cuda, placed, x, y, writable)]
        # Whole chunks in one zarr call, token-filtered chunks one task each.
        xs, ys = self._np(x), self._np(y)
        whole = [p for p in placed if self._is_whole(p[0])]
        futures = [self.pool.submit(self._read_into, whole, xs, ys)] if whole else []
        return futures + [self.pool.submit(self._read_into, [p], xs, ys) for p in placed if not self._is_whole(p[0])]

    def _submit_kept(self, epoch: int, window: int, placed: list[tuple[int, int]], counts: list[int],
                     total: int) -> _Window:
        """A window over the kept rows: its chunks not read yet are decoded into their slots (consecutive, so the
        staged CUDA copies stay contiguous), the others are gathered from where they already lie."""
        if self._kept is None:  # allocated on the consumer's thread and stream, like a window
            lay = self.store.layout
            self._kept = KeptRows(self.rows_per_epoch, (lay.n_layers, lay.d_model), self._dtype, self.device,
                                  with_targets=not self.store.recompute)
        kept = self._kept
        chunks = [c for c, _ in placed]
        new = [(c, n) for c, n in zip(chunks, counts) if c not in kept.slots]
        if new:
            slots = kept.allocate([c for c, _ in new], [n for _, n in new])
            kept.claim(slots, [n for _, n in new], self._read(slots, kept.x, kept.y))
        win = _Window(kept.x, kept.y, np.empty(total, np.int64), np.empty(0, np.int64), kept.waits(chunks),
                      rows=kept.rows(chunks), tier=STORE if new else self.keep_plan.tier)
        win.futures.append(self.pool.submit(self._plan_rows, win, placed, epoch, window))
        return win

    def _plan_rows(self, win: _Window, placed: list[tuple[int, int]], epoch: int, window: int) -> None:
        for c, at in placed:
            mask = self.store.token_type_mask(c, self.tokens)
            win.image[at:at + self._valid_rows[c]] = self._chunk_images(c)[mask]
        win.order = stratified_order(win.image, np.random.default_rng([self.seed, epoch, window, 1]))

    def _schedule(self):
        """(epoch, window, chunks) from the current position on, across epoch boundaries."""
        epoch, window = self.epoch, self.window
        while True:
            wins = self._windows(epoch)
            for w in range(window, len(wins)):
                yield epoch, w, wins[w]
            epoch, window = epoch + 1, 0

    def prefetch(self) -> None:
        """Start reading the window at the current position now, so that it overlaps the rest of the start-up
        (the optimiser's construction imports torch._dynamo: seconds). Iteration uses it if the position has
        not moved since (a resume moves it: the read is then dropped)."""
        if self._early is None:
            epoch, window, chunks = next(self._schedule())
            self._early = (epoch, window, self._submit(epoch, window, chunks))

    def _widen(self, t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.int16:
            t = t.view(torch.bfloat16)
        return t.float()

    def __iter__(self):
        B = self.batch_size
        schedule = self._schedule()
        early, self._early = self._early, None
        first = next(schedule)
        if early is not None and early[:2] == first[:2]:
            ahead = deque([early])
        else:
            ahead = deque([(first[0], first[1], self._submit(*first))])
        ahead.extend((e, w, self._submit(e, w, chunks)) for e, w, chunks in islice(schedule, PREFETCH_WINDOWS - 1))
        while True:
            epoch, window, read = ahead.popleft()
            t0 = time.perf_counter()
            try:
                win = read.result()
            except OSError as e:
                raise StoreError(f"{self.store.url}: reading a window failed: {e}") from e
            self.waits["read_s"] += time.perf_counter() - t0
            e2, w2, chunks = next(schedule)
            ahead.append((e2, w2, self._submit(e2, w2, chunks)))
            if (epoch, window) != (self.epoch, self.window):
                self.epoch, self.window, self.batch_in_window = epoch, window, 0
            n_batches = len(win.order) // B
            if self.batch_in_window >= n_batches:
                continue
            self.served.setdefault(epoch, set()).add(win.tier)
            # Sorted indices: the gather then walks memory forwards (CPU caches; coalescing on the GPU).
            sels = np.sort(win.order[:n_batches * B].reshape(n_batches, B), axis=1)
            at = sels if win.rows is None else win.rows[sels]  # the same rows, where the kept tensor holds them
            sels_dev = torch.from_numpy(at).to(self.device, non_blocking=False)
            for b in range(self.batch_in_window, n_batches):
                t0 = time.perf_counter()
                bx = self._widen(win.x.index_select(0, sels_dev[b]))
                by = self._targets(bx) if win.y is None else self._widen(win.y.index_select(0, sels_dev[b]))
                self.waits["gather_s"] += time.perf_counter() - t0
                self.batch_in_window += 1
                yield Batch(bx, by, win.image[sels[b]], win.tier)

    def tiers(self) -> str:
        """Which tier served each epoch so far, e.g. ``epoch 0 store; epochs 1-97 memory host``."""
        runs: list[list] = []
        for epoch in sorted(self.served):
            name = "+".join(sorted(self.served[epoch]))
            if runs and runs[-1][2] == name and runs[-1][1] == epoch - 1:
                runs[-1][1] = epoch
            else:
                runs.append([epoch, epoch, name])
        return "; ".join(f"epoch {a} {name}" if a == b else f"epochs {a}-{b} {name}" for a, b, name in runs)

    def close(self) -> None:
        """Drop the reads not started and wait for the running ones: nothing reads the store once this returns
        (a read left running went on against a store its caller may be tearing down, and held up the
        interpreter's exit, which joins these threads, while it retried)."""
        self._closed = True
        self.pool.shutdown(wait=True, cancel_futures=True)
