"""The one rule for turning a ``--device`` option into a torch device."""

from __future__ import annotations

import torch

from clt_pipe.errors import CltPipeError


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CltPipeError(f"device: {device!r} is not a device (auto | cpu | cuda | cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CltPipeError(f"device: {device!r} requested but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CltPipeError(f"device: {device!r} requested but this machine has {torch.cuda.device_count()} "
                           f"CUDA device(s)")
    return dev
