"""The CLT training loss.

    loss = main + aux_coef * aux + l0_coef * sparsity

* main: Σ_j FVU_j, the fraction of variance unexplained per target layer *on this batch*:
  mean_b ‖ŷ_j - y_j‖² / mean_b ‖y_j - mean_b y_j‖² in standardised target space (FVU is invariant to the
  per-layer scalar ``out_scale``, so it equals the raw-space value). Summing normalised terms keeps layers with
  small MLP outputs from being ignored.
* aux (relu_topk, abs_topk, batchtopk): AuxK (Gao et al. 2024). Per source layer, the top ``aux_k``
  pre-activations among dead latents (ReLU'd, or |pre| with sign for abs_topk) decode, through the full CLT
  decoders, the detached residual y - ŷ; the term is Σ_j of the normalised MSE over targets j that some dead
  latent can write to. 0 with no dead latents. It gives dead latents a gradient towards useful directions.
* sparsity (jumprelu): Σ_l mean_b Σ_f H(pre - θ) with the STE ("l0"), or
  Σ_l mean_b Σ_f tanh(tanh_scale · |z| · ‖W_dec row‖) ("tanh", Anthropic's CLT penalty).

The reported ``aux`` and ``sparsity`` metrics are the terms before their coefficients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from clt_pipe.clt import sparsifiers as sp
from clt_pipe.clt.model import CLTOutput, CrossLayerTranscoder
from clt_pipe.clt.spec import AUXK_FAMILY

_EPS = 1e-8  # floor for batch variances (a constant target layer would otherwise divide by zero)


@dataclass
class LossConfig:
    aux_k: int = 256
    aux_coef: float = 1.0 / 32
    l0_coef: float = 1e-3
    l0_penalty: str = "l0"  # l0 | tanh
    tanh_scale: float = 4.0

    @classmethod
    def from_fit_config(cls, cfg: Any) -> "LossConfig":
        return cls(
            aux_k=cfg.aux_k,
            aux_coef=cfg.aux_coef,
            l0_coef=cfg.l0_coef,
            l0_penalty=cfg.l0_penalty,
            tanh_scale=cfg.tanh_scale,
        )


def _normalised_mse(pred: Tensor, target: Tensor) -> Tensor:
    """[B, L, d] -> [L]: mean_b ‖pred - target‖² / mean_b ‖target - mean_b target‖²."""
    err = (pred - target).square().sum(-1).mean(0)
    var = (target - target.mean(0, keepdim=True)).square().sum(-1).mean(0)
    return err / var.clamp_min(_EPS)


def aux_loss(
    model: CrossLayerTranscoder, pre: Tensor, residual: Tensor, dead_mask: Tensor | None, aux_k: int
) -> Tensor:
    """AuxK term (see module doc); ``residual`` [B, L, d] is the detached standardised error y - ŷ."""
    zero = residual.new_zeros(())
    if dead_mask is None or aux_k <= 0 or model.spec.sparsifier not in AUXK_FAMILY:
        return zero
    dead_mask = dead_mask.to(pre.device, torch.bool)
    has_dead = dead_mask.any(-1)  # [L]
    dead_sources = has_dead.tolist()  # one host sync, then plain Python control flow
    if not any(dead_sources):
        return zero
    signed = model.spec.sparsifier == "abs_topk"
    score = pre.detach().abs() if signed else pre.detach()
    score = score.masked_fill(~dead_mask, float("-inf"))
    k = min(aux_k, model.n_features)
    idx = score.topk(k, dim=-1, sorted=False).indices  # [B, L, k]
    val = pre.gather(-1, idx)
    if not signed:
        val = torch.relu(val)
    # Layers with fewer than k dead latents also pick live ones (score -inf): they must not write.
    val = val * dead_mask[None].expand_as(pre).gather(-1, idx).to(val.dtype)
    recon: Tensor | None = None
    for s in range(model.n_layers):
        if not dead_sources[s]:
            continue
        part = model._source_sparse(s, idx[:, s], val[:, s]).float()
        if recon is None:
            recon = residual.new_zeros(residual.shape)
        recon[:, s:] += part
    assert recon is not None
    reachable = has_dead.cumsum(0) > 0  # targets j with a dead source s <= j
    return _normalised_mse(recon, residual)[reachable].sum()


def sparsity_penalty(model: CrossLayerTranscoder, out: CLTOutput, cfg: LossConfig) -> Tensor:
    """JumpReLU sparsity term before ``l0_coef`` (0 for the other sparsifiers)."""
    if model.spec.sparsifier != "jumprelu":
        return out.recon_std.new_zeros((), dtype=torch.float32)
    if cfg.l0_penalty == "l0":
        active = sp.step(out.pre, model.log_threshold.exp(), model.spec.jumprelu_bandwidth)
        return active.float().sum(-1).mean(0).sum()
    if cfg.l0_penalty == "tanh":
        weighted = out.z.float().abs() * model.decoder_norms().float()
        return torch.tanh(cfg.tanh_scale * weighted).sum(-1).mean(0).sum()
    raise ValueError(f"l0_penalty: {cfg.l0_penalty!r} is not one of l0, tanh")


def clt_loss(
    model: CrossLayerTranscoder,
    out: CLTOutput,
    y_raw: Tensor,
    *,
    dead_mask: Tensor | None,
    cfg: LossConfig,
) -> tuple[Tensor, dict[str, Tensor]]:
    """(scalar loss, detached metrics). ``dead_mask`` [L, F] marks latents the trainer considers dead.

    metrics: fvu [L], cos [L] (mean cosine of ŷ and y, raw space), l0 [L] (mean active per token),
    mse [L] (mean squared error per element, raw space), fired [L, F] bool, main, aux, sparsity (scalars).
    """
    out_scale = model.out_scale.float()[:, None]
    y_std = y_raw.float() / out_scale
    pred_std = out.recon_std.float()
    if model.b_dec is not None:
        pred_std = pred_std + model.b_dec.float() / out_scale
    fvu = _normalised_mse(pred_std, y_std)
    main = fvu.sum()

    aux = aux_loss(model, out.pre, (y_std - pred_std).detach(), dead_mask, cfg.aux_k)
    sparsity = sparsity_penalty(model, out, cfg)
    loss = main + cfg.aux_coef * aux + cfg.l0_coef * sparsity

    with torch.no_grad():
        recon = pred_std * out_scale
        y = y_raw.float()
        metrics = {
            "fvu": fvu.detach(),
            "cos": torch.nn.functional.cosine_similarity(recon, y, dim=-1).mean(0),
            "l0": out.l0(),
            "mse": (recon - y).square().mean((0, 2)),
            "fired": out.fired(),
            "main": main.detach(),
            "aux": aux.detach(),
            "sparsity": sparsity.detach(),
        }
    return loss, metrics
