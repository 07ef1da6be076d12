"""Sparsifiers: pre-activations [B, L, F] -> sparse codes.

* ``relu_topk``  keep the k largest of ReLU(pre) per token and layer (as (index, value) pairs).
* ``abs_topk``   keep the k largest |pre| per token and layer, with their sign.
* ``jumprelu``   z = pre * H(pre - θ); θ learns through a straight-through estimator (rectangle kernel of width
                 ``bandwidth``, Rajamanoharan et al. 2024), as does the L0 penalty Σ H(pre - θ).
* ``batchtopk``  training: per layer keep the B·k largest ReLU(pre) over the whole batch (Bussmann et al. 2024),
                 so the per-token count varies around k; inference: z = pre * H(pre - θ_l) with one threshold per
                 layer, an average of the smallest kept activation seen in training (see ``ema_update``).

Ties and edge cases: H(0) = 0 (strict ``>``), the same convention as circuit-tracer's JumpReLU, so exported
thresholds mean the same thing there.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Smallest weight of a new observation in the batchtopk threshold average. The first 1/EMA updates are a plain
# running mean (so the threshold is usable early); after that an exponential average that forgets early,
# badly-trained batches.
BATCHTOPK_EMA = 0.01


def topk_codes(pre: Tensor, k: int, signed: bool) -> tuple[Tensor, Tensor]:
    """(indices, values) of the k kept latents along the last axis; values carry the gradient to ``pre``.

    ``signed=False`` is ReLU-TopK: topk of pre then ReLU equals topk of ReLU(pre) (ReLU is monotone), and a kept
    non-positive entry becomes a 0 value, i.e. an inactive slot. ``signed=True`` is Abs-TopK.
    """
    if signed:
        idx = pre.abs().topk(k, dim=-1, sorted=False).indices
        return idx, pre.gather(-1, idx)
    val, idx = pre.topk(k, dim=-1, sorted=False)
    return idx, torch.relu(val)


def dense_from_topk(idx: Tensor, val: Tensor, n_features: int) -> Tensor:
    """Scatter (index, value) pairs [..., k] into dense codes [..., F] (differentiable in ``val``)."""
    z = val.new_zeros(*val.shape[:-1], n_features)
    return z.scatter(-1, idx, val)


def fired_from_topk(idx: Tensor, on: Tensor, n_features: int) -> Tensor:
    """[L, F] bool: which latents are active in at least one row, from TopK slots ``idx``/``on`` [N, L, k]
    (one scatter into the flat [L·F] mask, without building dense [N, L, F] codes)."""
    n_layers = idx.shape[1]
    flat = idx + torch.arange(n_layers, device=idx.device)[None, :, None] * n_features
    out = torch.zeros(n_layers * n_features, dtype=torch.bool, device=idx.device)
    out[flat[on]] = True
    return out.view(n_layers, n_features)


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """z = pre * H(pre - θ). d/dpre = H(pre - θ); d/dθ = -(θ/ε) K((pre - θ)/ε) (pseudo-derivative)."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold).to(grad.dtype)
        u = (pre.float() - threshold.float()) / eps
        grad_thr = -(threshold.float() / eps) * _rectangle(u) * grad.float()
        return grad_pre, grad_thr.sum_to_size(threshold.shape).to(threshold.dtype), None


class _Step(torch.autograd.Function):
    """H(pre - θ) for the L0 penalty: no gradient to pre, d/dθ = -(1/ε) K((pre - θ)/ε)."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        u = (pre.float() - threshold.float()) / eps
        grad_thr = -(1.0 / eps) * _rectangle(u) * grad.float()
        return None, grad_thr.sum_to_size(threshold.shape).to(threshold.dtype), None


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """JumpReLU with STE gradients to ``threshold`` (broadcast against ``pre``, e.g. [L, F] vs [B, L, F])."""
    return _JumpReLU.apply(pre, threshold, bandwidth)


def step(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """H(pre - θ) as a float tensor; summed over features it is the L0, with an STE gradient to θ only."""
    return _Step.apply(pre, threshold, bandwidth)


def batchtopk_train(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Training-mode BatchTopK over ``pre`` [B, L, F]: per layer keep the B·k largest ReLU(pre) of the batch.

    Returns dense codes [B, L, F] and the smallest kept value per layer [L] (detached), which feeds the
    inference threshold. Exactly B·k entries per layer are kept (some may be 0 when fewer are positive).
    """
    b, n_layers, n_feat = pre.shape
    keep = min(b * k, b * n_feat)
    per_layer = pre.transpose(0, 1).reshape(n_layers, b * n_feat)
    val, idx = per_layer.topk(keep, dim=-1, sorted=False)
    val = torch.relu(val)
    z = val.new_zeros(n_layers, b * n_feat).scatter(-1, idx, val)
    min_kept = val.detach().amin(dim=-1)
    return z.view(n_layers, b, n_feat).transpose(0, 1), min_kept


def batchtopk_infer(pre: Tensor, threshold: Tensor) -> Tensor:
    """Inference-mode BatchTopK: a per-layer JumpReLU; ``threshold`` broadcasts against ``pre`` ([L, 1] for
    [B, L, F], a scalar for one layer). Thresholds are clamped at 0 so this is never looser than ReLU."""
    thr = threshold.clamp_min(0).to(pre.dtype)
    return pre * (pre > thr).to(pre.dtype)


@torch.no_grad()
def ema_update(running: Tensor, n_updates: Tensor, observed: Tensor) -> None:
    """Fold one batch's smallest kept activation into the running inference threshold, in place."""
    n_updates += 1
    # Stays on the device: no host sync per training step.
    weight = (1.0 / n_updates.to(running.dtype)).clamp_min(BATCHTOPK_EMA)
    running.lerp_(observed.to(running.dtype), weight)
