"""Seconds spent per harvest stage, summed over the threads that run it: names the bottleneck by measurement.

Always on: one ``perf_counter`` pair and an uncontended lock per chunk group, batch or commit (microseconds
against milliseconds of work). The threads overlap, so stages add up to more than the wall time; what a stage
*waits* on is its own entry ("wait: ..."), and the largest wait names the stage that holds the others back.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager


class StageTimes:
    def __init__(self):
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
            self.calls[stage] = self.calls.get(stage, 0) + 1

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def merge(self, other: "StageTimes | dict") -> None:
        """Add another process's times (``as_dict`` form, as a dask worker returns them)."""
        seconds = other.seconds if isinstance(other, StageTimes) else other
        for k, v in seconds.items():
            self.add(k, v)

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            return dict(self.seconds)

    def table(self, wall: float | None = None) -> str:
        """One line per stage, largest first (and its share of ``wall`` when given)."""
        rows = sorted(self.as_dict().items(), key=lambda kv: -kv[1])
        return "\n".join(f"  {name:<34} {sec:8.3f} s" + (f"  {100 * sec / wall:5.1f} % of wall" if wall else "")
                         for name, sec in rows)
