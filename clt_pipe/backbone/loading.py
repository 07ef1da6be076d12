"""Load an open_clip CLIP: a model name (or model-config JSON) plus a pretrained tag, a local checkpoint, or none.

Pretrained tags are resolved to a file in the local Hugging Face cache first, so a machine without network
fails in seconds with a message saying how to pass a local checkpoint, instead of open_clip's long retries.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import open_clip
import torch

from clt_pipe.checksums import file_sha256
from clt_pipe.device import resolve_device
from clt_pipe.errors import CltPipeError
from clt_pipe.store.meta import BackboneIdentity


class ModelError(CltPipeError):
    """Unknown model, unusable weights, or an architecture the hooks do not understand."""


@dataclass
class Backbone:
    model: Any  # open_clip.CLIP
    preprocess: Any  # PIL image -> tensor
    tokenizer: Any
    name: str
    pretrained: str
    weights_sha256: str
    device: torch.device
    identity: BackboneIdentity | None = None

    @property
    def visual(self):
        return self.model.visual

    @property
    def blocks(self):
        return self.model.visual.transformer.resblocks


class _OpenClipNoise(logging.Filter):
    """Drops open_clip's info/warning records (e.g. the random-init warning); everything else passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not record.pathname.startswith(_OPEN_CLIP_DIR)


_OPEN_CLIP_DIR = os.path.dirname(open_clip.__file__)


@contextlib.contextmanager
def _quiet_open_clip():
    """open_clip logs through the root logger (``logging.warning``), so its records are filtered there, and only
    while a model is built: other libraries' and the user's logging keep their levels."""
    flt = _OpenClipNoise()
    root = logging.getLogger()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def state_sha256(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _register_model_name(model: str) -> str:
    """A JSON path is registered as an open_clip config named after the file stem."""
    if model.endswith(".json"):
        p = Path(model)
        if not p.is_file():
            raise ModelError(f"model: config file {model!r} not found")
        open_clip.add_model_config(str(p))
        return p.stem
    if model not in open_clip.list_models():
        raise ModelError(f"model: unknown open_clip model {model!r} (see open_clip.list_models(), or pass a "
                         f"model-config .json)")
    return model


def _cached_pretrained_file(name: str, tag: str) -> tuple[str, dict]:
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise ModelError(f"pretrained: {tag!r} is neither a file nor a known tag for {name} (tags: {tags})")
    hub = cfg.get("hf_hub", "").strip("/")
    if hub:
        from huggingface_hub import hf_hub_download

        for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            try:
                return hf_hub_download(hub, filename, local_files_only=True), cfg
            except Exception:  # noqa: BLE001 - any miss means "not cached"
                continue
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clip"
    url = cfg.get("url", "")
    if url and (cache / os.path.basename(url)).is_file():
        return str(cache / os.path.basename(url)), cfg
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("CLT_PIPE_OFFLINE") == "1":
        raise ModelError(
            f"pretrained: weights {name}/{tag} are not in the local cache and this run is offline; download "
            f"them where there is network or pass --pretrained /path/to/checkpoint.pt (use the *-quickgelu "
            f"model name for OpenAI weights)")
    from huggingface_hub import constants, hf_hub_download

    # huggingface_hub retries for ~20 s on a machine without network: ask once, briefly, first.
    try:
        socket.create_connection((urlparse(constants.ENDPOINT).hostname, 443), timeout=3).close()
    except OSError:
        raise ModelError(f"pretrained: weights {name}/{tag} are not in the local cache and the hub is unreachable; "
                         f"pass --pretrained /path/to/checkpoint.pt (use the *-quickgelu model name for OpenAI "
                         f"weights)") from None
    try:
        return hf_hub_download(hub, "open_clip_model.safetensors"), cfg
    except Exception as e:  # noqa: BLE001
        raise ModelError(
            f"pretrained: could not fetch {name}/{tag} ({type(e).__name__}); pass --pretrained "
            f"/path/to/checkpoint.pt (use the *-quickgelu model name for OpenAI weights)") from None


@functools.lru_cache(maxsize=8)
def _tokenizer(name: str, config: str) -> Any:
    return open_clip.get_tokenizer(name)


def tokenizer_for(name: str) -> Any:
    """open_clip's tokenizer for a registered model, built once per process and model config: building the
    default one parses the 49k BPE merges (~0.08 s), once per harvest, analysis and atlas before. Keyed by the
    config too, so a local config that reuses a name under other text settings gets its own."""
    return _tokenizer(name, json.dumps(open_clip.get_model_config(name), sort_keys=True, default=str))


def load_backbone(model: str, pretrained: str, device: str | torch.device = "cpu") -> Backbone:
    name = _register_model_name(model)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    kwargs: dict[str, Any] = {}
    weights: str | None
    if pretrained in ("", "none", "None"):
        weights, sha = None, "random-init"
    elif Path(pretrained).is_file():
        weights, sha = pretrained, file_sha256(pretrained)
    else:
        weights, cfg = _cached_pretrained_file(name, pretrained)
        sha = file_sha256(weights)
        # Passing a file instead of the tag loses the tag's architecture and preprocessing hints: restore them.
        kwargs.update(force_quick_gelu=bool(cfg.get("quick_gelu", False)))
        for key in ("mean", "std", "interpolation", "resize_mode"):
            if key in cfg:
                kwargs[f"image_{key}"] = cfg[key]
    try:
        # Random init is seeded, so "--pretrained none" names one model: resumes and dask workers agree.
        with torch.random.fork_rng(devices=[]), _quiet_open_clip():
            torch.manual_seed(0)
            clip, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights, device=dev,
                                                                        **kwargs)
    except Exception as e:  # noqa: BLE001 - a garbage file raises UnpicklingError, safetensors' own types, ...
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ModelError(f"pretrained: could not load {pretrained!r} into {name}: {type(e).__name__}: {first}") \
            from None
    clip.eval()
    if weights is None:
        sha = "random-init-" + state_sha256(clip.visual)[:16]
    visual = clip.visual
    if not hasattr(visual, "transformer") or getattr(visual, "attn_pool", None) is not None \
            or getattr(visual, "pool_type", "tok") != "tok":
        raise ModelError(f"model: {name} is not a CLS-pooled open_clip ViT; the CLT hooks need one")
    bb = Backbone(clip, preprocess, tokenizer_for(name), name, pretrained or "none", sha, dev)
    bb.identity = describe(bb, model)
    return bb


def describe(bb: Backbone, model_arg: str) -> BackboneIdentity:
    visual = bb.visual
    block = bb.blocks[0]
    act = type(block.mlp.gelu).__name__ if hasattr(block.mlp, "gelu") else "unknown"
    grid = visual.grid_size
    return BackboneIdentity(**{
        "name": bb.name,
        "model_arg": model_arg,
        "pretrained": bb.pretrained,
        "weights_sha256": bb.weights_sha256,
        "activation": act,
        "n_layers": len(bb.blocks),
        "d_model": visual.transformer.width,
        "d_mlp": block.mlp.c_fc.out_features,
        "embed_dim": visual.output_dim,
        "image_size": list(visual.image_size) if isinstance(visual.image_size, tuple) else visual.image_size,
        "patch_size": list(visual.patch_size) if isinstance(visual.patch_size, tuple) else visual.patch_size,
        "n_positions": 1 + grid[0] * grid[1],
        "logit_scale": float(bb.model.logit_scale.exp().item()),
        "ln_eps": float(visual.ln_post.eps),
        "ls_identity": all(type(b.ls_2).__name__ == "Identity" for b in bb.blocks),
    })
