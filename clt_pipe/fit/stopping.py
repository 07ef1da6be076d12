"""A fit asked to stop (clt_pipe.signals): every rank stops after the same step, which is checkpointed."""

from __future__ import annotations

from pathlib import Path

from clt_pipe import signals
from clt_pipe.fit import checkpoint as ckpt
from clt_pipe.fit.distributed import Dist


def agreed_signal(dist: Dist) -> int:
    """The signal that stops the fit after this step (0: none). Under torchrun every rank calls this every step
    and gets the same answer, whichever ranks the signal reached: a rank stopping alone would leave the others
    waiting in their next all-reduce."""
    return dist.max_int(signals.requested() or 0)


def stopped(signum: int, step: int, steps: int, out: str | Path) -> signals.Stopped:
    return signals.Stopped(signum, f"fit stopped by {signals.signal_name(signum)} after step {step}/{steps} "
                                   f"({signals.seconds_since_request():.1f} s after the signal): checkpoint "
                                   f"{ckpt._step_dir(Path(out), step)} holds it; re-run the same command with "
                                   f"--resume to continue")
