"""`clt-pipe run PIPELINE.toml`: the stages of one experiment, each resumed or skipped when already done.

A pipeline file has the tables ``[harvest]`` (the store the CLT trains on), optionally ``[harvest_eval]``
(a held-out store for analysis; its keys default to ``[harvest]``'s), ``[fit]`` and ``[analyze]``, with the
same keys as the CLI options. Wiring defaults: fit.store = harvest.store, analyze.store = harvest_eval.store
(else harvest.store), analyze.clt = fit.out. Strings may use ``${ENV_VAR}`` or ``${ENV_VAR:-default}``; an unset
variable without a default is an error that names it.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from clt_pipe.config import STAGES, AnalyzeConfig, FitConfig, HarvestConfig, build, to_dict
from clt_pipe.errors import ConfigError
from clt_pipe.fit.sweep import SweepConfig
from clt_pipe.preflight import check as preflight

STAGE_ORDER = ("harvest", "harvest_eval", "fit", "analyze")
_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


@dataclass
class Pipeline:
    name: str
    harvest: HarvestConfig | None
    harvest_eval: HarvestConfig | None
    fit: FitConfig | None
    analyze: AnalyzeConfig | None
    sweep: SweepConfig | None = None  # [fit.sweep]: fit trains these members (clt_pipe/fit/sweep.py)


def _expand(value: Any, where: str, env: dict[str, str]) -> Any:
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            var, default = m.group(1), m.group(2)
            if var in env:
                return env[var]
            if default is not None:
                return default
            raise ConfigError(f"{where}: environment variable {var} is not set")

        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [_expand(v, where, env) for v in value]
    return value


def _table(doc: dict, name: str, env: dict[str, str]) -> dict | None:
    t = doc.get(name)
    if t is None:
        return None
    if not isinstance(t, dict):
        raise ConfigError(f"{name}: expected a table")
    return {k: _expand(v, f"{name}.{k}", env) for k, v in t.items()}


def parse_pipeline(path: str | Path, env: dict[str, str] | None = None) -> Pipeline:
    doc = load_toml(path)
    env = dict(os.environ if env is None else env)
    unknown = sorted(set(doc) - set(STAGE_ORDER) - {"pipeline"})
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {', '.join(unknown)} (known: pipeline, {', '.join(STAGE_ORDER)})")
    meta = doc.get("pipeline", {})
    h = _table(doc, "harvest", env)
    he = _table(doc, "harvest_eval", env)
    f = _table(doc, "fit", env)
    a = _table(doc, "analyze", env)
    harvest = build(HarvestConfig, h, section="harvest") if h is not None else None
    harvest_eval = None
    if he is not None:
        harvest_eval = build(HarvestConfig, h or {}, he, section="harvest_eval")
    fit = sweep = None
    if f is not None:
        sweep_table = f.pop("sweep", None)
        fit = build(FitConfig, {"store": harvest.store} if harvest else {}, f, section="fit")
        sweep = SweepConfig.parse(sweep_table) if sweep_table is not None else None
    analyze = None
    if a is not None:
        wired: dict[str, Any] = {}
        if harvest_eval or harvest:
            wired["store"] = (harvest_eval or harvest).store
        if fit:
            wired["clt"] = fit.out
        analyze = build(AnalyzeConfig, wired, a, section="analyze")
    return Pipeline(meta.get("name", Path(path).stem), harvest, harvest_eval, fit, analyze, sweep)


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config: file {str(p)!r} not found")
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: {p}: {e}") from None


def stage_config(cls: type, section: str, config_file: str | None, overrides: Mapping[str, Any]) -> Any:
    """The config of one stage: the ``[section]`` table of ``config_file`` (if given), then CLI ``overrides``.

    A pipeline file (with ``[harvest]``/``[fit]``/``[analyze]`` tables) is read as ``clt-pipe run`` reads it,
    with ``${ENV}`` expansion and the wiring between stages (fit.store = harvest.store, ...); a flat file
    holds one stage's keys.
    """
    table: dict[str, Any] = {}
    if config_file:
        doc = load_toml(config_file)
        if any(s in doc for s in (*STAGES, "harvest_eval", "pipeline")):
            if section in STAGES:
                staged = getattr(parse_pipeline(config_file), section)
                table = to_dict(staged) if staged is not None else {}
            else:  # a command outside the pipeline (atlas) reads its own table of a pipeline file
                table = dict(doc.get(section, {}))
        else:
            table = {k: v for k, v in doc.items() if not (section == "fit" and k == "sweep")}
    return build(cls, table, overrides, section=section)


def stage_sweep(config_file: str | None, cli_items: list[str] | None, cli_mode: str | None) -> SweepConfig | None:
    """The sweep of a `clt-pipe fit`: the CLI's ``--sweep`` options if given, else the ``--config`` file's
    ``[fit.sweep]`` table (``[sweep]`` of a flat fit file); ``--sweep-mode`` applies to either."""
    if cli_items:
        return SweepConfig.from_cli(cli_items, cli_mode)
    table = None
    if config_file:
        doc = load_toml(config_file)
        table = doc["fit"].get("sweep") if isinstance(doc.get("fit"), dict) else doc.get("sweep")
    if table is None:
        if cli_mode:
            raise ConfigError("sweep-mode: no sweep to combine; add --sweep KEY=V1,V2 or a [fit.sweep] table")
        return None
    return SweepConfig.parse(dict(table, mode=cli_mode) if cli_mode else table)


def _analysis_done(cfg: AnalyzeConfig) -> bool:
    from clt_pipe.analyze.compare import COMPARE_FILE
    from clt_pipe.clt.sweepdir import is_sweep

    report = Path(cfg.out) / (COMPARE_FILE if is_sweep(cfg.clt) else "report.json")
    if not report.is_file():
        return False
    try:
        return json.loads(report.read_text()).get("settings") == asdict(cfg)
    except ValueError:
        return False


def run_pipeline(path: str | Path, *, only: list[str] | None = None, force: bool = False, console=None) -> dict:
    from clt_pipe.harvest.run import run_harvest
    from clt_pipe.progress import NullProgress, RichProgress

    pipe = parse_pipeline(path)
    stages = only or [s for s in STAGE_ORDER if getattr(pipe, s) is not None]
    for s in stages:
        if s not in STAGE_ORDER:
            raise ConfigError(f"only: unknown stage {s!r} (known: {', '.join(STAGE_ORDER)})")
        if getattr(pipe, s) is None:
            raise ConfigError(f"only: stage {s!r} has no table in {path}")
    for i, s in enumerate(stages):  # every stage's inputs before the first model loads
        preflight(getattr(pipe, s), made_upstream=i > 0)
    say = console.print if console else print
    progress = RichProgress(console) if console else NullProgress()
    results: dict[str, dict] = {}
    for s in stages:
        cfg = getattr(pipe, s)
        if s.startswith("harvest"):
            if force:
                cfg = replace(cfg, overwrite=True)
            say(f"[bold]{pipe.name}: {s}[/] -> {cfg.store}")
            results[s] = run_harvest(cfg, progress, log=say)
        elif s == "fit":
            from clt_pipe.fit.trainer import run_fit

            cfg = replace(cfg, resume=not force, overwrite=force)
            say(f"[bold]{pipe.name}: fit[/] -> {cfg.out}")
            results[s] = run_fit(cfg, console=console, sweep=pipe.sweep)
        else:
            from clt_pipe.analyze.run import run_analyze

            if _analysis_done(cfg) and not force:
                say(f"[bold]{pipe.name}: analyze[/] report in {cfg.out} is up to date; skipped")
                results[s] = {"skipped": True, "out": cfg.out}
                continue
            say(f"[bold]{pipe.name}: analyze[/] -> {cfg.out}")
            results[s] = run_analyze(cfg, console=console)
    return results
