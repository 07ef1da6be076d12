"""The fit run directory: the exported CLT that analysis reads, and the resumable training checkpoints.

Layout of ``fit --out DIR`` (storage/FORMAT.md, "Fit run directory"):
  run.json                 what was trained on what: store identity, model identity, fit config, CLT spec
  clt/                     final CLT with standardisation folded in (safetensors, circuit-tracer layout)
  checkpoints/step-N/      weights + optimiser/loader/RNG state; ``DONE`` marks a complete checkpoint
  metrics.jsonl            one JSON line per logged step
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from clt_pipe.errors import CheckpointError

RUN_FILE = "run.json"
CLT_DIR = "clt"
CHECKPOINTS_DIR = "checkpoints"
RUN_FORMAT_VERSION = 1


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _read_json(path: Path, missing: str) -> dict:
    if not path.is_file():
        raise CheckpointError(missing)
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None


def read_run(run_dir: str | Path) -> dict:
    p = Path(run_dir) / RUN_FILE
    meta = _read_json(p, f"{run_dir}: no {RUN_FILE}; is this a `clt-pipe fit --out` directory?")
    if meta.get("run_format_version") != RUN_FORMAT_VERSION:
        raise CheckpointError(f"{p}: run format v{meta.get('run_format_version')}, this tool reads "
                              f"v{RUN_FORMAT_VERSION}")
    return meta


def save_fitted(run_dir: str | Path, model, run_meta: dict) -> Path:
    """Export ``model`` (standardisation folded) to ``run_dir/clt`` atomically, then write run.json."""
    from clt_pipe.clt.export import fold_standardization, save_clt

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / CLT_DIR
    tmp = run_dir / f"{CLT_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_clt(fold_standardization(model), tmp, extra_meta={"run": run_meta.get("store", {})})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_json_atomic(run_dir / RUN_FILE, dict(run_meta, run_format_version=RUN_FORMAT_VERSION, finished=True))
    return final


def load_fitted(run_dir: str | Path):
    """(CrossLayerTranscoder mapping raw MLP inputs to raw MLP outputs, run metadata)."""
    from clt_pipe.clt.export import load_clt

    meta = read_run(run_dir)
    if not meta.get("finished"):
        raise CheckpointError(f"{run_dir}: fit did not finish; resume it with `clt-pipe fit --resume`")
    clt_dir = Path(run_dir) / CLT_DIR
    if not clt_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no exported CLT in {clt_dir}")
    return load_clt(clt_dir), meta


def export_run(run_dir: str | Path, out: str | Path) -> Path:
    model, meta = load_fitted(run_dir)
    from clt_pipe.clt.export import save_clt

    save_clt(model, Path(out), extra_meta={"run": meta.get("store", {})})
    return Path(out)


# ---- resumable training checkpoints -----------------------------------------------------------------------
KEEP_CHECKPOINTS = 2
DONE_FILE = "DONE"


def _step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS_DIR / f"step-{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders, oldest first (complete or not; ``*.tmp`` leftovers excluded)."""
    base = Path(run_dir) / CHECKPOINTS_DIR
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if p.is_dir() and p.name.startswith("step-") and "." not in p.name)


def _sha256(path: Path) -> str:
    from clt_pipe.backbone.loading import file_sha256

    return file_sha256(path)


def save_checkpoint(run_dir: str | Path, step: int, weights: dict, state: dict, meta: dict) -> Path:
    """Weights (safetensors) + state (torch) + DONE with their sha256, written to a temp dir then renamed."""
    import torch
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    final = _step_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    done = {"step": step, "config": meta.get("config", {}), "spec": meta.get("spec", {}),
            "sha256": {name: _sha256(tmp / name) for name in ("model.safetensors", "state.pt")}}
    write_json_atomic(tmp / DONE_FILE, done)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _validate(path: Path) -> dict:
    done = _read_json(path / DONE_FILE, f"{path}: incomplete (no {DONE_FILE})")
    for name, want in done.get("sha256", {}).items():
        if not (path / name).is_file() or _sha256(path / name) != want:
            raise CheckpointError(f"{path}: {name} is missing or corrupt (checksum mismatch)")
    return done


def latest_config(run_dir: str | Path) -> dict | None:
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return _validate(path)
        except CheckpointError:
            continue
    return None


def load_latest(run_dir: str | Path, device, log=print):
    """(weights, state) of the newest checkpoint that passes its checksums; corrupt ones are skipped, kept."""
    import torch
    from safetensors.torch import load_file

    errors = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            _validate(path)
            weights = load_file(str(path / "model.safetensors"), device=str(device))
            state = torch.load(path / "state.pt", map_location=device, weights_only=False)
        except (CheckpointError, OSError, RuntimeError, ValueError) as e:
            errors.append(str(e).splitlines()[0])
            log(f"skipping checkpoint {path.name}: {errors[-1]}")
            continue
        return weights, state
    if errors:
        raise CheckpointError(f"{run_dir}: no usable checkpoint ({errors[0]})")
    return None
