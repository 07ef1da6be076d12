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


# torch ≥ 2.9's per-backend float32 precision settings, parents before children: setting a parent resets its
# children, so they are set and restored in this order. Mixing them with the legacy getter raises, hence two paths.
FP32_PRECISION_SETTINGS = ("", "cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn", "mkldnn.matmul",
                           "mkldnn.conv", "mkldnn.rnn")


def _backend(path: str):
    obj = torch.backends
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part, None)
    return obj


@contextlib.contextmanager
def exact_float32():
    """float32 as IEEE float32 inside, whatever the process set: no autocast, no TF32 (or bf16) float32 matmuls
    and convolutions, no reduced-precision reductions; restored after. The attribution graph's completeness bound
    (1e-4) is a float32 bound, and TF32 keeps 10 mantissa bits (~1e-3). Usable as a decorator."""
    m, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    new_api = hasattr(torch.backends, "fp32_precision")
    if new_api:
        nodes = [n for n in map(_backend, FP32_PRECISION_SETTINGS) if n is not None and hasattr(n, "fp32_precision")]
        saved_new = [n.fp32_precision for n in nodes]
        for n in nodes:
            n.fp32_precision = "ieee"
    else:
        saved_legacy = (torch.get_float32_matmul_precision(), cudnn.allow_tf32)
        torch.set_float32_matmul_precision("highest")
        cudnn.allow_tf32 = False
    saved_red = (m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction)
    m.allow_fp16_reduced_precision_reduction = m.allow_bf16_reduced_precision_reduction = False
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.autocast("cpu", enabled=False))
            if torch.cuda.is_available():  # asking for CUDA's autocast without CUDA warns
                stack.enter_context(torch.autocast("cuda", enabled=False))
            yield
    finally:
        m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction = saved_red
        if new_api:
            for n, v in zip(nodes, saved_new):
                n.fp32_precision = v
        else:
            torch.set_float32_matmul_precision(saved_legacy[0])
            cudnn.allow_tf32 = saved_legacy[1]
