"""Fold the standardisation into the weights; save/load CLTs in circuit-tracer's safetensors layout.

Directory layout (the file and key names circuit-tracer's ``load_clt`` reads; keys prefixed ``clt_pipe.`` where
it would read another CLT, see below):

    W_enc_{i}.safetensors   W_enc_{i} [F, d] (note: transposed w.r.t. the in-memory [d, F]), b_enc_{i} [F],
                            b_dec_{i} [d] (zeros without a decoder bias), threshold_{i} [F] (jumprelu and
                            batchtopk only: z = pre * (pre > threshold), circuit-tracer's JumpReLU convention)
    W_dec_{i}.safetensors   W_dec_{i} [F, L-i, d]
    standardization.safetensors   in_mean [L, d], in_scale [L], out_scale [L]   (only when saved unfolded)
    clt.json                spec, standardisation state, metadata; written last, so its presence marks a
                            complete save

A batchtopk CLT exports its per-layer inference threshold broadcast to [F], so circuit-tracer loads it as a
JumpReLU CLT with identical outputs. ReLU-TopK/Abs-TopK have no circuit-tracer equivalent (its activations are
ReLU and JumpReLU), and circuit-tracer ignores a separate standardisation: format version 2 writes such
checkpoints (clt.json ``"layout": "clt_pipe"``) with the same files and shapes but their tensor keys prefixed
``clt_pipe.`` (``clt_pipe.W_enc_0``, ...), so circuit-tracer's ``load_clt`` refuses them (it asks for ``W_enc_0``)
instead of reading a TopK CLT as a plain ReLU one (version 1 wrote circuit-tracer's keys for every CLT).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import Tensor

from clt_pipe.atomic import write_bytes_atomic, write_json_atomic
from clt_pipe.checksums import file_sha256
from clt_pipe.clt.model import CrossLayerTranscoder
from clt_pipe.clt.spec import CLTSpec
from clt_pipe.errors import CheckpointError

FORMAT = "clt_pipe.clt"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # v1: circuit-tracer's keys whatever the sparsifier
CT_LAYOUT = "circuit-tracer"  # circuit-tracer's load_clt reads these files as the same CLT
OWN_LAYOUT = "clt_pipe"  # same files and shapes, keys prefixed: circuit-tracer's load_clt refuses them
OWN_PREFIX = "clt_pipe."
META_FILE = "clt.json"
STD_FILE = "standardization.safetensors"
_LAYER_FILE = re.compile(r"^W_(enc|dec)_(\d+)\.safetensors$")


def is_identity_standardization(model: CrossLayerTranscoder) -> bool:
    return bool(
        (model.in_mean == 0).all() and (model.in_scale == 1).all() and (model.out_scale == 1).all()
    )


@torch.no_grad()
def fold_standardization(model: CrossLayerTranscoder) -> CrossLayerTranscoder:
    """A copy mapping raw x to raw y exactly as ``model`` does, with identity standardisation buffers.

    pre = ((x - μ)/σ) W + b = x (W/σ) + (b - (μ/σ) W): pre-activations are unchanged, so JumpReLU and
    batchtopk thresholds (which act on pre-activations) carry over as they are. Decoders absorb out_scale of
    their target layer; b_dec is already raw. Done in float64 to keep the fold exact to the weights' precision.
    """
    new = copy.deepcopy(model)
    mean, scale = model.in_mean.double(), model.in_scale.double()
    w_enc = model.W_enc.double() / scale[:, None, None]
    b_enc = model.b_enc.double() - torch.einsum("ld,ldf->lf", mean, w_enc)
    new.W_enc.copy_(w_enc)
    new.b_enc.copy_(b_enc)
    out_scale = model.out_scale.double()
    for s, w in enumerate(model.W_dec):
        new.W_dec[s].copy_(w.double() * out_scale[s:][None, :, None])
    new.in_mean.zero_()
    new.in_scale.fill_(1.0)
    new.out_scale.fill_(1.0)
    return new


def circuit_tracer_reads_as_is(model: CrossLayerTranscoder) -> bool:
    """Whether circuit-tracer's ``load_clt`` reads ``model``'s saved files as this same CLT: a ReLU/JumpReLU
    rule (jumprelu, batchtopk's inference threshold) and raw activations in and out (standardisation folded)."""
    return not model.spec.kind.topk and is_identity_standardization(model)


def _key_prefix(layout: str) -> str:
    return OWN_PREFIX if layout == OWN_LAYOUT else ""


@torch.no_grad()
def fold_input_affine(model: CrossLayerTranscoder, weight: Tensor, bias: Tensor) -> CrossLayerTranscoder:
    """A copy reading n where ``model`` reads x = n ⊙ weight + bias (per layer: weight, bias [L, d]).

    For a LayerNorm's affine: pre = (n ⊙ γ + β) W + b = n (γ ⊙ W) + (β W + b), exact; thresholds act on ``pre``
    and carry over. ``model`` must have identity standardisation (fold it first)."""
    if not is_identity_standardization(model):
        raise ValueError("fold_input_affine: fold the standardisation first")
    L, d = model.n_layers, model.d_model
    if tuple(weight.shape) != (L, d) or tuple(bias.shape) != (L, d):
        raise ValueError(f"fold_input_affine: weight/bias must be [{L}, {d}], got {list(weight.shape)}, "
                         f"{list(bias.shape)}")
    new = copy.deepcopy(model)
    w_enc = model.W_enc.double()
    new.b_enc.copy_(model.b_enc.double() + torch.einsum("ld,ldf->lf", bias.double().to(w_enc.device), w_enc))
    new.W_enc.copy_(w_enc * weight.double().to(w_enc.device)[:, :, None])
    return new


def _atomic_save(tensors: dict[str, Tensor], path: Path) -> None:
    write_bytes_atomic(path, save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}))


@torch.no_grad()
def save_clt(
    model: CrossLayerTranscoder, out_dir: str | Path, extra_meta: dict | None = None, *, fold: bool = True
) -> Path:
    """Write ``model`` to ``out_dir``. ``fold=True`` (the default, and what circuit-tracer needs) saves weights
    that work on raw activations; ``fold=False`` keeps the training parametrisation and saves the standardisation
    buffers next to it (``load_clt`` restores both)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = model.spec
    n_layers = spec.n_layers
    if fold and not is_identity_standardization(model):
        model = fold_standardization(model)
    folded = is_identity_standardization(model)
    layout = CT_LAYOUT if circuit_tracer_reads_as_is(model) else OWN_LAYOUT
    pfx = _key_prefix(layout)

    (out / META_FILE).unlink(missing_ok=True)  # incomplete until clt.json is back
    for f in out.iterdir():  # a previous, deeper CLT's layers would confuse circuit-tracer's file count
        m = _LAYER_FILE.match(f.name)
        if m and int(m.group(2)) >= n_layers:
            f.unlink()
    threshold = model.threshold()
    b_dec = model.b_dec_or_zeros()
    for i in range(n_layers):
        enc = {f"{pfx}W_enc_{i}": model.W_enc[i].T, f"{pfx}b_enc_{i}": model.b_enc[i], f"{pfx}b_dec_{i}": b_dec[i]}
        if threshold is not None:
            enc[f"{pfx}threshold_{i}"] = threshold[i]
        _atomic_save(enc, out / f"W_enc_{i}.safetensors")
        _atomic_save({f"{pfx}W_dec_{i}": model.W_dec[i]}, out / f"W_dec_{i}.safetensors")
    std_path = out / STD_FILE
    if folded:
        std_path.unlink(missing_ok=True)
    else:
        _atomic_save(
            {"in_mean": model.in_mean, "in_scale": model.in_scale, "out_scale": model.out_scale}, std_path
        )
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "layout": layout,
        "spec": spec.to_dict(),
        "standardization": "folded" if folded else "separate",
        "dtype": str(model.W_enc.dtype).removeprefix("torch."),
        "meta": extra_meta or {},
    }
    if spec.sparsifier == "batchtopk":
        meta["batchtopk_updates"] = int(model.bt_updates.item())
    # sha256 of every tensor file, in clt.json (written last): load_clt refuses flipped or swapped bytes.
    names = [f"W_{kind}_{i}.safetensors" for i in range(n_layers) for kind in ("enc", "dec")]
    meta["sha256"] = {name: file_sha256(out / name) for name in names + ([] if folded else [STD_FILE])}
    write_json_atomic(out / META_FILE, meta, indent=2)
    return out


def _read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / META_FILE
    if not path.is_dir():
        raise CheckpointError(f"CLT checkpoint {str(path)!r}: not a directory")
    if not meta_path.is_file():
        raise CheckpointError(f"CLT checkpoint {str(path)!r}: {META_FILE} missing (incomplete or not a CLT)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: not a {FORMAT} checkpoint")
    if meta.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{meta_path}: format version {meta.get('version')!r}, this tool reads "
                              f"{', '.join(map(str, READABLE_VERSIONS))}")
    if meta["version"] >= 2 and meta.get("layout") not in (CT_LAYOUT, OWN_LAYOUT):
        raise CheckpointError(f"{meta_path}: unknown layout {meta.get('layout')!r}")
    if not isinstance(meta.get("spec"), dict):
        raise CheckpointError(f"{meta_path}: no spec")
    return meta


def _read_tensors(path: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types (and OSError) for truncated/garbled files
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: corrupt safetensors file ({first})") from None
    for key, shape in expected.items():
        if key not in tensors:
            raise CheckpointError(f"{path}: tensor {key!r} missing")
        t = tensors[key]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{path}: {key} has shape {list(t.shape)}, expected {list(shape)}")
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: {key} is not a finite floating-point tensor")
    return tensors


def _prefixed(expected: dict, pfx: str) -> dict:
    return {pfx + k: v for k, v in expected.items()}


def _unprefix(tensors: dict, pfx: str) -> dict:
    return {k.removeprefix(pfx): v for k, v in tensors.items()}


@torch.no_grad()
def load_clt(path: str | Path, *, device: str | torch.device = "cpu") -> CrossLayerTranscoder:
    """Rebuild a CLT saved by ``save_clt``; any missing, truncated or mis-shaped file raises CheckpointError."""
    root = Path(path)
    meta = _read_meta(root)
    spec = CLTSpec.from_dict(meta["spec"])
    n_layers, d, n_feat = spec.n_layers, spec.d_model, spec.n_features
    for f in root.iterdir():
        m = _LAYER_FILE.match(f.name)
        if m and int(m.group(2)) >= n_layers:
            raise CheckpointError(f"{f}: unexpected layer file for a {n_layers}-layer CLT")
    with torch.device("meta"):  # skip the random init: every tensor is overwritten below
        model = CrossLayerTranscoder(spec)
    model = model.to_empty(device=device)
    has_thr = spec.sparsifier in ("jumprelu", "batchtopk")
    pfx = _key_prefix(meta.get("layout", CT_LAYOUT) if meta["version"] >= 2 else CT_LAYOUT)
    for i in range(n_layers):
        expected = {f"W_enc_{i}": (n_feat, d), f"b_enc_{i}": (n_feat,), f"b_dec_{i}": (d,)}
        if has_thr:
            expected[f"threshold_{i}"] = (n_feat,)
        enc = _unprefix(_read_tensors(root / f"W_enc_{i}.safetensors", _prefixed(expected, pfx)), pfx)
        dec = _unprefix(_read_tensors(root / f"W_dec_{i}.safetensors",
                                      {f"{pfx}W_dec_{i}": (n_feat, n_layers - i, d)}), pfx)
        model.W_enc[i].copy_(enc[f"W_enc_{i}"].T)
        model.b_enc[i].copy_(enc[f"b_enc_{i}"])
        model.W_dec[i].copy_(dec[f"W_dec_{i}"])
        if model.b_dec is not None:
            model.b_dec[i].copy_(enc[f"b_dec_{i}"])
        elif bool((enc[f"b_dec_{i}"] != 0).any()):
            raise CheckpointError(f"{root}: b_dec_{i} is nonzero but the spec has dec_bias=false")
        if has_thr:
            thr = enc[f"threshold_{i}"]
            if spec.sparsifier == "jumprelu":
                if not bool((thr > 0).all()):
                    raise CheckpointError(f"{root}: threshold_{i} must be > 0 for jumprelu")
                model.log_threshold[i].copy_(thr.log())
            else:
                model.bt_threshold[i] = thr[0]
    if spec.sparsifier == "batchtopk":
        model.bt_updates.fill_(int(meta.get("batchtopk_updates", 0)))
    if meta.get("standardization") == "separate":
        L = n_layers
        std = _read_tensors(root / STD_FILE, {"in_mean": (L, d), "in_scale": (L,), "out_scale": (L,)})
        try:
            model.set_standardization(std["in_mean"], std["in_scale"], std["out_scale"])
        except ValueError as e:
            raise CheckpointError(f"{root / STD_FILE}: {e}") from None
    else:
        model.in_mean.zero_()
        model.in_scale.fill_(1.0)
        model.out_scale.fill_(1.0)
    # Last, after the structural checks (which name a missing, truncated or mis-shaped file more precisely):
    # bytes that still parse but differ from the export. CLTs exported before the checksums: not checked.
    for name, want in (meta.get("sha256") or {}).items():
        if file_sha256(root / name) != want:
            raise CheckpointError(f"{root / name}: does not match its sha256 in {META_FILE} (damaged or replaced); "
                                  f"export or fit the CLT again")
    return model.eval()
