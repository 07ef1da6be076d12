"""The per-shard moments merged into the store's statistics in shard order, as the shards commit.

Finalisation merges every shard's (count, mean, m2) in shard order 0..n-1 (the order fixes the float64 result,
so a resumed store gets the same statistics as one harvested in one go) and records the crc32c of the
per-shard arrays. Reading them back from the store for that costs three requests per shard on an object store;
the shards a writer commits itself are merged from memory instead, as soon as every earlier shard is in, and
the crc32c of the arrays' bytes is continued shard by shard. Shards committed by someone else (an earlier run
that is being resumed, another worker) are read from the store at the end, and so are shards held back when
too many wait for an earlier one (``MAX_WAITING_BYTES``: a resume that starts late in a large store).
"""

from __future__ import annotations

import threading

import crc32c as _crc32c
import numpy as np

from clt_pipe.store.stats import Moments

MAX_WAITING_BYTES = 256 << 20  # out-of-order shards kept in memory; beyond it they are read back at the end
ARRAYS = ("shard_moments_in", "shard_moments_out", "shard_count")


class ShardMomentsMerge:
    def __init__(self, n_shards: int, shape: tuple[int, ...]):
        self.n_shards = n_shards
        self.next = 0  # every shard below this one is merged
        self.total = {"in": Moments.empty(shape), "out": Moments.empty(shape)}
        self.crcs = dict.fromkeys(ARRAYS, 0)  # of the arrays' first ``next`` shards, C order
        self._waiting: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    def add(self, shard: int, count: int, moments_in: np.ndarray, moments_out: np.ndarray) -> None:
        """A shard's values exactly as stored: count (int64), and [2, ...] float64 (mean, m2) per side."""
        with self._lock:
            if shard < self.next or shard in self._waiting:
                return
            per_shard = moments_in.nbytes + moments_out.nbytes
            if shard != self.next and (len(self._waiting) + 1) * per_shard > MAX_WAITING_BYTES:
                return  # read back at the end
            self._waiting[shard] = (count, moments_in, moments_out)
            while self.next in self._waiting:
                self._merge(*self._waiting.pop(self.next))

    def _merge(self, count: int, moments_in: np.ndarray, moments_out: np.ndarray) -> None:
        for side, arr in (("in", moments_in), ("out", moments_out)):
            self.total[side] = self.total[side].merge(Moments(int(count), arr[0], arr[1]))
            key = f"shard_moments_{side}"
            self.crcs[key] = _crc32c.crc32c(np.ascontiguousarray(arr, np.float64).data, self.crcs[key])
        self.crcs["shard_count"] = _crc32c.crc32c(np.int64(count).tobytes(), self.crcs["shard_count"])
        self.next += 1

    def unmerged(self) -> list[int]:
        """Shards from ``next`` on whose values are not in memory: to be read from the store."""
        with self._lock:
            return [s for s in range(self.next, self.n_shards) if s not in self._waiting]

    def finish(self, read) -> tuple[dict[str, Moments], dict[str, int]]:
        """Merge the rest; ``read(shards)`` returns their (counts [n], moments_in [n, 2, ...], moments_out) from
        the store. Returns the merged moments per side and the crc32c of each whole per-shard array."""
        missing = self.unmerged()
        if missing:
            counts, m_in, m_out = read(missing)
            for i, s in enumerate(missing):
                self._waiting[s] = (int(counts[i]), m_in[i], m_out[i])
        with self._lock:
            while self.next in self._waiting:
                self._merge(*self._waiting.pop(self.next))
            if self.next != self.n_shards:
                raise RuntimeError(f"shard moments {self.next}.. were never read")
        return dict(self.total), dict(self.crcs)
