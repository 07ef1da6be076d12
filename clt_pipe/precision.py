"""The one rule for ``precision = "auto"`` shared by harvest, fit and analyze."""

from __future__ import annotations

import contextlib

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


@contextlib.contextmanager
def exact_float32():
    """float32 as IEEE float32 inside, whatever the process set: no autocast, no TF32 matmuls or convolutions, no
    reduced-precision reductions; restored after. The attribution graph's completeness bound (1e-4) is a float32
    bound, and TF32 keeps 10 mantissa bits (~1e-3). Usable as a decorator."""
    m, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (torch.get_float32_matmul_precision(), m.allow_fp16_reduced_precision_reduction,
             m.allow_bf16_reduced_precision_reduction, cudnn.allow_tf32)
    torch.set_float32_matmul_precision("highest")
    m.allow_fp16_reduced_precision_reduction = m.allow_bf16_reduced_precision_reduction = False
    cudnn.allow_tf32 = False
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.autocast("cpu", enabled=False))
            if torch.cuda.is_available():  # asking for CUDA's autocast without CUDA warns
                stack.enter_context(torch.autocast("cuda", enabled=False))
            yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction = saved[1], saved[2]
        cudnn.allow_tf32 = saved[3]
