"""Mergeable per-dimension moments (count, mean, M2) in float64.

Each shard accumulates its own moments; shards merge with Chan et al.'s pairwise update, so the result
does not depend on how many workers wrote the store or in which order shards finished.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Moments:
    count: int
    mean: np.ndarray  # float64
    m2: np.ndarray  # float64, sum of squared deviations from the mean

    @classmethod
    def empty(cls, shape: tuple[int, ...]) -> "Moments":
        return cls(0, np.zeros(shape, np.float64), np.zeros(shape, np.float64))

    @classmethod
    def of(cls, rows: np.ndarray) -> "Moments":
        """Moments over axis 0 of ``rows`` (any float dtype)."""
        x = np.asarray(rows, dtype=np.float64)
        n = x.shape[0]
        if n == 0:
            return cls.empty(x.shape[1:])
        mean = x.mean(axis=0)
        return cls(n, mean, ((x - mean) ** 2).sum(axis=0))

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
