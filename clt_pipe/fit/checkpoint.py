"""Resumable training checkpoints inside a fit run directory (``checkpoints/step-N/``); the rest of the run
directory's format (run.json, the exported CLT) is ``clt.rundir``'s."""

from __future__ import annotations

import shutil
from pathlib import Path

from clt_pipe.atomic import replace_dir, write_json_atomic
from clt_pipe.checksums import file_sha256
from clt_pipe.clt.rundir import read_json
from clt_pipe.errors import CheckpointError, describe_io_error

CHECKPOINTS_DIR = "checkpoints"
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


# Below this much free space a write that stopped short is taken for a full disk (torch's zip writer reports one
# as "unexpected pos N vs M" with no OSError behind it; safetensors as an IoError with the errno in its text).
NEARLY_FULL_BYTES = 64 << 20
_FULL_WORDS = ("no space left", "storagefull", "code: 28", "file write failed")


def _os_cause(e: BaseException, where: Path) -> BaseException:
    """The OSError behind a failed checkpoint write (torch and safetensors wrap theirs in their own types).
    Called before the partial checkpoint is deleted, so a full disk still reads as full."""
    import errno

    seen = e
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__cause__ or seen.__context__
    if seen is not None:
        return seen
    text = str(e).lower()
    try:
        nearly_full = shutil.disk_usage(where).free < NEARLY_FULL_BYTES
    except OSError:
        nearly_full = False
    if any(w in text for w in _FULL_WORDS) or ("unexpected pos" in text and nearly_full):
        return OSError(errno.ENOSPC, "No space left on device")
    return e


def save_checkpoint(run_dir: str | Path, step: int, weights: dict, state: dict, meta: dict) -> Path:
    """Weights (safetensors) + state (torch) + DONE with their sha256, written to a temp dir then renamed."""
    import torch
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    final = _step_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "model.safetensors"))
        with open(tmp / "state.pt", "wb") as fh:  # through a Python file, torch keeps the OSError (ENOSPC) as context
            torch.save(state, fh)
        done = {"step": step, "config": meta.get("config", {}), "spec": meta.get("spec", {}),
                "sha256": {name: file_sha256(tmp / name) for name in ("model.safetensors", "state.pt")}}
        write_json_atomic(tmp / DONE_FILE, done)
        replace_dir(tmp, final)
    except Exception as e:  # noqa: BLE001 - torch.save: RuntimeError; safetensors: its own SafetensorError
        if not isinstance(e, (OSError, RuntimeError)) and type(e).__name__ != "SafetensorError":
            raise
        cause = describe_io_error(_os_cause(e, tmp if tmp.exists() else run_dir))
        shutil.rmtree(tmp, ignore_errors=True)  # the half-written checkpoint would only fill the disk further
        raise CheckpointError(f"cannot write checkpoint {final}: {cause}; the previous checkpoint is kept, fix "
                              f"that and re-run with --resume") from None
    for old in list_checkpoints(run_dir)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _validate(path: Path) -> dict:
    done = read_json(path / DONE_FILE, f"{path}: incomplete (no {DONE_FILE})")
    for name, want in done.get("sha256", {}).items():
        if not (path / name).is_file() or file_sha256(path / name) != want:
            raise CheckpointError(f"{path}: {name} is missing or corrupt (checksum mismatch)")
    return done


def latest_config(run_dir: str | Path) -> dict | None:
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return _validate(path)
        except CheckpointError:
            continue
    return None


def _load(path: Path, device):
    import torch
    from safetensors.torch import load_file

    _validate(path)
    weights = load_file(str(path / "model.safetensors"), device=str(device))
    state = torch.load(path / "state.pt", map_location=device, weights_only=False)
    return weights, state


def load_latest(run_dir: str | Path, device, log=print):
    """(weights, state) of the newest checkpoint that passes its checksums; corrupt ones are skipped, kept."""
    errors = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return _load(path, device)
        except (CheckpointError, OSError, RuntimeError, ValueError) as e:
            errors.append(str(e).splitlines()[0])
            log(f"skipping checkpoint {path.name}: {errors[-1]}")
    if errors:
        raise CheckpointError(f"{run_dir}: no usable checkpoint ({errors[0]})")
    return None


def complete_steps(run_dir: str | Path) -> list[int]:
    """Steps of the checkpoints that were finished writing (their DONE is there; checksums not read)."""
    return [int(p.name.split("-")[1]) for p in list_checkpoints(run_dir) if (p / DONE_FILE).is_file()]


def load_step(run_dir: str | Path, step: int, device):
    """(weights, state) of the checkpoint of ``step``, checked against its checksums."""
    path = _step_dir(Path(run_dir), step)
    try:
        return _load(path, device)
    except (CheckpointError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: unusable ({str(e).splitlines()[0]}); the sweep resumes every member "
                              f"from one step: remove that member's folder to retrain it, or pass "
                              f"--overwrite") from None
