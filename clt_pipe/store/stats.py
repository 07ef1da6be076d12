"""Mergeable per-dimension moments (count, mean, M2) in float64.

Each shard accumulates its own moments; shards merge with Chan et al.'s pairwise update, so the result
does not depend on how many workers wrote the store or in which order shards finished.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Moments:
    count: int
    mean: np.ndarray  # float64
    m2: np.ndarray  # float64, sum of squared deviations from the mean

    @classmethod
    def empty(cls, shape: tuple[int, ...]) -> "Moments":
        return cls(0, np.zeros(shape, np.float64), np.zeros(shape, np.float64))

    @classmethod
    def of(cls, rows: np.ndarray, block: int = 128) -> "Moments":
        """Moments over axis 0 of ``rows`` (any float dtype), two passes in float64.

        The second pass runs in blocks of rows through one reused float64 buffer: ~3x faster than
        widening the whole array (it stays in cache), which matters in the harvest's writer thread.
        """
        n = rows.shape[0]
        if n == 0:
            return cls.empty(rows.shape[1:])
        flat = rows.reshape(n, -1)
        mean = np.add.reduce(flat, axis=0, dtype=np.float64) / n
        m2 = np.zeros_like(mean)
        buf = np.empty((min(block, n), flat.shape[1]), np.float64)
        for a in range(0, n, block):
            d = buf[:len(flat[a:a + block])]
            np.subtract(flat[a:a + block], mean, out=d, dtype=np.float64)
            np.multiply(d, d, out=d)
            m2 += d.sum(axis=0)
        return cls(n, mean.reshape(rows.shape[1:]), m2.reshape(rows.shape[1:]))

    def merge(self, other: "Moments") -> "Moments":
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return Moments(n, mean, m2)

    @property
    def var(self) -> np.ndarray:
        """Population variance (ddof=0), like ``numpy.var``'s default."""
        return self.m2 / max(self.count, 1)


def tensor_moments(x: torch.Tensor, rows_per_step: int = 4096) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(count, mean, M2) over axis 0 of ``x``, in float64 on ``x``'s device, two passes in row blocks.

    Used by harvest on the capture device, so on a GPU the statistics cost the CPU nothing; blocks keep the
    float64 temporaries small. Convert with ``Moments(n, mean.cpu().numpy(), m2.cpu().numpy())``.
    """
    n = x.shape[0]
    total = torch.zeros(x.shape[1:], dtype=torch.float64, device=x.device)
    for a in range(0, n, rows_per_step):
        total += x[a:a + rows_per_step].double().sum(0)
    mean = total / max(n, 1)
    m2 = torch.zeros_like(total)
    for a in range(0, n, rows_per_step):
        d = x[a:a + rows_per_step].double() - mean
        m2 += (d * d).sum(0)
    return n, mean, m2
