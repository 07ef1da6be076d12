"""The fit sweep directory, the format that analyze reads to find a sweep's members (storage/FORMAT.md,
"Fit sweep"): ``OUT/sweep.json`` lists the members, each a fit run directory ``OUT/<member>/`` (clt.rundir)."""

from __future__ import annotations

import json
from pathlib import Path

from clt_pipe.errors import CheckpointError

SWEEP_FILE = "sweep.json"
SWEEP_FORMAT_VERSION = 1


def is_sweep(path: str | Path) -> bool:
    return (Path(path) / SWEEP_FILE).is_file()


def read_sweep(root: str | Path) -> dict | None:
    """The sweep.json of a sweep root, or None where ``root`` is not one."""
    path = Path(root) / SWEEP_FILE
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if rec.get("sweep_format_version") != SWEEP_FORMAT_VERSION:
        raise CheckpointError(f"{path}: sweep format v{rec.get('sweep_format_version')}, this tool reads "
                              f"v{SWEEP_FORMAT_VERSION}")
    return rec


def member_dirs(root: str | Path) -> list[tuple[str, Path]]:
    """(name, run dir) of every member a sweep root lists."""
    rec = read_sweep(root)
    if rec is None:
        raise CheckpointError(f"{root}: no {SWEEP_FILE}; is this a `clt-pipe fit` sweep directory?")
    return [(m["name"], Path(root) / m["out"]) for m in rec["members"]]
