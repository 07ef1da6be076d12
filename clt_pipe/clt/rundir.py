"""The fit run directory, the format that analyze and export read (storage/FORMAT.md, "Fit run directory").

Layout of ``fit --out DIR``:
  run.json                 what was trained on what: store identity, model identity, fit config, CLT spec
  clt/                     final CLT with standardisation folded in (safetensors, circuit-tracer layout)
  checkpoints/step-N/      weights + optimiser/loader/RNG state; ``DONE`` marks a complete checkpoint (fit only)
  metrics.jsonl            one JSON line per logged step
  DIVERGED                 one line, where the fit stopped on a non-finite loss or weights (fit/divergence.py)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from clt_pipe.atomic import replace_dir, write_json_atomic
from clt_pipe.errors import CheckpointError

RUN_FILE = "run.json"
CLT_DIR = "clt"
RUN_FORMAT_VERSION = 1
DIVERGED_FILE = "DIVERGED"


def read_json(path: Path, missing: str) -> dict:
    if not path.is_file():
        raise CheckpointError(missing)
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None


def read_run(run_dir: str | Path) -> dict:
    p = Path(run_dir) / RUN_FILE
    meta = read_json(p, f"{run_dir}: no {RUN_FILE}; is this a `clt-pipe fit --out` directory?")
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
    try:
        save_clt(fold_standardization(model), tmp, extra_meta={"run": run_meta.get("store", {})})
        replace_dir(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written export only fills the disk further
        raise
    write_run(run_dir, run_meta, finished=True)
    return final


def write_run(run_dir: str | Path, run_meta: dict, *, finished: bool) -> None:
    write_json_atomic(Path(run_dir) / RUN_FILE, dict(run_meta, run_format_version=RUN_FORMAT_VERSION,
                                                     finished=finished))


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


def mark_diverged(run_dir: str | Path, line: str) -> None:
    (Path(run_dir) / DIVERGED_FILE).write_text(line + "\n")


def diverged(run_dir: str | Path) -> str | None:
    """The line a fit that went non-finite left in its run directory, or None."""
    p = Path(run_dir) / DIVERGED_FILE
    return p.read_text().strip() if p.is_file() else None
