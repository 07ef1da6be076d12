"""Targets recomputed from stored MLP inputs (store format v2, ``--targets recompute``).

A v2 store keeps ``mlp_in`` and every layer's MLP weights instead of ``mlp_out``: half the bytes to write, keep
and stream. ``mlp_out[l] = c_proj(act(c_fc(mlp_in[l])))``, computed here on the device that trains or
analyses, in float32. The values differ from the model's own outputs by the storage dtype's rounding of the
inputs; each shard keeps its first image's true outputs (``mlp_out_check``) so ``store verify`` can bound it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F_

from clt_pipe.checksums import crc32c
from clt_pipe.errors import StoreError
from clt_pipe.store import format as F


class RecomputedTargets:
    """Maps decoded MLP inputs [N, L, d] (any float dtype, on ``device``) to float32 MLP outputs [N, L, d]."""

    def __init__(self, group, activation: str, device: torch.device):
        if activation not in F.MLP_ACTIVATIONS:
            raise StoreError(f"unknown MLP activation {activation!r}")
        self.activation = activation
        arrays = {k: np.asarray(group[k][:], np.float32) for k in F.MLP_WEIGHTS}
        want = group.attrs.get("crc32c", {})
        bad = [k for k, a in arrays.items() if want.get(k) != crc32c(a)]
        if bad:
            raise StoreError(f"{F.MLP_GROUP}/{', '.join(bad)}: missing or damaged (checksum), so the targets "
                             f"cannot be recomputed; re-run the harvest with --overwrite")
        w = {k: torch.from_numpy(a).to(device) for k, a in arrays.items()}
        L, H = w["fc_bias"].shape
        # Rows per block: the two [L, rows, H] float32 hidden tensors stay around 512 MB whatever the model.
        self.block_rows = max(256, (256 << 20) // (L * H * 4))
        self.fc_wt = w["fc_weight"].transpose(1, 2).contiguous()  # [L, d, H]
        self.fc_b = w["fc_bias"][:, None, :]  # [L, 1, H]
        self.proj_wt = w["proj_weight"].transpose(1, 2).contiguous()  # [L, H, d]
        self.proj_b = w["proj_bias"][:, None, :]  # [L, 1, d]

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        if self.activation == "quick_gelu":
            return h * torch.sigmoid(1.702 * h)
        return F_.gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        with torch.autocast(x.device.type, enabled=False):
            for a in range(0, x.shape[0], self.block_rows):
                xl = x[a:a + self.block_rows].float().transpose(0, 1)  # [L, n, d]
                h = self._act(torch.baddbmm(self.fc_b, xl, self.fc_wt))
                out[a:a + self.block_rows] = torch.baddbmm(self.proj_b, h, self.proj_wt).transpose(0, 1)
        return out
