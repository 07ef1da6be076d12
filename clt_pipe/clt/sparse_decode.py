"""Sparse TopK decode with a sparse backward: ``out[b] = Σ_j val[b, j] · weight[idx[b, j]]``.

Autograd through ``F.embedding_bag`` (or ``index_select``) hands back a *dense* gradient of the whole
``weight`` [F, ...] every step: freshly allocated, zero-filled, then added into ``.grad`` (1.37 GiB per step for
a ViT-B CLT, plus a ~1 GB temporary inside the CPU embedding_bag backward), while the real work is B·k rows.
``sparse_decode`` does only the B·k rows:

* forward: ``embedding_bag(mode="sum", per_sample_weights=val)``;
* backward, ``val``: ``grad_val[b, j] = ⟨grad_out[b], weight[idx[b, j]]⟩``, with embedding_bag's own
  per-sample-weights backward kernel (no gathered [B·k, D] copy; chunked gather + bmm as a fallback);
* backward, ``weight``: ``grad_weight[idx[b, j]] += val[b, j] · grad_out[b]``, added **directly into the
  existing dense ``weight.grad``** (and ``None`` returned to autograd), so nothing of size F·D is allocated per
  step. On CPU this is one in-place ``grad.addmm_(Zᵀ, grad_out)`` with Zᵀ the [F, B] sparse COO matrix of the
  codes (a fused axpy per code); elsewhere chunked ``index_add_`` of the scaled rows.

Why not return a sparse COO gradient and let autograd accumulate it? That also works in this torch version
(dense ``.grad`` += sparse COO happens in place), but its values tensor [B·k, D] must exist whole: ~1 GB per step
at B=128 and ~8 GB at the trainer's B=1024 (B·k ≫ F), freshly allocated each step (page faults), then a
second pass to add it. Writing into ``.grad`` directly keeps the temporaries small whatever the batch.

The in-place write is used only when it is exactly what autograd would have done (the *fast path*):

* ``weight`` is a leaf whose ``.grad`` is a dense tensor of the same shape/dtype/device (so the trainer must
  keep gradients allocated: ``zero_grad(set_to_none=False)``, see ``CrossLayerTranscoder.materialize_grads``);
* this backward pass accumulates into ``.grad`` at all (``loss.backward()``; not ``torch.autograd.grad``, nor
  ``backward(inputs=...)`` that leaves ``weight`` out: checked with the engine's own bookkeeping);
* no ``create_graph`` (the gradient is not differentiable again: ``once_differentiable``).

Otherwise (``.grad`` is None, ``autograd.grad``, ``create_graph``) the backward returns an ordinary dense
gradient built the same chunked way: correct everywhere, just as costly as before per step.

Constraints of the fast path: hooks registered on ``weight`` (``register_hook``, ``register_post_accumulate_
grad_hook``) do not see this contribution, and DDP/FSDP, which hook the gradient accumulator, would miss it;
pass ``inplace_grad=False`` (``CrossLayerTranscoder.inplace_decoder_grads = False``) there. Gradient
accumulation over several ``backward`` calls is intact (each call adds), and several uses of the same weight in
one graph (the decode and the aux-k loss) each add their share.

Autocast: the gather-and-sum runs in ``weight``'s dtype (the fp32 master weights are read either way; the op is
bandwidth bound), and the output is cast to the autocast dtype when autocast is enabled on ``weight``'s device
(CUDA bf16 training gets a bf16 output like the dense GEMM path; CPU without autocast is unchanged). Gradients
come back in the inputs' dtypes (``val``'s for ``grad_val``, ``weight``'s for ``grad_weight``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# Largest temporary of the backward, in elements (gathered rows / scaled grad rows of one batch chunk).
_CHUNK_ELEMS = 1 << 22


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _accumulates_into_grad(ctx, weight: Tensor, position: int = 2) -> bool:
    """True when this backward pass will add into ``weight.grad`` (AccumulateGrad of ``weight``, the forward's
    input number ``position``, will run)."""
    if torch.is_grad_enabled():  # create_graph: autograd must build the sum out of place
        return False
    if not weight.is_leaf or not weight.requires_grad:
        return False
    g = weight.grad
    if g is None or g.layout != torch.strided or g.shape != weight.shape or g.dtype != weight.dtype:
        return False
    if g.device != weight.device or g.requires_grad:
        return False
    node = ctx.next_functions[position][0]
    if node is None or type(node).__name__ != "AccumulateGrad":
        return False
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):  # private API moved: stay on the always-correct path
        return False


def _grad_sink(ctx, param: Tensor, position: int = 2) -> tuple[Tensor, Tensor | None]:
    """Where a backward adds ``param``'s gradient: (``param.grad`` itself, None) when autograd would only have
    added the result into it (``_accumulates_into_grad``), else (a fresh zero tensor, that same tensor), which
    the backward returns to autograd. Shared by every function here with the in-place contract."""
    if ctx.inplace_grad and _accumulates_into_grad(ctx, param, position) and param.grad.is_contiguous():
        return param.grad, None
    fresh = torch.zeros_like(param, memory_format=torch.contiguous_format)
    return fresh, fresh


def _grad_val(idx: Tensor, g: Tensor, flat: Tensor) -> Tensor:
    """[B, k]: ⟨g[b], flat[idx[b, j]]⟩ without materialising the gathered rows (embedding_bag's own kernel)."""
    n_batch, k = idx.shape
    dev = idx.device
    try:
        offsets = torch.arange(0, n_batch * k, k, device=dev)
        bag = torch.arange(n_batch, device=dev).repeat_interleave(k)
        out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            g.contiguous(), flat, idx.reshape(-1), offsets, bag, 0, -1  # mode 0 = sum, no padding_idx
        )
        return out.view(n_batch, k)
    except (RuntimeError, AttributeError, NotImplementedError):  # private op unavailable: gather in chunks
        pass
    width = flat.shape[1]
    out = torch.empty(n_batch, k, dtype=flat.dtype, device=dev)
    step = max(1, _CHUNK_ELEMS // max(1, k * width))
    for b0 in range(0, n_batch, step):
        b1 = min(n_batch, b0 + step)
        rows = flat.index_select(0, idx[b0:b1].reshape(-1)).view(b1 - b0, k, width)
        out[b0:b1] = torch.bmm(rows, g[b0:b1, :, None])[..., 0]
    return out


def _add_scaled_rows_(target: Tensor, idx: Tensor, v: Tensor, g: Tensor) -> None:
    """target[idx[b, j]] += v[b, j] · g[b], in place, with no temporary of size F·D or B·k·D."""
    n_batch, k = idx.shape
    width = target.shape[1]
    if target.device.type == "cpu":
        # target += Zᵀ g with Zᵀ the [F, B] sparse COO matrix of the codes: CPU's sparse-dense addmm_ walks the
        # B·k entries and does one fused axpy per row into target (duplicates just add; no coalescing needed).
        # index_add_ instead needs the scaled rows materialised, and with int64 indices takes scatter_add's
        # O(F·D)-per-call path.
        rows = torch.stack([idx.reshape(-1), torch.arange(n_batch, device=idx.device).repeat_interleave(k)])
        zt = torch.sparse_coo_tensor(rows, v.reshape(-1), (target.shape[0], n_batch), check_invariants=False)
        target.addmm_(zt, g)
        return
    step = max(1, _CHUNK_ELEMS // max(1, k * width))
    for b0 in range(0, n_batch, step):
        b1 = min(n_batch, b0 + step)
        scaled = (v[b0:b1, :, None] * g[b0:b1, None, :]).view(-1, width)
        target.index_add_(0, idx[b0:b1].reshape(-1), scaled)


class SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx: Tensor, val: Tensor, weight: Tensor, inplace_grad: bool) -> Tensor:  # type: ignore[override]
        n_feat = weight.shape[0]
        flat = weight.reshape(n_feat, -1)
        out_dtype = _autocast_dtype(weight.device) or weight.dtype
        with torch.autocast(weight.device.type, enabled=False):
            out = F.embedding_bag(idx, flat, per_sample_weights=val.to(weight.dtype), mode="sum")
        ctx.save_for_backward(idx, val, weight)
        ctx.inplace_grad = inplace_grad
        return out.to(out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        idx, val, weight = ctx.saved_tensors
        need_val, need_w = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        n_feat = weight.shape[0]
        flat = weight.reshape(n_feat, -1)
        width = flat.shape[1]
        g = grad_out.to(weight.dtype).contiguous()
        v = val.to(weight.dtype)

        grad_val = _grad_val(idx, g, flat) if need_val else None
        grad_w = None
        if need_w:
            target, grad_w = _grad_sink(ctx, weight)
            _add_scaled_rows_(target.view(n_feat, width), idx, v, g)
        if grad_val is not None:
            grad_val = grad_val.to(val.dtype)
        return None, grad_val, grad_w, None


def sparse_decode(idx: Tensor, val: Tensor, weight: Tensor, *, inplace_grad: bool = True) -> Tensor:
    """``Σ_j val[b, j] · weight[idx[b, j]].flatten()`` -> [B, prod(weight.shape[1:])].

    idx [B, k] integer, val [B, k] float, weight [F, ...] (a leaf parameter for the in-place gradient fast path;
    pass the parameter itself, not a view of it). See the module docstring for the backward's contract.
    """
    if idx.dim() != 2 or val.shape != idx.shape:
        raise ValueError(f"sparse_decode: idx and val must both be [B, k], got {list(idx.shape)} and {list(val.shape)}")
    return SparseDecode.apply(idx.to(torch.long).contiguous(), val.contiguous(), weight, inplace_grad)


class RowsDecodeTriangle(torch.autograd.Function):
    """Σ_s ``codes_s [B, n_s] @ W_dec[s][rows_s]`` written into target layers s..L-1 of one [B, L, d] output:
    each source's GEMM accumulates straight into its strided slice of the output (no per-source temporaries, no
    concatenation, no fold), the backward reads the same strided slices of the output gradient, and the
    decoder rows' gradients are added into ``W_dec[s].grad`` in place (the ``SparseDecode`` contract). On CPU at
    ViT-B sizes the concatenate-and-fold alternative spent as long copying as the GEMMs took.

    Inputs after the first three: (rows_s, codes_s, weight_s) per source s listed in ``sources``."""

    @staticmethod
    def forward(ctx, sources: tuple[int, ...], shape: tuple[int, int, int], inplace_grad: bool, *args: Tensor):  # type: ignore[override]
        n_batch, n_layers, d = shape
        weights = args[2::3]
        dtype = _autocast_dtype(weights[0].device) or weights[0].dtype
        out = torch.zeros(n_batch, n_layers * d, dtype=torch.float32, device=weights[0].device)
        saved = []
        with torch.autocast(weights[0].device.type, enabled=False):
            for s, rows, codes, weight in zip(sources, args[0::3], args[1::3], weights):
                w_rows = weight.reshape(weight.shape[0], -1).index_select(0, rows).to(dtype)
                c = codes.to(dtype)
                target = out[:, s * d:]  # [B, (L-s)·d], row stride L·d: a valid GEMM output as it is
                if dtype == torch.float32:
                    target.addmm_(c, w_rows)
                else:  # accumulate the low-precision products in float32
                    target.add_(c @ w_rows)
                saved += [rows, c, w_rows, weight]
        ctx.save_for_backward(*saved)
        ctx.sources, ctx.d, ctx.inplace_grad = sources, d, inplace_grad
        return out.view(n_batch, n_layers, d)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        saved, d = ctx.saved_tensors, ctx.d
        g_all = grad_out.reshape(grad_out.shape[0], -1)
        grads: list[Tensor | None] = [None, None, None]
        for i, s in enumerate(ctx.sources):
            rows, codes, w_rows, weight = saved[4 * i: 4 * i + 4]
            g = g_all[:, s * d:].to(w_rows.dtype)  # a strided view (a copy only under autocast)
            grad_codes = grad_w = None
            with torch.autocast(weight.device.type, enabled=False):
                if ctx.needs_input_grad[3 + 3 * i + 1]:
                    grad_codes = g @ w_rows.T
                if ctx.needs_input_grad[3 + 3 * i + 2]:
                    # autograd's edges skip the three non-tensor inputs: weight i is edge 3·i + 2
                    target, grad_w = _grad_sink(ctx, weight, 3 * i + 2)
                    target.view(weight.shape[0], -1).index_add_(0, rows, (codes.T @ g).to(weight.dtype))
            grads += [None, grad_codes, grad_w]
        return tuple(grads)


def rows_decode_triangle(parts: list[tuple[int, Tensor, Tensor, Tensor]], n_layers: int, *,
                         inplace_grad: bool = True) -> Tensor:
    """[(s, rows [n_s], codes [B, n_s], W_dec[s] [F, L-s, d]), ...] -> float32 [B, L, d]: every listed source's
    decode through its rows, summed into its targets (see ``RowsDecodeTriangle``)."""
    if not parts:
        raise ValueError("rows_decode_triangle: no sources")
    n_batch, d = parts[0][2].shape[0], parts[0][3].shape[-1]
    args: list[Tensor] = []
    for s, rows, codes, weight in parts:
        if rows.dim() != 1 or codes.shape != (n_batch, rows.shape[0]) or weight.shape[1:] != (n_layers - s, d):
            raise ValueError(f"rows_decode_triangle: source {s}: rows [n], codes [B, n], W_dec [F, L-s, d] "
                             f"expected, got {list(rows.shape)}, {list(codes.shape)}, {list(weight.shape)}")
        args += [rows.to(torch.long).contiguous(), codes.contiguous(), weight]
    return RowsDecodeTriangle.apply(tuple(s for s, *_ in parts), (n_batch, n_layers, d), inplace_grad, *args)


class ColumnsAffine(torch.autograd.Function):
    """``x[l] @ weight[l][:, cols[l]] + bias[l][cols[l]]`` per layer l: the pre-activations of a few latents
    without the other F - m columns, and a backward that adds the m columns' gradients into ``weight.grad`` and
    ``bias.grad`` in place (the ``SparseDecode`` contract). Gathering those columns out of the full [B, L, F]
    pre-activations instead would cost a B·L·F zero-filled gradient, a scatter and an add per step."""

    @staticmethod
    def forward(ctx, cols: Tensor, x: Tensor, weight: Tensor, bias: Tensor, inplace_grad: bool) -> Tensor:  # type: ignore[override]
        n_layers, d, m = weight.shape[0], weight.shape[1], cols.shape[1]
        dtype = _autocast_dtype(weight.device) or weight.dtype
        w_cols = weight.gather(2, cols[:, None, :].expand(n_layers, d, m)).to(dtype)  # [L, d, m]
        b_cols = bias.gather(1, cols).to(dtype)  # [L, m]
        with torch.autocast(weight.device.type, enabled=False):
            out = torch.baddbmm(b_cols[:, None, :], x.to(dtype), w_cols)  # [L, B, m]
        ctx.save_for_backward(cols, x, w_cols, weight, bias)
        ctx.inplace_grad = inplace_grad
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        cols, x, w_cols, weight, bias = ctx.saved_tensors
        g = grad_out.to(w_cols.dtype)
        n_layers, d, m = weight.shape[0], weight.shape[1], cols.shape[1]
        grad_x = grad_w = grad_b = None
        with torch.autocast(weight.device.type, enabled=False):
            if ctx.needs_input_grad[1]:
                grad_x = torch.bmm(g, w_cols.transpose(1, 2)).to(x.dtype)
            w_part = torch.bmm(x.to(g.dtype).transpose(1, 2), g).to(weight.dtype) if ctx.needs_input_grad[2] else None
            b_part = g.sum(1).to(bias.dtype) if ctx.needs_input_grad[3] else None
        if w_part is not None:
            target, grad_w = _grad_sink(ctx, weight, 2)
            target.scatter_add_(2, cols[:, None, :].expand(n_layers, d, m), w_part)
        if b_part is not None:
            target, grad_b = _grad_sink(ctx, bias, 3)
            target.scatter_add_(1, cols, b_part)
        return None, grad_x, grad_w, grad_b, None


def columns_affine(cols: Tensor, x: Tensor, weight: Tensor, bias: Tensor, *, inplace_grad: bool = True) -> Tensor:
    """cols [L, m] distinct column ids per layer, x [L, B, d], weight [L, d, F], bias [L, F] -> [L, B, m]."""
    if cols.dim() != 2 or x.dim() != 3 or weight.dim() != 3 or cols.shape[0] != weight.shape[0]:
        raise ValueError(f"columns_affine: cols [L, m], x [L, B, d], weight [L, d, F] expected, got "
                         f"{list(cols.shape)}, {list(x.shape)}, {list(weight.shape)}")
    return ColumnsAffine.apply(cols.to(torch.long).contiguous(), x, weight, bias, inplace_grad)
