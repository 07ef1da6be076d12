"""The MLP of open_clip's ViT blocks as ``--targets recompute`` stores it: its activation name and weights."""

from __future__ import annotations

import numpy as np
import torch
from open_clip.transformer import QuickGELU

from clt_pipe.errors import ConfigError


def mlp_activation(blocks) -> str:
    """The activation of every block's MLP. Only the plain ``c_fc -> GELU/QuickGELU -> c_proj`` MLP of
    open_clip's ViTs can be recomputed from stored weights; anything else is refused."""
    acts = set()
    for i, block in enumerate(blocks):
        names = [n for n, _ in block.mlp.named_children()]
        act = getattr(block.mlp, "gelu", None)
        if names != ["c_fc", "gelu", "c_proj"]:
            raise ConfigError(f"targets=recompute: block {i}'s MLP is {names}, not c_fc -> gelu -> c_proj; "
                              f"use --targets stored")
        if isinstance(act, QuickGELU):
            acts.add("quick_gelu")
        elif isinstance(act, torch.nn.GELU):
            acts.add("gelu" if act.approximate == "none" else "gelu_tanh")
        else:
            raise ConfigError(f"targets=recompute: unsupported MLP activation {type(act).__name__}; "
                              f"use --targets stored")
    if len(acts) != 1:
        raise ConfigError(f"targets=recompute: the blocks use different activations {sorted(acts)}")
    return acts.pop()


def mlp_weights(blocks) -> dict[str, np.ndarray]:
    """Every block's MLP weights stacked over layers (float32), as the store's ``mlp_weights/`` group."""
    mlp_activation(blocks)

    def stack(attr: str, param: str) -> np.ndarray:
        return torch.stack([getattr(getattr(b.mlp, attr), param).detach().float().cpu() for b in blocks]).numpy()

    return {"fc_weight": stack("c_fc", "weight"), "fc_bias": stack("c_fc", "bias"),
            "proj_weight": stack("c_proj", "weight"), "proj_bias": stack("c_proj", "bias")}
