"""Which circuit-tracer hook an export reads from, and the LN2 affine that separates the two candidates.

The CLT was trained on open_clip's ``ln_2`` output, LayerNorm affine included: x = n ⊙ γ + β with
n = (r − mean r) / std r. In circuit-tracer 0.5 the hook ``ln2.hook_normalized`` is n, *before* γ and β: its
TransformerLens backend (transformer-lens 3.x: ``LayerNorm.forward`` applies ``hook_normalized`` to ``x / scale``
and returns ``x * w + b`` after it; 2.x hooked after the affine) and its nnsight mappings (``self__norm_0``
output, before the weight) agree. So:

* ``ln2.hook_normalized`` (default): γ and β of every layer's ``ln_2`` are folded into the encoder
  (``fold_input_affine``); the ViT's weights are loaded for them.
* ``mlp.hook_in``: the MLP input, affine included, as trained (TransformerLens' TransformerBridge and
  circuit-tracer's nnsight mappings name it so); nothing to fold.

``tests/test_ct_export.py`` hooks a real TransformerLens LayerNorm to check the installed version's semantics.
"""

from __future__ import annotations

import torch

from clt_pipe.errors import CltPipeError

LN2_NORMALIZED = "ln2.hook_normalized"
MLP_IN = "mlp.hook_in"
INPUT_HOOKS = (LN2_NORMALIZED, MLP_IN)
OUTPUT_HOOK = "hook_mlp_out"


def ln2_affine(model: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(γ, β) [L, d] of every block's ``ln_2`` of the ViT named by a store's model identity record ``model``."""
    from clt_pipe.backbone.loading import load_backbone

    arg, pretrained = model.get("model_arg") or model.get("name", ""), model.get("pretrained", "none")
    hint = f"; or export for the LN2 output as trained with --input-hook {MLP_IN}"
    try:
        bb = load_backbone(arg, pretrained, device)
    except CltPipeError as e:
        raise CltPipeError(f"export: {LN2_NORMALIZED} needs the ViT's ln_2 weights to fold: {e}{hint}") from None
    want = model.get("weights_sha256")
    if want and bb.weights_sha256 != want:
        raise CltPipeError(f"export: weights {pretrained!r} now hash to {bb.weights_sha256[:12]}, the CLT's store "
                           f"was harvested with {want[:12]}{hint}")
    gamma = torch.stack([b.ln_2.weight.detach().float() for b in bb.blocks]).to(device)
    beta = torch.stack([b.ln_2.bias.detach().float() for b in bb.blocks]).to(device)
    return gamma, beta


def normalized_from_ln_out(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """n from x = n ⊙ γ + β, x [N, L, d]: what ``ln2.hook_normalized`` holds where the store holds x.
    Where γ = 0 the folded encoder ignores n, so 0 is as good as any value."""
    safe = torch.where(gamma == 0, torch.ones_like(gamma), gamma)
    return torch.where(gamma == 0, torch.zeros_like(x), (x - beta) / safe)
