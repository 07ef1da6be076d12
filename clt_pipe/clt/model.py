"""The Cross-Layer Transcoder.

Layer l's encoder reads that layer's MLP input; feature (s, f) writes into every MLP output s..L-1 through
``W_dec[s][f] [L-s, d]`` (circuit-tracer layout). Training runs in standardised coordinates:

    x_std = (x_raw - in_mean[l]) / in_scale[l]          per-dim mean, one scalar scale per layer
    y_std = y_raw / out_scale[l]                         scaled only, never centred
    recon_raw = recon_std * out_scale[l] + b_dec[l]      b_dec (optional) lives in raw target space

Targets are not centred, so without ``b_dec`` the reconstruction is exactly the sum of per-source
contributions and attribution columns sum to 1. The defaults (mean 0, scales 1) are the identity; the trainer
sets store statistics with ``set_standardization`` and ``export.fold_standardization`` folds them into the
weights. The init assumes ``in_scale`` makes the per-dimension RMS of x_std about 1 (E‖x_std‖² ≈ d).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from clt_pipe.clt import sparsifiers as sp
from clt_pipe.clt.sparse_decode import columns_affine, sparse_decode
from clt_pipe.clt.spec import CLTSpec
from clt_pipe.errors import ConfigError

DECODE_MODES = ("auto", "sparse", "dense")
# Norm of each decoder row W_dec[s][f, t] at init: small, so the initial reconstruction is well below the target
# (FVU ≈ 1 rather than ≫ 1) even for JumpReLU, where about half the latents fire at first.
DEC_INIT_NORM = 0.1


@dataclass
class CLTOutput:
    """What one forward pass produced.

    ``recon_std`` excludes ``b_dec``; use ``recon`` for raw target space. ``z`` (dense codes) is materialised on
    first access for the sparse path (TopK family with sparse decode: only ``top_idx``/``top_val`` exist), and
    is differentiable either way. ``top_idx``/``top_val`` are None for jumprelu and batchtopk.
    """

    pre: Tensor  # [B, L, F] pre-activations (standardised input space)
    recon_std: Tensor  # [B, L, d] reconstruction in standardised target space, without b_dec
    out_scale: Tensor  # [L]
    b_dec: Tensor | None  # [L, d] raw-space decoder bias
    top_idx: Tensor | None = None  # [B, L, k] TopK family
    top_val: Tensor | None = None  # [B, L, k] (0 = kept slot that did not fire, ReLU-TopK only)
    z_dense: Tensor | None = field(default=None, repr=False)
    x_std: Tensor | None = field(default=None, repr=False)  # [B, L, d] the standardised input (AuxK re-reads it)

    @property
    def z(self) -> Tensor:
        if self.z_dense is None:
            assert self.top_idx is not None and self.top_val is not None
            self.z_dense = sp.dense_from_topk(self.top_idx, self.top_val, self.pre.shape[-1])
        return self.z_dense

    @property
    def recon(self) -> Tensor:
        """Reconstruction in raw target space [B, L, d]."""
        out = self.recon_std * self.out_scale[:, None].to(self.recon_std.dtype)
        return out if self.b_dec is None else out + self.b_dec

    def active(self) -> tuple[Tensor, Tensor] | Tensor:
        """Boolean activity: (top_idx, mask [B, L, k]) for the TopK family, else a dense mask [B, L, F]."""
        if self.top_idx is not None and self.z_dense is None:
            assert self.top_val is not None
            return self.top_idx, self.top_val.detach() != 0
        return self.z.detach() != 0

    @torch.no_grad()
    def l0(self) -> Tensor:
        """Mean number of active latents per token, per layer [L] (float32)."""
        act = self.active()
        mask = act[1] if isinstance(act, tuple) else act
        return mask.float().sum(-1).mean(0)

    @torch.no_grad()
    def fired(self) -> Tensor:
        """[L, F] bool: which latents were active for at least one token of this batch."""
        n_feat = self.pre.shape[2]
        act = self.active()
        if isinstance(act, tuple):
            return sp.fired_from_topk(act[0], act[1], n_feat)
        return act.any(0)


def auto_decode(is_topk: bool, device_type: str, low_precision: bool) -> str:
    """The faster decode where it runs. Sparse gathers win where FLOPs are dear (CPU, ViT-B sizes: 4.9-6.9x
    faster than dense; a CUDA fp32 GEMM: sparse 32 vs dense 53 ms); on a GPU under bf16/fp16 autocast the
    GEMM wins (H100, B=1024: dense 13 ms vs sparse 30 ms per decode fwd+bwd, B=4096: 38 vs 116 ms), because
    reading k rows of (L-s)·d per code costs more memory traffic than tensor cores spend on all F. The dense
    path holds [B, L, F] codes (B=4096, ViT-B x8: 1.2 GB). Figures: benchmarks/BENCHMARKS.md."""
    return "sparse" if is_topk and not (device_type == "cuda" and low_precision) else "dense"


class CrossLayerTranscoder(nn.Module):
    """Training contract of the sparse decode (TopK family): keep the W_dec gradients allocated and dense —
    call ``materialize_grads()`` once (after moving the model) and ``optimizer.zero_grad(set_to_none=False)``
    each step. The sparse backward then adds its B·k rows into ``W_dec[s].grad`` in place; with ``.grad`` None it
    falls back to returning a fresh dense F·(L-s)·d gradient (correct, as slow as the dense decode's gradient).
    AuxK's encoder columns (``preactivations_of``) follow the same contract for ``W_enc``/``b_enc``.
    Set ``inplace_decoder_grads = False`` under DDP/FSDP or with hooks on those parameters (they would miss
    these rows)."""

    inplace_decoder_grads: bool = True

    def __init__(self, spec: CLTSpec) -> None:
        super().__init__()
        self.spec = spec
        n_layers, d, n_feat = spec.n_layers, spec.d_model, spec.n_features
        self.W_enc = nn.Parameter(torch.empty(n_layers, d, n_feat))
        self.b_enc = nn.Parameter(torch.zeros(n_layers, n_feat))
        self.W_dec = nn.ParameterList([nn.Parameter(torch.empty(n_feat, n_layers - s, d)) for s in range(n_layers)])
        if spec.dec_bias:
            self.b_dec = nn.Parameter(torch.zeros(n_layers, d))
        else:
            self.register_parameter("b_dec", None)
        if spec.kind.threshold == "learned":
            self.log_threshold = nn.Parameter(torch.full((n_layers, n_feat), math.log(spec.jumprelu_threshold)))
        if spec.kind.threshold == "running":
            self.register_buffer("bt_threshold", torch.zeros(n_layers))
            self.register_buffer("bt_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("in_mean", torch.zeros(n_layers, d))
        self.register_buffer("in_scale", torch.ones(n_layers))
        self.register_buffer("out_scale", torch.ones(n_layers))
        self.reset_parameters()

    # ---------------------------------------------------------------- set-up

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random unit directions for every decoder row (norm DEC_INIT_NORM); each encoder column starts as the
        unit-norm transpose of its same-layer decoder row (tied init, which keeps few latents dead early on)."""
        for s, w in enumerate(self.W_dec):
            dirs = torch.randn_like(w)
            w.copy_(dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12) * DEC_INIT_NORM)
            own = w[:, 0, :]  # [F, d]: what feature (s, f) writes into its own layer
            self.W_enc[s].copy_((own / own.norm(dim=-1, keepdim=True).clamp_min(1e-12)).T)
        self.b_enc.zero_()
        if self.b_dec is not None:
            self.b_dec.zero_()

    @torch.no_grad()
    def set_standardization(self, in_mean: Tensor, in_scale: Tensor, out_scale: Tensor) -> None:
        """in_mean [L, d], in_scale [L], out_scale [L] (scales > 0); copied onto the module's device/dtype."""
        n_layers, d = self.spec.n_layers, self.spec.d_model
        vals = {"in_mean": in_mean, "in_scale": in_scale, "out_scale": out_scale}
        shapes = {"in_mean": (n_layers, d), "in_scale": (n_layers,), "out_scale": (n_layers,)}
        for name, value in vals.items():
            t = torch.as_tensor(value)
            if tuple(t.shape) != shapes[name]:
                raise ValueError(f"{name}: expected shape {shapes[name]}, got {tuple(t.shape)}")
            if not torch.isfinite(t).all():
                raise ValueError(f"{name}: contains non-finite values")
            if name != "in_mean" and not (t > 0).all():
                raise ValueError(f"{name}: scales must be > 0")
            getattr(self, name).copy_(t)

    @torch.no_grad()
    def materialize_grads(self) -> None:
        """Give every parameter that requires grad a dense zero ``.grad`` where it has none (W_dec included), so
        that the sparse decode's backward accumulates into it in place from the first step on. Pair with
        ``zero_grad(set_to_none=False)``; idempotent; call again after ``.to(device)`` or dtype changes."""
        for p in self.parameters():
            if p.requires_grad and (p.grad is None or p.grad.shape != p.shape or p.grad.device != p.device
                                    or p.grad.dtype != p.dtype or p.grad.layout != torch.strided):
                p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)

    # ------------------------------------------------------------ properties

    @property
    def n_layers(self) -> int:
        return self.spec.n_layers

    @property
    def d_model(self) -> int:
        return self.spec.d_model

    @property
    def n_features(self) -> int:
        return self.spec.n_features

    def threshold(self) -> Tensor | None:
        """Inference thresholds [L, F] on pre-activations (jumprelu, batchtopk), None for the TopK family."""
        if self.spec.kind.threshold == "learned":
            return self.log_threshold.exp()
        if self.spec.kind.threshold == "running":
            return self.bt_threshold.clamp_min(0)[:, None].expand(-1, self.n_features)
        return None

    def decoder_norms(self) -> Tensor:
        """‖W_dec row‖ over all target layers, per source feature [L, F] (standardised space)."""
        return torch.stack([w.flatten(1).norm(dim=-1) for w in self.W_dec])

    def b_dec_or_zeros(self) -> Tensor:
        """The raw-space decoder bias [L, d] (zeros without one)."""
        if self.b_dec is not None:
            return self.b_dec
        return self.out_scale.new_zeros(self.n_layers, self.d_model)

    # -------------------------------------------------------------- encoding

    def _check_x(self, x_raw: Tensor) -> None:
        if x_raw.dim() != 3 or tuple(x_raw.shape[1:]) != (self.n_layers, self.d_model):
            raise ValueError(f"x: expected [B, {self.n_layers}, {self.d_model}], got {list(x_raw.shape)}")

    def standardize(self, x_raw: Tensor) -> Tensor:
        """[B, L, d] raw inputs -> standardised inputs [B, L, d] (what the encoders read)."""
        self._check_x(x_raw)
        return (x_raw.to(self.W_enc.dtype) - self.in_mean) / self.in_scale[:, None]

    def preactivations(self, x_raw: Tensor) -> Tensor:
        """[B, L, d] raw inputs -> [B, L, F] pre-activations."""
        return self._preactivations_std(self.standardize(x_raw))

    def _preactivations_std(self, x_std: Tensor) -> Tensor:
        pre = torch.baddbmm(self.b_enc[:, None, :], x_std.transpose(0, 1), self.W_enc)  # [L, B, F]: a GEMM per layer
        return pre.transpose(0, 1)

    def preactivations_of(self, x_std: Tensor, cols: Tensor) -> Tensor:
        """Standardised inputs [B, L, d], column ids [L, m] -> those latents' pre-activations [B, L, m]: the
        same values as ``preactivations(x).gather(2, cols)`` (to rounding), at m/F of the cost, and a backward
        that touches only those m encoder columns (``columns_affine``; AuxK's dead latents)."""
        pre = columns_affine(cols, x_std.transpose(0, 1), self.W_enc, self.b_enc,
                             inplace_grad=self.inplace_decoder_grads)
        return pre.transpose(0, 1)

    def _sparsify(
        self, pre: Tensor, layer: int | None = None, update: bool = False
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """pre [B, L, F] (or [N, F] for one ``layer``) -> (dense z | None, top_idx | None, top_val | None).
        ``update``: fold this batch into batchtopk's running threshold (training-mode forward only)."""
        kind, k = self.spec.kind, self.spec.k
        if kind.topk:
            idx, val = sp.topk_codes(pre, k, signed=kind.signed)
            return None, idx, val
        if kind.threshold == "learned":  # jumprelu
            thr = self.log_threshold.exp()
            return sp.jumprelu(pre, thr if layer is None else thr[layer], self.spec.jumprelu_bandwidth), None, None
        # batchtopk
        if self.training:
            z, min_kept = sp.batchtopk_train(pre if layer is None else pre[:, None, :], k)
            if update and layer is None:
                sp.ema_update(self.bt_threshold, self.bt_updates, min_kept)
            return (z if layer is None else z[:, 0, :]), None, None
        thr = self.bt_threshold[:, None] if layer is None else self.bt_threshold[layer]
        return sp.batchtopk_infer(pre, thr), None, None

    def encode(self, x_raw: Tensor) -> Tensor:
        """Dense codes [B, L, F]. Only ``forward`` updates batchtopk's running threshold."""
        z, idx, val = self._sparsify(self.preactivations(x_raw))
        return z if z is not None else sp.dense_from_topk(idx, val, self.n_features)

    def encode_layer(self, x_raw_l: Tensor, layer: int) -> Tensor:
        """Dense codes [N, F] of one layer from its raw input [N, d]. BatchTopK in training mode treats the N
        rows as the batch but leaves the running threshold alone."""
        x = (x_raw_l.to(self.W_enc.dtype) - self.in_mean[layer]) / self.in_scale[layer]
        pre = torch.addmm(self.b_enc[layer], x, self.W_enc[layer])
        z, idx, val = self._sparsify(pre, layer)
        return z if z is not None else sp.dense_from_topk(idx, val, self.n_features)

    # -------------------------------------------------------------- decoding

    def _decode_mode(self, decode: str) -> str:
        if decode not in DECODE_MODES:
            raise ConfigError(f"decode: {decode!r} is not one of {', '.join(DECODE_MODES)}")
        if decode == "auto":
            dev = self.W_enc.device.type
            low = dev == "cuda" and torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) != torch.float32
            return auto_decode(self.spec.is_topk, dev, low)
        if decode == "sparse" and not self.spec.is_topk:
            raise ConfigError(f"decode: sparse needs a per-token TopK sparsifier, not {self.spec.sparsifier}")
        return decode

    def _source_sparse(self, s: int, idx: Tensor, val: Tensor) -> Tensor:
        """Source s's writes [B, L-s, d] from its k (index, value) pairs: gathers k rows instead of F.

        The backward touches only those B·k rows of W_dec[s]; it adds them straight into a pre-existing dense
        ``W_dec[s].grad`` (see ``materialize_grads`` and clt_pipe/clt/sparse_decode.py)."""
        out = sparse_decode(idx, val, self.W_dec[s], inplace_grad=self.inplace_decoder_grads)
        return out.view(idx.shape[0], self.n_layers - s, self.d_model)

    def _source_dense(self, s: int, z_s: Tensor) -> Tensor:
        """Source s's writes [B, L-s, d] from dense codes [B, F]."""
        w = self.W_dec[s]
        out = z_s.to(w.dtype) @ w.view(self.n_features, -1)
        return out.view(z_s.shape[0], self.n_layers - s, self.d_model)

    def _sources(self, z: Tensor | None, idx: Tensor | None, val: Tensor | None, sparse: bool):
        for s in range(self.n_layers):
            if sparse:
                assert idx is not None and val is not None
                yield s, self._source_sparse(s, idx[:, s], val[:, s])
            else:
                assert z is not None
                yield s, self._source_dense(s, z[:, s])

    def _decode_std(self, z: Tensor | None, idx: Tensor | None, val: Tensor | None, sparse: bool) -> Tensor:
        # Concatenate every source's writes [B, L-s, d] -> [B, L(L+1)/2, d] and sum them into their targets with
        # one tiny matmul by a constant 0/1 [L, L(L+1)/2] matrix: one op (and one GEMM backward) instead of L
        # in-place slice updates, whose backward costs ~10 small ops each.
        return self.fold_sources(list(self._sources(z, idx, val, sparse)))

    def fold_sources(self, parts: Sequence[tuple[int, Tensor]]) -> Tensor:
        """Sources' writes [(s, [B, L-s, d]), ...] -> their sum per target layer [B, L, d] (zero where no
        listed source writes)."""
        stacked = torch.cat([part for _, part in parts], dim=1)
        n_layers, dev = self.n_layers, stacked.device
        tgt = torch.cat([torch.arange(s, n_layers, device=dev) for s, _ in parts])
        fold = (torch.arange(n_layers, device=dev)[:, None] == tgt[None, :]).to(stacked.dtype)
        return torch.matmul(fold, stacked)

    def decode(self, z: Tensor) -> Tensor:
        """Dense codes [B, L, F] -> raw reconstruction [B, L, d]."""
        recon = self._decode_std(z, None, None, sparse=False)
        recon = recon * self.out_scale[:, None].to(recon.dtype)
        return recon if self.b_dec is None else recon + self.b_dec

    def decode_to(self, z_by_layer: Sequence[Tensor | None], target: int) -> Tensor:
        """Raw reconstruction [N, d] of layer ``target`` from dense codes [N, F] of sources 0..target.

        A None entry means that source does not write (windowed substitution); entries past ``target`` are
        ignored and a short list means the missing sources do not write. Torch sparse (COO) codes are accepted.
        """
        if not 0 <= target < self.n_layers:
            raise ValueError(f"target: {target} is outside 0..{self.n_layers - 1}")
        acc: Tensor | None = None
        for s in range(min(len(z_by_layer), target + 1)):
            z = z_by_layer[s]
            if z is None:
                continue
            w = self.W_dec[s][:, target - s, :]  # [F, d]
            part = torch.sparse.mm(z.to(w.dtype), w) if z.is_sparse else z.to(w.dtype) @ w
            acc = part if acc is None else acc + part
        if acc is None:
            raise ValueError("decode_to: at least one source layer must write (all entries are None)")
        acc = acc * self.out_scale[target].to(acc.dtype)
        return acc if self.b_dec is None else acc + self.b_dec[target]

    # --------------------------------------------------------------- forward

    def forward(self, x_raw: Tensor, *, decode: str = "auto") -> CLTOutput:
        mode = self._decode_mode(decode)
        x_std = self.standardize(x_raw)
        pre = self._preactivations_std(x_std)
        z, idx, val = self._sparsify(pre, update=True)
        if mode == "dense" and z is None:
            z = sp.dense_from_topk(idx, val, self.n_features)
        recon_std = self._decode_std(z, idx, val, sparse=mode == "sparse")
        return CLTOutput(
            pre=pre,
            recon_std=recon_std,
            out_scale=self.out_scale,
            b_dec=self.b_dec,
            top_idx=idx,
            top_val=val,
            z_dense=z,
            x_std=x_std,
        )

    def contributions(self, x_raw: Tensor) -> Tensor:
        """Raw-space c(i→j) = z_i W_dec^{i→j} * out_scale_j as [B, L_src, L_tgt, d]; zero for i > j.
        Summed over sources it equals ``recon - b_dec``."""
        pre = self.preactivations(x_raw)
        z, idx, val = self._sparsify(pre)
        sparse = z is None
        n_layers = self.n_layers
        out: Tensor | None = None
        for s, part in self._sources(z, idx, val, sparse):
            if out is None:
                out = part.new_zeros(part.shape[0], n_layers, n_layers, self.d_model)
            out[:, s, s:] = part
        assert out is not None
        return out * self.out_scale[None, None, :, None].to(out.dtype)
