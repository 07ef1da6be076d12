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
from clt_pipe.clt.sparse_decode import rows_decode_triangle

# One gathered decoder row costs about as much as this many columns of the dense GEMM (CPU, ViT-B sizes:
# the k = 32 gather is 4.9x faster than the F = 6144 GEMM, so 6144 / (32 * 4.9) ≈ 39; benchmarks/BENCHMARKS.md;
# on CUDA the gather is dearer still). AuxK gathers only where the dead set is much larger than aux_k.
GATHER_COLUMNS = 39
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
    model: CrossLayerTranscoder, x_std: Tensor, residual: Tensor, dead_mask: Tensor | None, aux_k: int,
    decode: str = "auto",
) -> Tensor:
    """AuxK term (see module doc); ``x_std`` [B, L, d] is the standardised input (``CLTOutput.x_std``),
    ``residual`` [B, L, d] the detached standardised error y - ŷ.

    Only the dead latents can write, so each source layer works on its n_s dead columns alone: their
    pre-activations [B, n_s], recomputed from ``x_std`` through those n_s encoder columns (gathering them out of
    the full pre-activations cost a B·L·F gradient per step); the top ``aux_k`` of them per token (all of them
    when n_s <= aux_k, where no top-k is needed); decoded through just their n_s decoder rows, every source
    into its strided slice of one [B, L, d] output (``rows_decode_triangle``). That decode is a GEMM over the
    n_s rows (in the autocast dtype on CUDA) unless ``decode`` resolves to sparse and the dead set is so large
    that gathering the B·aux_k selected rows is cheaper (n_s > GATHER_COLUMNS · aux_k). Either way the
    gradients land in place on those rows and columns only. Same value and gradients as a top-k over all F
    latents with the live ones masked out, which read and wrote all F columns per step.
    """
    zero = residual.new_zeros(())
    if dead_mask is None or aux_k <= 0 or not model.spec.kind.auxk:
        return zero
    dead_mask = dead_mask.to(x_std.device, torch.bool)
    counts = dead_mask.sum(-1).tolist()  # one host sync: the sizes of the per-layer dead sets
    if not any(counts):
        return zero
    # Per layer, the dead latents' ids first, ascending (a stable sort of the live flags); the rest is padding.
    ids = torch.argsort((~dead_mask).to(torch.uint8), dim=1, stable=True)[:, :max(counts)]
    pre_dead = model.preactivations_of(x_std, ids)  # [B, L, max n_s]; columns past n_s are padding
    signed = model.spec.kind.signed
    mode = model._decode_mode(decode)
    dense_parts, gathered = [], []  # (s, rows, codes, W_dec[s]) through n_s rows; (s, writes) gathered per code
    for s, n_dead in enumerate(counts):
        if not n_dead:
            continue
        rows, pre_d = ids[s, :n_dead], pre_dead[:, s, :n_dead]  # [n_s], [B, n_s]
        if n_dead <= aux_k:  # every dead latent is selected
            dense_parts.append((s, rows, pre_d if signed else torch.relu(pre_d), model.W_dec[s]))
            continue
        score = pre_d.detach().abs() if signed else pre_d.detach()
        local = score.topk(aux_k, dim=-1, sorted=False).indices  # [B, aux_k]
        val = pre_d.gather(-1, local)
        if not signed:
            val = torch.relu(val)
        if mode == "dense" or n_dead <= GATHER_COLUMNS * aux_k:
            dense_parts.append((s, rows, val.new_zeros(val.shape[0], n_dead).scatter(-1, local, val), model.W_dec[s]))
        else:
            gathered.append((s, model._source_sparse(s, rows[local], val).float()))
    recon = None
    if dense_parts:
        recon = rows_decode_triangle(dense_parts, model.n_layers, inplace_grad=model.inplace_decoder_grads)
    if gathered:
        folded = model.fold_sources(gathered)
        recon = folded if recon is None else recon + folded
    assert recon is not None
    first = next(s for s, n in enumerate(counts) if n)  # targets j >= first have a dead source s <= j
    return _normalised_mse(recon[:, first:], residual[:, first:]).sum()


def sparsity_penalty(model: CrossLayerTranscoder, out: CLTOutput, cfg: LossConfig) -> Tensor:
    """JumpReLU sparsity term before ``l0_coef`` (0 for the other sparsifiers)."""
    if not model.spec.kind.l0_penalty:
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
    decode: str = "auto",
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

    assert out.x_std is not None
    aux = aux_loss(model, out.x_std, (y_std - pred_std).detach(), dead_mask, cfg.aux_k, decode)
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
