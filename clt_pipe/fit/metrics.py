"""Training metrics: a JSONL log (one line per logged step) and a rich live table of per-layer numbers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.live import Live
from rich.table import Table

PER_LAYER = ("fvu", "cos", "l0", "dead_frac")


def _py(v):
    if isinstance(v, torch.Tensor):
        return v.detach().float().cpu().tolist() if v.dim() else float(v)
    return v


class MetricsLog:
    def __init__(self, path: Path, n_layers: int, *, console=None, total_steps: int, resume_step: int = 0):
        # On resume, drop lines past the checkpoint so the log has exactly one line per logged step.
        lines = []
        if path.exists():
            lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
        path.write_text("".join(ln + "\n" for ln in lines))
        self.fh = path.open("a")
        self.n_layers = n_layers
        self.total = total_steps
        self.last: dict = {}
        self.t0, self.step0 = time.perf_counter(), resume_step
        self.live = Live(self._table(), console=console, refresh_per_second=2, transient=False) if console else None
        if self.live:
            self.live.start()

    def write(self, step: int, metrics: dict, *, lr: float, batch_size: int) -> None:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rec = {"step": step, "lr": lr, "time": time.time(),
               "steps_per_s": (step - self.step0) / dt, "tokens_per_s": (step - self.step0) * batch_size / dt}
        for k, v in metrics.items():
            if k != "fired":
                rec[k] = _py(v)
        self.fh.write(json.dumps(rec) + "\n")
        self.fh.flush()
        self.last = rec
        if self.live:
            self.live.update(self._table())

    def _table(self) -> Table:
        r = self.last
        title = (f"fit step {r.get('step', 0)}/{self.total}  loss {r.get('loss', float('nan')):.4f}  "
                 f"{r.get('steps_per_s', 0):.2f} steps/s  {r.get('tokens_per_s', 0):,.0f} tokens/s  "
                 f"image diversity {r.get('image_diversity', 0):.2f}")
        table = Table("layer", *PER_LAYER, title=title)
        for layer in range(self.n_layers):
            table.add_row(str(layer), *(f"{r[k][layer]:.3f}" if k in r else "-" for k in PER_LAYER))
        return table

    def final_summary(self) -> dict:
        r = self.last
        out = {}
        for k in ("fvu", "cos", "l0", "dead_frac"):
            if k in r:
                out[f"mean_{k}"] = sum(r[k]) / len(r[k])
        if "image_diversity" in r:
            out["image_diversity"] = r["image_diversity"]
        return out

    def close(self) -> None:
        if self.live:
            self.live.stop()
            self.live.console.line()
        self.fh.close()
