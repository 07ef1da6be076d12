"""The one rule for ``precision = "auto"`` shared by harvest, fit and analyze."""

from __future__ import annotations

import torch


def resolve_precision(device: torch.device, precision: str) -> str:
    """bf16 autocast on CUDA by default; full fp32 on CPU (CPU autocast is slower than fp32 there)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast_context(device: torch.device, precision: str):
    precision = resolve_precision(device, precision)
    if precision == "fp32":
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
