"""Per-feature JumpReLU thresholds that let a ReLU-TopK CLT be read as JumpReLU (circuit-tracer has no TopK).

JumpReLU keeps ``z = pre · (pre > θ_f)``: the trained encoder and decoder stay as they are, only θ [L, F] is
chosen. circuit-tracer's format has one θ per feature, the same at every position, so whatever is chosen is a
compromise between token types whose pre-activations differ (a ViT's CLS token fires many features that TopK cuts
at k on CLS but lets through on patches). Two ways to choose θ, measured side by side on the demo
(docs/DECISIONS.md, "circuit-tracer export"):

* ``frequency``: θ_f between the pre-activations where TopK keeps f and those where it does not, over the pooled
  calibration rows, so f fires as often as under TopK. Patches dominate the pool, so CLS is served badly.
* ``error`` (the default): θ fitted to the error the export reports — the mean over (token type, layer) of
  1 − R² of the JumpReLU reconstruction against the TopK CLT's — by gradient descent on a sigmoid-relaxed gate
  started from ``frequency``; the hard-gated result is kept only if it beats the start on the calibration rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clt_pipe.clt.model import CrossLayerTranscoder
from clt_pipe.tokens import token_mask

METHODS = ("error", "frequency")
MIN_THRESHOLD = 1e-6  # JumpReLU thresholds must be > 0 (they are stored as log θ)
TYPES = ("cls", "patches")


@dataclass
class Calibration:
    thresholds: torch.Tensor  # [L, F]
    method: str  # what was asked for
    chosen: str  # what was kept (error falls back to frequency where fitting did not help)
    loss: dict  # {"frequency": ..., "error": ...}: mean over (type, layer) of 1 − R² vs the CLT, calibration rows


@torch.no_grad()
def frequency_thresholds(clt: CrossLayerTranscoder, x: torch.Tensor) -> torch.Tensor:
    """Per-feature thresholds [L, F] reproducing ``clt``'s TopK firing counts on the rows ``x`` [N, L, d].

    For feature f with n_f firing rows among N, θ_f is the midpoint between the (n_f+1)-th and n_f-th largest
    pre-activation, so exactly the n_f largest pass ``pre > θ_f`` (ties aside); never-firing features get a θ
    just above their largest pre-activation, always-firing ones just below their smallest.
    """
    L = clt.n_layers
    thr = torch.empty(L, clt.n_features, dtype=torch.float32, device=x.device)
    for layer in range(L):
        xl = x[:, layer]
        pre = _pre_layer(clt, xl, layer)
        fires = (clt.encode_layer(xl, layer) != 0).sum(0)  # [F]
        s = pre.sort(0).values  # ascending
        n = s.shape[0]
        lo = s.gather(0, (n - fires - 1).clamp(0, n - 1)[None]).squeeze(0)  # largest non-firing value
        hi = s.gather(0, (n - fires).clamp(0, n - 1)[None]).squeeze(0)  # smallest firing value
        mid = (lo + hi) / 2
        pad = 1e-3 * s.abs().amax(0).clamp_min(1e-6)
        mid = torch.where(fires == 0, s[-1] + pad, mid)
        mid = torch.where(fires == n, s[0] - pad, mid)
        thr[layer] = mid.clamp_min(MIN_THRESHOLD)
    return thr


def _pre_layer(clt: CrossLayerTranscoder, xl: torch.Tensor, layer: int) -> torch.Tensor:
    xs = (xl.to(clt.W_enc.dtype) - clt.in_mean[layer]) / clt.in_scale[layer]
    return torch.addmm(clt.b_enc[layer], xs, clt.W_enc[layer]).float()


class _Target:
    """The calibration rows, the CLT's reconstruction of them, and per-(type, layer) row weights that turn a
    weighted squared error into the mean over (type, layer) of SSE/SST (= mean of 1 − R²). Pre-activations are
    recomputed per batch rather than held ([N, L, F] is 4.8 G values for a ViT-B CLT on 8192 rows)."""

    def __init__(self, clt: CrossLayerTranscoder, x: torch.Tensor, pos, batch: int):
        self.clt, self.x, self.batch = clt, x, batch
        with torch.no_grad():
            self.ref = torch.cat([clt(x[s:s + batch]).recon.float() for s in range(0, x.shape[0], batch)])
        n, L = self.ref.shape[:2]
        self.weight = torch.zeros(n, L, device=x.device)  # [N, L]
        masks = [torch.as_tensor(token_mask(pos, t), device=x.device) for t in TYPES]
        present = [m for m in masks if bool(m.any())]
        self.strata = [m.nonzero().squeeze(1) for m in present]  # row ids per token type
        for m in present:
            r = self.ref[m]
            sst = (r - r.mean(0, keepdim=True)).pow(2).sum((0, 2)).clamp_min(1e-30)  # [L]
            self.weight[m] = 1.0 / (sst * L * len(present))

    def pre(self, rows) -> torch.Tensor:
        return self.clt.preactivations(self.x[rows]).float()

    @torch.no_grad()
    def spread(self) -> torch.Tensor:
        """Each feature's pre-activation standard deviation over the rows [L, F]."""
        s1 = s2 = 0.0
        for s in range(0, self.x.shape[0], self.batch):
            p = self.pre(slice(s, s + self.batch)).double()
            s1, s2 = s1 + p.sum(0), s2 + p.pow(2).sum(0)
        n = self.x.shape[0]
        return ((s2 / n - (s1 / n) ** 2).clamp_min(0).sqrt()).float().clamp_min(1e-6)

    def loss(self, z: torch.Tensor, rows, scale: torch.Tensor | None = None) -> torch.Tensor:
        err = (self.clt.decode(z) - self.ref[rows]).pow(2).sum(-1) * self.weight[rows]  # [B, L]
        return (err if scale is None else err * scale[:, None]).sum()

    @torch.no_grad()
    def hard_loss(self, thr: torch.Tensor) -> float:
        total = 0.0
        for s in range(0, self.x.shape[0], self.batch):
            rows = slice(s, s + self.batch)
            pre = self.pre(rows)
            total += float(self.loss(pre * (pre > thr), rows))
        return total


def _batch_rows(clt: CrossLayerTranscoder, cap: int = 512) -> int:
    """Rows per step: ``cap``, or fewer where the dense [B, L, F] codes would pass 2^24 values (64 MB in float32).
    On the planted loud-CLS store 512 rows × 200 steps reach a loss of 0.433 in 4 s, 2048 × 300 0.425 with 6× the
    row-steps (one thread)."""
    return max(64, min(cap, (1 << 24) // max(1, clt.n_layers * clt.n_features)))


def fit_thresholds(clt: CrossLayerTranscoder, x: torch.Tensor, pos, init: torch.Tensor, *, steps: int = 200,
                   lr: float = 0.05, seed: int = 0) -> tuple[torch.Tensor, float, float]:
    """θ [L, F] lowering the mean over (type, layer) of 1 − R² vs ``clt`` on rows ``x`` with ViT positions ``pos``.

    The gate H(pre − θ) is relaxed to a sigmoid of width τ·spread_f (spread_f: feature f's pre-activation
    standard deviation), τ annealed from 0.3 to 0.01; θ moves in log space (it stays > 0). Returns the hard-gated
    θ of the fit with its loss and the loss of ``init``; the caller keeps the better."""
    target = _Target(clt, x, pos, _batch_rows(clt))
    spread = target.spread()
    log_thr = init.clamp_min(MIN_THRESHOLD).log().clone().requires_grad_(True)
    frozen = [p for p in clt.parameters() if p.requires_grad]
    for p in frozen:  # only θ learns; no gradients into the CLT's weights
        p.requires_grad_(False)
    try:
        _descend(target, log_thr, spread, steps, lr, seed)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    fitted = log_thr.detach().exp().clamp_min(MIN_THRESHOLD)
    return fitted, target.hard_loss(fitted), target.hard_loss(init)


def _descend(target: _Target, log_thr: torch.Tensor, spread: torch.Tensor, steps: int, lr: float, seed: int):
    opt = torch.optim.Adam([log_thr], lr=lr)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dev = target.x.device
    per = max(1, target.batch // len(target.strata))
    for step in range(steps):
        tau = 0.3 * (0.01 / 0.3) ** (step / max(1, steps - 1))
        # the same number of rows from each token type (a ViT-B/16 has 1 CLS row in 197), each scaled by
        # n_type / drawn so the loss estimates the full-sample loss
        picks = [ids[torch.randint(len(ids), (per,), generator=gen).to(ids.device)] for ids in target.strata]
        rows = torch.cat(picks)
        scale = torch.cat([torch.full((per,), len(ids) / per, device=dev) for ids in target.strata])
        pre = target.pre(rows)
        gate = torch.sigmoid((pre - log_thr.exp()) / (tau * spread))
        loss = target.loss(pre * gate, rows, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def calibrate(clt: CrossLayerTranscoder, x: torch.Tensor, pos, method: str = "error",
              steps: int = 200) -> Calibration:
    """Thresholds for exporting ``clt`` (TopK) as JumpReLU, calibrated on rows ``x`` [N, L, d] at positions
    ``pos`` [N] (0 = CLS); ``clt`` must have identity standardisation or its own (``pre`` is read through it)."""
    if method not in METHODS:
        raise ValueError(f"calibration: {method!r} is not one of {', '.join(METHODS)}")
    freq = frequency_thresholds(clt, x)
    if method == "frequency":
        loss = _Target(clt, x, pos, _batch_rows(clt)).hard_loss(freq)
        return Calibration(freq, method, "frequency", {"frequency": loss})
    with torch.enable_grad():
        fitted, fit_loss, freq_loss = fit_thresholds(clt, x, pos, freq, steps=steps)
    losses = {"frequency": freq_loss, "error": fit_loss}
    if fit_loss < freq_loss:
        return Calibration(fitted, method, "error", losses)
    return Calibration(freq, method, "frequency", losses)
