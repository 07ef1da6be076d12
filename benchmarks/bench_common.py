"""Shared by the benchmark scripts: where results go."""

from __future__ import annotations

import datetime
import platform
from pathlib import Path

import torch

BENCH_FILE = Path(__file__).resolve().parent / "BENCHMARKS.md"
HEADER = """# Benchmarks

Ratios measured side by side in one run (interleaved repeats, medians). Each line names its machine.

| benchmark | setting | measured | ratio |
|---|---|---|---|
"""


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work, so a wall-clock interval covers it (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine() -> str:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()} threads"
    return f"{platform.machine()}, {dev}"


def append_result(line: str) -> None:
    if not BENCH_FILE.exists():
        BENCH_FILE.write_text(HEADER)
    stamp = datetime.date.today().isoformat()
    with BENCH_FILE.open("a") as fh:
        fh.write(line.rstrip() + f" <!-- {stamp}, {machine()} -->\n")
