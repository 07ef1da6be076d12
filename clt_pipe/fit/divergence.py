"""A fit whose loss (or weights) go non-finite stops: no checkpoint of the bad state, no ``clt/``, no
``finished: true``; the run directory gets a one-line ``DIVERGED`` file (clt.rundir) and the command exits non-zero.

The loss is checked every step (the step already synchronises on the dead-latent update, so reading one
scalar costs nothing more); ranks agree on the verdict, so they stop together. The weights are checked before
each checkpoint is written: an infinite gradient can leave the loss of its own step finite and the weights
NaN, and such a checkpoint would not be the "last finite" one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from clt_pipe.errors import CltPipeError


class DivergedError(CltPipeError):
    """A fit (or sweep members) went non-finite; the message names the step and the checkpoint kept."""


def loss_is_finite(loss: torch.Tensor, dist) -> bool:
    bad = ~torch.isfinite(loss.detach()).reshape(1)
    return not bool(dist.any_rank(bad).item())


def weights_are_finite(model: torch.nn.Module, dist) -> bool:
    bad = torch.stack([~torch.isfinite(p).all() for p in model.parameters()]).any().reshape(1)
    return not bool(dist.any_rank(bad).item())


def diverged_line(run_dir: Path, what: str, step: int, last_checkpoint: str | None) -> str:
    kept = (f"the last finite checkpoint ({last_checkpoint}) is kept" if last_checkpoint
            else "no checkpoint was written before it")
    return (f"{run_dir}: {what} went non-finite at step {step}; {kept}, no CLT was exported; lower lr (or "
            f"raise warmup_steps / grad clipping) and re-run with --overwrite")
