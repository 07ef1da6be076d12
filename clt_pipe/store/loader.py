"""Shuffled training batches streamed from a store.

Order: a seeded permutation of the (training) chunks per epoch → windows of ``shuffle_chunks`` chunks read
concurrently by a thread pool (zarr/blosc decode releases the GIL) one window ahead → the window's valid rows
permuted → batches of B rows. Rows are never gathered from disk one by one: whole chunks are read, and the
permutation indexes RAM. Batches leave as the stored fp16/bf16 (half the bytes over PCIe) and are widened
to float32 on the device. A window's last partial batch is dropped, which keeps the position a tiny
``(epoch, window, batch)`` triple that a checkpoint restores exactly.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from clt_pipe.store.reader import ActivationStore

HOLDOUT_SALT = 0x5EED  # the held-out chunks do not change with the training seed


def split_chunks(n_chunks: int, holdout: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) chunk ids. Chunks hold whole images, so this is a split by image."""
    perm = np.random.default_rng(HOLDOUT_SALT).permutation(n_chunks)
    n_held = int(round(holdout * n_chunks))
    if holdout > 0 and n_held == 0:
        n_held = 1
    return np.sort(perm[n_held:]), np.sort(perm[:n_held])


@dataclass
class Batch:
    x: torch.Tensor  # [B, L, d] float32 on the device: MLP inputs
    y: torch.Tensor  # [B, L, d] float32: MLP outputs
    image: np.ndarray  # [B] image index of each row

    @property
    def image_diversity(self) -> float:
        """Distinct images / rows: how well the shuffle mixes (1.0 = every row from another image)."""
        return len(np.unique(self.image)) / len(self.image)


class ChunkLoader:
    def __init__(self, store: ActivationStore, batch_size: int, *, tokens: str = "all", split: str = "train",
                 holdout: float = 0.0, seed: int = 0, shuffle_chunks: int = 8, read_threads: int = 4,
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1):
        self.store = store
        self.batch_size = batch_size
        self.tokens = tokens
        self.seed = seed
        self.shuffle_chunks = max(1, shuffle_chunks)
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        train, held = split_chunks(store.layout.n_chunks, holdout)
        self.chunks = {"train": train, "heldout": held, "all": np.arange(store.layout.n_chunks)}[split]
        if len(self.chunks) == 0:
            raise ValueError(f"no chunks in split {split!r}")
        self.rows_per_epoch = sum(int(store.token_type_mask(int(c), tokens).sum()) for c in self.chunks)
        if self.rows_per_epoch < batch_size:
            raise ValueError(f"split {split!r} holds {self.rows_per_epoch} {tokens} rows, fewer than one batch "
                             f"of {batch_size}")
        # A window must hold a few batches, or CLS-only training on big chunks would emit nothing.
        per_chunk = self.rows_per_epoch / len(self.chunks)
        self.shuffle_chunks = max(self.shuffle_chunks, int(np.ceil(2 * batch_size / max(per_chunk, 1))))
        self.pool = ThreadPoolExecutor(max(1, read_threads), thread_name_prefix="clt-read")
        self.epoch, self.window, self.batch_in_window = 0, 0, 0
        self._pin = self.device.type == "cuda"

    # ---- position ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "window": self.window, "batch_in_window": self.batch_in_window,
                "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise ValueError("loader state was saved with another seed")
        self.epoch, self.window, self.batch_in_window = state["epoch"], state["window"], state["batch_in_window"]

    # ---- reading -------------------------------------------------------------------------------------
    def _windows(self, epoch: int) -> list[np.ndarray]:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.chunks)
        wins = [order[i:i + self.shuffle_chunks] for i in range(0, len(order), self.shuffle_chunks)]
        return wins[self.rank::self.world_size]

    def _read(self, chunk: int):
        x, y = self.store.read_chunk(int(chunk))
        mask = self.store.token_type_mask(int(chunk), self.tokens)
        lay = self.store.layout
        first = lay.chunk_images(int(chunk)).start
        image = first + np.arange(len(mask)) // lay.tokens_per_image
        return x[mask], y[mask], image[mask]

    def _submit(self, window: np.ndarray):
        return [self.pool.submit(self._read, c) for c in window]

    def _assemble(self, futures, epoch: int, window: int):
        parts = [f.result() for f in futures]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        image = np.concatenate([p[2] for p in parts])
        perm = np.random.default_rng([self.seed, epoch, window, 1]).permutation(len(x))
        return x, y, image, perm

    def _to_device(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(arr)
        if self.store.dtype == "bf16":
            t = t.view(torch.bfloat16)
        if self._pin:
            t = t.pin_memory()
        return t.to(self.device, non_blocking=self._pin).float()

    def __iter__(self):
        B = self.batch_size
        while True:
            wins = self._windows(self.epoch)
            if not wins:
                raise ValueError("this rank has no chunks to read; use fewer ranks or smaller shuffle windows")
            pending = self._submit(wins[self.window]) if self.window < len(wins) else None
            while self.window < len(wins):
                futures = pending
                nxt = self.window + 1
                pending = self._submit(wins[nxt]) if nxt < len(wins) else None
                x, y, image, perm = self._assemble(futures, self.epoch, self.window)
                n_batches = len(perm) // B
                while self.batch_in_window < n_batches:
                    sel = np.sort(perm[self.batch_in_window * B:(self.batch_in_window + 1) * B])
                    self.batch_in_window += 1
                    yield Batch(self._to_device(x[sel]), self._to_device(y[sel]), image[sel])
                self.window, self.batch_in_window = nxt, 0
            self.epoch, self.window = self.epoch + 1, 0

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
