"""Progress reporting shared by the stages: a silent default for library use and tests, rich for the CLI."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class NullProgress:
    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, n: int = 1, **rates: float) -> None:
        pass

    def stop(self) -> None:
        pass


class RichProgress(NullProgress):
    """One bar at a time; ``advance`` takes counters (images=, tokens=, mb=) and shows their rates."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self._progress: Progress | None = None
        self._task = None
        self._totals: dict[str, float] = {}
        self._t0 = 0.0

    def start(self, description: str, total: int) -> None:
        self.stop()
        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[rates]}"), TimeRemainingColumn(),
                                  console=self.console, transient=False)
        self._progress.start()
        self._task = self._progress.add_task(description, total=total, rates="")
        self._totals = {}
        self._t0 = time.perf_counter()

    def advance(self, n: int = 1, **counters: float) -> None:
        if self._progress is None:
            return
        for k, v in counters.items():
            self._totals[k] = self._totals.get(k, 0.0) + v
        dt = max(time.perf_counter() - self._t0, 1e-9)
        rates = "  ".join(f"{v / dt:,.1f} {k}/s" for k, v in self._totals.items())
        self._progress.update(self._task, advance=n, rates=rates)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
