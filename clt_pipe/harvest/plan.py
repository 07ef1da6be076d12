"""What a harvest will write: its inputs, its layout and byte count, and the store's identity (root metadata).

Everything here is decided before the first image is read, so ``--dry-run``, the single-process loop and every
dask worker compute the same plan and the same store identity from the same config.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

from clt_pipe.backbone.loading import Backbone, load_backbone
from clt_pipe.backbone.mlp import mlp_activation
from clt_pipe.config import HarvestConfig
from clt_pipe.datasets.base import ImageDataset
from clt_pipe.datasets.content import content_sha256
from clt_pipe.datasets.registry import open_dataset
from clt_pipe.device import resolve_device
from clt_pipe.errors import CltPipeError
from clt_pipe.precision import resolve_precision
from clt_pipe.store import format as F
from clt_pipe.store.meta import ABSENT, Activations, DatasetInfo, StoreMeta, TokenSelection
from clt_pipe.tokens import TokenPolicy


@dataclass
class HarvestPlan:
    layout: F.StoreLayout
    bytes_uncompressed: int
    tokens: TokenPolicy


def open_inputs(cfg: HarvestConfig) -> tuple[ImageDataset, Backbone]:
    dataset = open_dataset(cfg.dataset, cfg.data_root, cfg.split, coco_label_rule=cfg.coco_label_rule)
    bb = load_backbone(cfg.model, cfg.pretrained, resolve_device(cfg.device))
    return dataset, bb


def n_images(cfg: HarvestConfig, dataset: ImageDataset) -> int:
    return min(len(dataset), cfg.limit) if cfg.limit else len(dataset)


def plan(cfg: HarvestConfig, dataset: ImageDataset, bb: Backbone) -> HarvestPlan:
    tokens = TokenPolicy.parse(cfg.tokens)
    T = tokens.tokens_per_image(bb.identity.n_positions)
    L, d = bb.identity.n_layers, bb.identity.d_model
    layout = F.StoreLayout.plan(n_images(cfg, dataset), T, L, d, F.ACTIVATION_ITEMSIZE, cfg.chunk_mb,
                                cfg.chunks_per_shard)
    n_arrays = 1 if cfg.targets == "recompute" else 2
    return HarvestPlan(layout, layout.activation_bytes(n_arrays), tokens)


@torch.inference_mode()
def text_classifiers(bb: Backbone, class_names: list[str], templates: dict[str, list[str]],
                     sets: list[str]) -> dict[str, np.ndarray]:
    """Per template set: the mean of normalised prompt embeddings per class, renormalised ([C, e])."""
    out = {}
    for name in sets:
        if name not in templates:
            raise CltPipeError(f"template_sets: {name!r} is not a template set of this dataset "
                               f"(has: {', '.join(templates)})")
        rows = []
        for c in class_names:
            tokens = bb.tokenizer([t.replace("{c}", c) for t in templates[name]]).to(bb.device)
            emb = bb.model.encode_text(tokens).float()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(0)
            rows.append((mean / mean.norm()).cpu().numpy())
        out[name] = np.stack(rows)
    return out


def sources_sha256(dataset: ImageDataset, n: int) -> str:
    """Identifies the exact images (and labels) of a harvest: another dataset of the same shape differs here."""
    h = hashlib.sha256()
    for i in range(n):
        r = dataset.record(i)
        h.update(f"{r.source}\t{r.label}\n".encode())
    return h.hexdigest()


def resolved_root(data_root: str) -> str:
    """The data root as recorded and compared on resume: absolute, symlinks resolved ("" when none)."""
    return os.path.realpath(data_root) if data_root else ""


def store_meta(cfg: HarvestConfig, dataset: ImageDataset, bb: Backbone, hp: HarvestPlan) -> StoreMeta:
    pre = bb.visual.preprocess_cfg if hasattr(bb.visual, "preprocess_cfg") else {}
    recompute = cfg.targets == "recompute"
    return StoreMeta(
        model=bb.identity,
        preprocess={k2: (list(v) if isinstance(v, tuple) else v) for k2, v in pre.items()},
        dataset=DatasetInfo(name=dataset.name, split=dataset.split, n_images=hp.layout.n_images,
                            class_names=list(dataset.class_names), data_root=resolved_root(cfg.data_root),
                            coco_label_rule=cfg.coco_label_rule if dataset.name == "coco" else None,
                            sources_sha256=sources_sha256(dataset, hp.layout.n_images),
                            content_sha256=content_sha256(dataset.data_files(hp.layout.n_images))),
        templates={k2: list(v) for k2, v in dataset.templates.items()},
        tokens=TokenSelection(hp.tokens, tokens_per_image=hp.layout.tokens_per_image, seed=cfg.seed),
        # The forward's precision is identity: resuming a CPU (fp32) harvest on a GPU (bf16 autocast) would mix
        # slightly different activations in one store.
        activations=Activations(dtype=cfg.dtype, storage_dtype=str(F.storage_dtype(cfg.dtype)),
                                compressor=cfg.compressor,
                                forward_precision=resolve_precision(bb.device, cfg.precision),
                                # Only a recompute store names its targets, so stored-target identities stay as
                                # they were.
                                targets="recompute" if recompute else ABSENT,
                                mlp_activation=mlp_activation(bb.blocks) if recompute else ABSENT,
                                mlp_in="ln_2 output (MLP input)",
                                mlp_out="mlp output (before ls_2 and the residual add)"),
        layout=hp.layout,
    )


def head_weights(bb: Backbone) -> dict[str, np.ndarray]:
    v = bb.visual
    return {"ln_post_weight": v.ln_post.weight.detach().float().cpu().numpy(),
            "ln_post_bias": v.ln_post.bias.detach().float().cpu().numpy(),
            "proj": v.proj.detach().float().cpu().numpy()}


