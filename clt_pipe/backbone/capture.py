"""Capture, in one forward pass, every layer's MLP input (LN2 output) and MLP output for chosen tokens.

Hooks gather the chosen token positions inside the hook, so the full [B, N, d] activations of all layers
are never held at once, and write straight into preallocated per-batch buffers on the model's device.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from clt_pipe.backbone.loading import Backbone
from clt_pipe.precision import autocast_context


@dataclass
class Captured:
    mlp_in: torch.Tensor  # [B, T, L, d]
    mlp_out: torch.Tensor  # [B, T, L, d]
    resid_final: torch.Tensor  # [B, d] float32: the CLS residual entering ln_post
    embedding: torch.Tensor  # [B, e] float32: ln_post(resid_final) @ proj, not normalised


def _batch_major(x: torch.Tensor, batch_first: bool) -> torch.Tensor:
    return x if batch_first else x.transpose(0, 1)


@contextmanager
def capture_hooks(bb: Backbone, positions: torch.Tensor, out_dtype: torch.dtype, all_tokens: bool = False):
    """Yields a dict filled by the next forward: ``mlp_in``/``mlp_out`` [B, T, L, d], ``resid_final`` [B, d].

    ``positions`` is [B, T] (long, on the model's device). ``all_tokens``: positions are 0..N-1 for every
    image, so the hooks copy whole sequences instead of gathering (saves ~0.7 ms per ViT-B/32 image on CPU).
    """
    transformer = bb.visual.transformer
    batch_first = getattr(transformer, "batch_first", True)
    n_layers = len(bb.blocks)
    B, T = positions.shape
    d = transformer.width
    store = {
        "mlp_in": torch.empty(B, T, n_layers, d, dtype=out_dtype, device=positions.device),
        "mlp_out": torch.empty(B, T, n_layers, d, dtype=out_dtype, device=positions.device),
    }
    gather_idx = positions[..., None].expand(B, T, d)

    def grab(name: str, layer: int):
        def hook(_module, _inputs, output):
            x = _batch_major(output, batch_first)
            if all_tokens:
                store[name][:, :, layer] = x  # the copy casts, rounding exactly as .to(out_dtype)
            else:
                store[name][:, :, layer] = torch.gather(x, 1, gather_idx).to(out_dtype)

        return hook

    def grab_final(_module, inputs):
        x = inputs[0]
        if x.dim() == 3:  # ln_post applied to the whole sequence: keep the CLS row
            x = _batch_major(x, batch_first)[:, 0]
        store["resid_final"] = x.float()

    handles = []
    try:
        for layer, block in enumerate(bb.blocks):
            handles.append(block.ln_2.register_forward_hook(grab("mlp_in", layer)))
            handles.append(block.mlp.register_forward_hook(grab("mlp_out", layer)))
        handles.append(bb.visual.ln_post.register_forward_pre_hook(grab_final))
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def run_capture(bb: Backbone, images: torch.Tensor, positions: torch.Tensor, out_dtype: torch.dtype,
                precision: str = "auto", all_tokens: bool = False) -> Captured:
    with capture_hooks(bb, positions, out_dtype, all_tokens) as store, autocast_context(images.device, precision):
        emb = bb.model.encode_image(images)
    return Captured(store["mlp_in"], store["mlp_out"], store["resid_final"], emb.float())
