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


def _accumulates_into_grad(ctx, weight: Tensor) -> bool:
    """True when this backward pass will add into ``weight.grad`` (AccumulateGrad of ``weight`` will run)."""
    if torch.is_grad_enabled():  # create_graph: autograd must build the sum out of place
        return False
    if not weight.is_leaf or not weight.requires_grad:
        return False
    g = weight.grad
    if g is None or g.layout != torch.strided or g.shape != weight.shape or g.dtype != weight.dtype:
        return False
    if g.device != weight.device or g.requires_grad:
        return False
    node = ctx.next_functions[2][0]
    if node is None or type(node).__name__ != "AccumulateGrad":
        return False
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):  # private API moved: stay on the always-correct path
        return False


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
            if ctx.inplace_grad and _accumulates_into_grad(ctx, weight) and weight.grad.is_contiguous():
                target = weight.grad.view(n_feat, width)
            else:
                grad_w = torch.zeros_like(flat, memory_format=torch.contiguous_format)
                target = grad_w
            _add_scaled_rows_(target, idx, v, g)
        if grad_val is not None:
            grad_val = grad_val.to(val.dtype)
        if grad_w is not None:
            grad_w = grad_w.view(weight.shape)
        return None, grad_val, grad_w, None


def sparse_decode(idx: Tensor, val: Tensor, weight: Tensor, *, inplace_grad: bool = True) -> Tensor:
    """``Σ_j val[b, j] · weight[idx[b, j]].flatten()`` -> [B, prod(weight.shape[1:])].

    idx [B, k] integer, val [B, k] float, weight [F, ...] (a leaf parameter for the in-place gradient fast path;
    pass the parameter itself, not a view of it). See the module docstring for the backward's contract.
    """
    if idx.dim() != 2 or val.shape != idx.shape:
        raise ValueError(f"sparse_decode: idx and val must both be [B, k], got {list(idx.shape)} and {list(val.shape)}")
    return SparseDecode.apply(idx.to(torch.long).contiguous(), val.contiguous(), weight, inplace_grad)


class RowsDecode(torch.autograd.Function):
    """``codes [B, n] @ weight[rows].flatten(1)``: a dense GEMM through a few rows of ``weight`` whose backward
    adds the n rows' gradient into ``weight.grad`` in place (the same contract as ``SparseDecode``), so neither
    direction touches the other F - n rows. Under autocast the GEMM runs in the autocast dtype."""

    @staticmethod
    def forward(ctx, rows: Tensor, codes: Tensor, weight: Tensor, inplace_grad: bool) -> Tensor:  # type: ignore[override]
        flat = weight.reshape(weight.shape[0], -1)
        dtype = _autocast_dtype(weight.device) or weight.dtype
        w_rows = flat.index_select(0, rows).to(dtype)
        with torch.autocast(weight.device.type, enabled=False):
            out = codes.to(dtype) @ w_rows
        ctx.save_for_backward(rows, codes, w_rows, weight)
        ctx.inplace_grad = inplace_grad
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        rows, codes, w_rows, weight = ctx.saved_tensors
        g = grad_out.to(w_rows.dtype)
        with torch.autocast(weight.device.type, enabled=False):
            grad_codes = (g @ w_rows.T).to(codes.dtype) if ctx.needs_input_grad[1] else None
            grad_rows = (codes.to(g.dtype).T @ g).to(weight.dtype) if ctx.needs_input_grad[2] else None
        grad_w = None
        if grad_rows is not None:
            n_feat = weight.shape[0]
            if ctx.inplace_grad and _accumulates_into_grad(ctx, weight) and weight.grad.is_contiguous():
                weight.grad.view(n_feat, -1).index_add_(0, rows, grad_rows)
            else:
                grad_w = torch.zeros(n_feat, grad_rows.shape[1], dtype=weight.dtype, device=weight.device)
                grad_w.index_add_(0, rows, grad_rows)
                grad_w = grad_w.view(weight.shape)
        return None, grad_codes, grad_w, None


def rows_decode(rows: Tensor, codes: Tensor, weight: Tensor, *, inplace_grad: bool = True) -> Tensor:
    """``codes [B, n] @ weight[rows].flatten(1)`` -> [B, prod(weight.shape[1:])], touching only those rows.

    rows [n] distinct integer row ids (``index_add_`` of duplicates would still be right, but the GEMM is
    meant for a set); weight: a leaf parameter for the in-place gradient (see ``sparse_decode``)."""
    if rows.dim() != 1 or codes.dim() != 2 or codes.shape[1] != rows.shape[0]:
        raise ValueError(f"rows_decode: rows [n] and codes [B, n] expected, got {list(rows.shape)}, "
                         f"{list(codes.shape)}")
    return RowsDecode.apply(rows.to(torch.long).contiguous(), codes.contiguous(), weight, inplace_grad)
