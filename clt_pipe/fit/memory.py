"""What a sweep needs in memory, said (and refused when it will not fit) before its first step.

Each member keeps its weights, their gradients (dense from the start, see Trainer) and AdamW's two moments
resident: four copies of its parameters, plus its dead-latent counters. Members step one after another, so
the activations of only one step are alive at a time: the largest member's. The shuffle windows are the
shared loader's (two resident at once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clt_pipe.clt.model import CrossLayerTranscoder
from clt_pipe.clt.spec import CLTSpec
from clt_pipe.errors import CltPipeError

GIB = 2**30
# [B, L, F] float32 tensors alive in one step: pre-activations, their gradient, the sparse code and its mask.
STEP_TENSORS = 4


@dataclass(frozen=True)
class MemoryPlan:
    state: int  # bytes: every member's weights, gradients, AdamW moments and counters
    step: int  # bytes: one step's activations (the largest member's) and its batch
    windows: int  # bytes: the loader's two resident shuffle windows
    kept: int  # bytes: the training rows the loader keeps across epochs (0 when it decodes every epoch)
    available: int
    device: str
    n_members: int

    @property
    def need(self) -> int:
        return self.state + self.step + self.windows + self.kept

    def line(self) -> str:
        return (f"sweep: {self.n_members} members need {_size(self.need)} on {self.device} (weights, gradients "
                f"and AdamW moments {_size(self.state)} + one step's activations {_size(self.step)} + shuffle "
                f"windows {_size(self.windows)} + kept rows {_size(self.kept)}) of {_size(self.available)} "
                f"available")

    def check(self) -> None:
        if self.need > self.available:
            raise CltPipeError(self.line().replace(" of ", ", more than the ", 1)
                               + "; sweep fewer members at once (shorter [fit.sweep] lists) or lower "
                                 "batch_size / expansion, or keep fewer rows (--keep-memory, --no-keep-rows)")


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def member_bytes(spec: CLTSpec, batch_size: int) -> tuple[int, int]:
    """(resident bytes, one step's activation bytes) of one member."""
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = CrossLayerTranscoder(spec)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    counters = spec.n_layers * spec.n_features * 8
    step = STEP_TENSORS * batch_size * spec.n_layers * spec.n_features * 4
    return 4 * params + counters, step


def plan(specs: list[CLTSpec], batch_size: int, window_bytes: int, kept_bytes: int, available: int,
         device: torch.device) -> MemoryPlan:
    sizes = [member_bytes(s, batch_size) for s in specs]
    batch = 2 * batch_size * specs[0].n_layers * specs[0].d_model * 4  # x and y, float32
    return MemoryPlan(state=sum(s for s, _ in sizes), step=max(a for _, a in sizes) + batch, windows=window_bytes,
                      kept=kept_bytes, available=available, device=str(device), n_members=len(specs))
