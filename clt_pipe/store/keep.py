"""Decoded training rows kept in memory across epochs.

A fit runs many epochs over one store (the pipelines: ~98 over CIFAR-100), and decoding it again each epoch
caps the step at the disk's rate. When the training split's rows fit a memory budget, the loader decodes each
chunk once into one tensor (on the device on CUDA, as stored: fp16 or bf16 bits; in host memory on CPU) and
later windows gather their rows from it. Only where the rows come from changes: the windows, their row order and
the position a checkpoint holds are the ones of the store path, so the batches are the same bit for bit.

Slots are given out in the order chunks are first read, so the windows of a first epoch fill consecutive
ranges: they decode straight into place and need no window buffers of their own.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch

KEEP_SHARE = 0.5  # auto budget: this share of free device memory (CUDA) or available host memory (CPU)
STORE = "store"  # the tier of a window decoded from the store


def tier_name(device: torch.device) -> str:
    return "memory device" if device.type == "cuda" else "memory host"


@dataclass(frozen=True)
class KeepPlan:
    """Whether the rows are kept, and why: ``tier`` is the memory tier, or None when they are decoded again."""
    tier: str | None
    need_bytes: int
    budget_bytes: int
    reason: str

    def describe(self) -> str:
        gib = lambda b: f"{b / 2**30:.3g} GiB"  # noqa: E731
        if self.tier:
            return f"{self.tier} ({gib(self.need_bytes)} of a {gib(self.budget_bytes)} budget)"
        return f"no: {self.reason}"


def plan_keep(keep: bool, need_bytes: int, keep_memory: float, available: int, *, shared_by: int = 1,
              device: torch.device) -> KeepPlan:
    """Keep the rows if asked to and they fit ``keep_memory`` GiB, or (0 = auto) KEEP_SHARE of ``available``
    bytes split between the ``shared_by`` processes that draw on the same memory."""
    budget = int(keep_memory * 2**30) if keep_memory > 0 else int(KEEP_SHARE * available / max(shared_by, 1))
    if not keep:
        return KeepPlan(None, need_bytes, budget, "--no-keep-rows")
    if need_bytes > budget:
        return KeepPlan(None, need_bytes, budget, f"{need_bytes / 2**30:.3g} GiB of rows exceed the "
                                                  f"{budget / 2**30:.3g} GiB budget (--keep-memory)")
    return KeepPlan(tier_name(device), need_bytes, budget, "")


class KeptRows:
    """Every training row once decoded: ``x`` (and ``y`` unless targets are recomputed) in the store's dtype.

    ``slots[chunk] = (offset, rows, futures)``: where a chunk's rows lie and the reads that fill them (done once
    the chunk is there; a window that uses the chunk waits on them, so a read still running, e.g. one dropped on
    resume, is never read half-written)."""

    def __init__(self, n_rows: int, row_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 with_targets: bool):
        self.x = torch.empty((n_rows, *row_shape), dtype=dtype, device=device)
        self.y = torch.empty_like(self.x) if with_targets else None
        self.slots: dict[int, tuple[int, int, list[Future]]] = {}
        self.filled = 0

    def allocate(self, chunks: list[int], counts: list[int]) -> list[tuple[int, int]]:
        """Consecutive slots for chunks not read yet: ``(chunk, offset)`` in the given order."""
        placed = []
        for c, n in zip(chunks, counts):
            placed.append((c, self.filled))
            self.filled += n
        if self.filled > len(self.x):
            raise RuntimeError(f"kept rows overflow: {self.filled} > {len(self.x)}")
        return placed

    def claim(self, placed: list[tuple[int, int]], counts: list[int], futures: list[Future]) -> None:
        for (c, at), n in zip(placed, counts):
            self.slots[c] = (at, n, futures)

    def rows(self, chunks: list[int]) -> np.ndarray:
        """The kept row of each of a window's rows, chunk after chunk."""
        spans = [self.slots[c] for c in chunks]
        return np.concatenate([np.arange(at, at + n) for at, n, _ in spans]).astype(np.int64)

    def waits(self, chunks: list[int]) -> list[Future]:
        seen: dict[int, Future] = {}
        for c in chunks:
            for f in self.slots[c][2]:
                seen.setdefault(id(f), f)
        return list(seen.values())
