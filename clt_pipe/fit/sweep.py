"""Fit sweeps: one `clt-pipe fit` trains N CLTs on the same batches, so the store is read once for all of them.

A sweep is the ``[fit.sweep]`` table of a pipeline or ``--config`` file (or ``--sweep KEY=V1,V2`` on the CLI):
lists of values of FitConfig keys, crossed (every combination, the default) or zipped (``mode = "zip"``: the
i-th value of every list together). Each member is the base ``[fit]`` config with its values, written to its own
run directory ``<out>/<member>/`` in the single-fit format, so analyze, atlas and export read it unchanged;
``<out>/sweep.json`` lists the members (storage/FORMAT.md, "Fit sweep").

Keys that decide which rows a step sees (store, batch size, tokens, holdout, shuffle window, seed) and the
process settings are shared: a sweep over them would need another read of the store, which is what a sweep
saves. ``checkpoint_every`` is shared too, so every member has a checkpoint at the step a resume restarts from.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from clt_pipe.atomic import write_json_atomic
from clt_pipe.clt.sweepdir import SWEEP_FILE, SWEEP_FORMAT_VERSION, read_sweep
from clt_pipe.config import FitConfig, build, to_dict
from clt_pipe.errors import CheckpointError, ConfigError

MODES = ("cross", "zip")
SHARED_KEYS = ("store", "out", "batch_size", "tokens", "holdout", "shuffle_chunks", "shuffle_memory",
               "read_threads", "keep_rows", "keep_memory", "seed", "device", "resume", "overwrite",
               "checkpoint_every", "log_every")


@dataclass(frozen=True)
class SweepConfig:
    """The varied keys, in the order given, each with its values; and how they combine."""

    axes: tuple[tuple[str, tuple[Any, ...]], ...]
    mode: str = "cross"

    @classmethod
    def parse(cls, table: Mapping[str, Any], section: str = "fit.sweep") -> SweepConfig:
        """From a TOML table: ``KEY = [values]`` per varied key, optionally ``mode = "cross" | "zip"``."""
        if not isinstance(table, Mapping):
            raise ConfigError(f"{section}: expected a table of lists (e.g. sparsifier = [\"jumprelu\", \"relu_topk\"])")
        mode = table.get("mode", "cross")
        axes = []
        for key, values in table.items():
            if key == "mode":
                continue
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{section}.{key}: expected a non-empty list of values, got {values!r}")
            axes.append((key.replace("-", "_"), tuple(values)))
        sweep = cls(tuple(axes), mode)
        sweep.validate(section)
        return sweep

    @classmethod
    def from_cli(cls, items: list[str], mode: str | None) -> SweepConfig:
        """From ``--sweep KEY=V1,V2`` options (repeatable) and ``--sweep-mode``."""
        table: dict[str, Any] = {}
        for item in items:
            key, sep, values = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"sweep: {item!r} is not KEY=V1,V2,... (e.g. sparsifier=jumprelu,relu_topk)")
            table[key.strip()] = [v.strip() for v in values.split(",") if v.strip()]
        if mode:
            table["mode"] = mode
        return cls.parse(table, "sweep")

    def validate(self, section: str = "fit.sweep") -> None:
        if self.mode not in MODES:
            raise ConfigError(f"{section}.mode: {self.mode!r} is not one of {', '.join(MODES)}")
        if not self.axes:
            raise ConfigError(f"{section}: name at least one key to sweep (e.g. sparsifier = [\"jumprelu\", "
                              f"\"relu_topk\"])")
        names = {f.name for f in dataclasses.fields(FitConfig)}
        for key, _ in self.axes:
            if key not in names:
                raise ConfigError(f"{section}.{key}: unknown key (known: {', '.join(sorted(names))})")
            if key in SHARED_KEYS:
                raise ConfigError(f"{section}.{key}: shared by every member (it decides the batches or the "
                                  f"process); sweep over the model, loss and optimiser keys")
        if self.mode == "zip" and len({len(v) for _, v in self.axes}) > 1:
            lengths = ", ".join(f"{k}: {len(v)}" for k, v in self.axes)
            raise ConfigError(f"{section}: mode zip needs lists of one length ({lengths})")

    def combinations(self) -> list[dict[str, Any]]:
        keys = [k for k, _ in self.axes]
        values = [v for _, v in self.axes]
        rows = zip(*values) if self.mode == "zip" else itertools.product(*values)
        return [dict(zip(keys, row)) for row in rows]

    def to_dict(self) -> dict:
        return {"mode": self.mode, "axes": {k: list(v) for k, v in self.axes}}


@dataclass(frozen=True)
class Member:
    name: str
    overrides: dict[str, Any]
    cfg: FitConfig


def member_name(overrides: Mapping[str, Any]) -> str:
    """``relu_topk-k16``: the sparsifier by itself, other keys as key+value (a folder name)."""
    parts = [str(v) if k == "sparsifier" else f"{k}{v}" for k, v in overrides.items()]
    return "-".join(parts).replace("/", "_").replace(" ", "")


def members(base: FitConfig, sweep: SweepConfig) -> list[Member]:
    """Every member's validated config; its ``out`` is ``<base.out>/<member name>``."""
    out: list[Member] = []
    for overrides in sweep.combinations():
        name = member_name(overrides)
        cfg = build(FitConfig, to_dict(base), overrides, {"out": str(Path(base.out) / name)},
                    section=f"fit.sweep member {name}")
        out.append(Member(name, {k: getattr(cfg, k) for k in overrides}, cfg))
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"fit.sweep: members {', '.join(dup)} repeat (a value listed twice?)")
    return out


# ---- sweep.json ---------------------------------------------------------------------------------------------
def sweep_record(sweep: SweepConfig, mems: list[Member]) -> dict:
    return {"sweep_format_version": SWEEP_FORMAT_VERSION, **sweep.to_dict(),
            "members": [{"name": m.name, "out": m.name, "overrides": m.overrides} for m in mems]}


def prepare_root(base: FitConfig, sweep: SweepConfig, mems: list[Member]) -> None:
    """Write ``<out>/sweep.json``; a root holding a single run or another sweep is refused unless --overwrite
    (each member's own folder is then checked like a single fit's --out)."""
    from clt_pipe.clt.rundir import RUN_FILE

    root = Path(base.out)
    if (root / RUN_FILE).exists():
        raise CheckpointError(f"{root} holds a single fit, not a sweep; choose another --out")
    rec = sweep_record(sweep, mems)
    old = read_sweep(root) if (root / SWEEP_FILE).is_file() else None
    if old is not None and old != rec and not base.overwrite:
        raise CheckpointError(f"{root} holds another sweep ({', '.join(m['name'] for m in old['members'])}); "
                              f"pass --overwrite to replace it or choose another --out")
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / SWEEP_FILE, rec)
