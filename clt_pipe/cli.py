"""The `clt-pipe` command.

Stage commands get one --option per field of their config dataclass (help text from the field), so the
CLI, TOML files and the config types cannot drift apart. Options default to "not given", which lets a
`--config` file's values stand unless a flag overrides them; `--help` shows the dataclass default instead.
Rich markup is off for help text: it would eat the brackets of ``[fit]`` and ``[default: ...]``. Each stage's
inputs are checked (clt_pipe.preflight) before the stage's heavy imports and model loading.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import sys
import typing
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from clt_pipe import __version__
from clt_pipe import preflight
from clt_pipe.config import AnalyzeConfig, AtlasConfig, FitConfig, GraphConfig, HarvestConfig
from clt_pipe.pipeline import stage_config
from clt_pipe.errors import CltPipeError

app = typer.Typer(help="Cross-Layer Transcoders for CLIP Vision Transformers: harvest -> fit -> analyze.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None)
store_app = typer.Typer(help="Inspect and check activation stores.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(store_app, name="store")
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def _cli_type(tp: Any) -> type:
    if typing.get_origin(tp) is list:
        return str  # comma-separated on the command line
    return tp


def default_text(f: dataclasses.Field) -> str:
    """A field's default as `--help` shows it (the CLI's own default is None = "not given")."""
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if isinstance(value, bool):
        return f.name.replace("_", "-") if value else "no-" + f.name.replace("_", "-")
    if isinstance(value, list):
        return ",".join(map(str, value))
    return '""' if value == "" else str(value)


def stage_command(cls: type, name: str, help: str, extra: tuple[inspect.Parameter, ...] = ()):
    """Register a typer command whose options are the fields of ``cls`` plus ``--config``; ``extra`` options
    (not config fields) reach the command function as keywords, with ``config_file``."""

    def decorate(fn: Callable[[Any], None]):
        hints = typing.get_type_hints(cls)
        params = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                                    default=typer.Option(None, "--config", "-c",
                                                         help=f"TOML file; its [{name}] table sets defaults"))]
        for f in dataclasses.fields(cls):
            tp = _cli_type(hints[f.name])
            flag = "--" + f.name.replace("_", "-")
            h = f.metadata.get("help", "")
            h = f"{h}  [default: {default_text(f)}]"  # click's show_default=str would add parentheses
            if tp is bool:
                opt = typer.Option(None, f"{flag}/--no-{f.name.replace('_', '-')}", help=h, show_default=False)
            else:
                opt = typer.Option(None, flag, help=h, show_default=False)
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[tp],
                                            default=opt))
        params += extra

        def command(**kwargs):
            config_file = kwargs.pop("config")
            extras = {p.name: kwargs.pop(p.name) for p in extra}
            cfg = stage_config(cls, name, config_file, kwargs)
            preflight.check(cfg)
            fn(cfg, config_file=config_file, **extras) if extra else fn(cfg)

        command.__signature__ = inspect.Signature(params)
        command.__name__ = name
        command.__doc__ = help
        app.command(name, help=help)(command)
        return fn

    return decorate


def _print_summary(title: str, summary: dict) -> None:
    table = Table(title=title, show_header=False)
    for k, v in summary.items():
        if isinstance(v, float):
            v = f"{v:,.4g}"
        table.add_row(str(k), str(v))
    console.print(table)


@contextlib.contextmanager
def _io_errors(stage: str, out: str):
    """A file-system failure of a stage (read-only --out, a file where a folder belongs, full disk) as one line
    naming its cause; what was written before stays (checkpoints resume)."""
    from clt_pipe.errors import describe_io_error

    try:
        yield
    except OSError as e:
        raise CltPipeError(f"{stage} failed: {describe_io_error(e)}") from None


@stage_command(HarvestConfig, "harvest", "Run a CLIP ViT over a dataset and write the activation store.")
def harvest_cmd(cfg: HarvestConfig) -> None:
    from clt_pipe.harvest.run import run_harvest
    from clt_pipe.progress import RichProgress

    summary = run_harvest(cfg, RichProgress(err_console), log=err_console.print)
    if summary.get("dry_run"):
        summary["GB_uncompressed"] = summary["bytes_uncompressed"] / 1e9
        _print_summary("harvest plan (dry run, nothing written)", summary)
    elif summary.get("already_complete"):
        console.print(f"[green]{cfg.store} is already complete[/] ({summary['n_shards']} shards); nothing to do")
    else:
        _print_summary(f"harvest -> {cfg.store}", summary)


SWEEP_OPTIONS = (
    inspect.Parameter("sweep", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[list[str]],
                      default=typer.Option(None, "--sweep", metavar="KEY=V1,V2",
                                           help="Train one CLT per value on the same batches (repeatable; replaces "
                                                "the --config file's [fit.sweep]); members go to OUT/<member>/")),
    inspect.Parameter("sweep_mode", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                      default=typer.Option(None, "--sweep-mode", metavar="cross|zip",
                                           help="cross (every combination) | zip (the i-th values together)  "
                                                "[default: cross]")),
)


@stage_command(FitConfig, "fit", "Train a Cross-Layer Transcoder on a committed store (or a sweep of them).",
               extra=SWEEP_OPTIONS)
def fit_cmd(cfg: FitConfig, config_file: str | None = None, sweep: list[str] | None = None,
            sweep_mode: str | None = None) -> None:
    from clt_pipe.fit.trainer import run_fit
    from clt_pipe.pipeline import stage_sweep

    plan = stage_sweep(config_file, sweep, sweep_mode)
    with _io_errors("fit", cfg.out):
        summary = run_fit(cfg, console=err_console, sweep=plan)
    _print_summary(f"fit -> {cfg.out}", summary)


@stage_command(AnalyzeConfig, "analyze", "Fidelity, attribution, zero-shot substitution, ablations, report.")
def analyze_cmd(cfg: AnalyzeConfig) -> None:
    from clt_pipe.analyze.run import run_analyze

    with _io_errors("analyze", cfg.out):
        summary = run_analyze(cfg, console=err_console)
    _print_summary(f"analyze -> {cfg.out}", summary)


@app.command("compare")
def compare_cmd(reports: list[str] = typer.Argument(..., help="analyze --out folders (report.json), or earlier "
                                                          "comparison folders"),
                out: str = typer.Option("runs/compare", "--out", help="Where the comparison is written")) -> None:
    """One table and plot across analyzed CLTs: fidelity per token type, L0 against FVU, substitution accuracy."""
    from clt_pipe.analyze.compare import compare_reports

    with _io_errors("compare", out):
        summary = compare_reports(reports, out)
    _print_summary(f"compare -> {out}", summary)


@stage_command(AtlasConfig, "atlas", "Static HTML feature atlas of a fitted CLT: top images with patch heatmaps, "
                                    "decoder footprints, logit effects.")
def atlas_cmd(cfg: AtlasConfig) -> None:
    from clt_pipe.analyze.atlas.run import run_atlas

    summary = run_atlas(cfg, console=err_console)
    _print_summary(f"atlas -> {summary['index']}", summary)


@stage_command(GraphConfig, "graph", "Attribution graph of one image: which CLT features, at which patches, make "
                                    "the class (circuit-tracer's method; graph page, circuit-tracer files).")
def graph_cmd(cfg: GraphConfig) -> None:
    from clt_pipe.analyze.graph.run import run_graph

    with _io_errors("graph", cfg.out):
        summary = run_graph(cfg, console=err_console)
    _print_summary(f"graph -> {summary['page']}", summary)


@app.command("run")
def run_cmd(pipeline: str = typer.Argument(..., help="Pipeline TOML with [harvest], [fit], [analyze] tables"),
            only: Optional[str] = typer.Option(None, help="Comma-separated stages to run (default: all in file)"),
            force: bool = typer.Option(False, help="Redo stages whose outputs are already complete")) -> None:
    """Run the stages a pipeline TOML describes, skipping stages that already finished."""
    from clt_pipe.pipeline import run_pipeline

    run_pipeline(pipeline, only=only.split(",") if only else None, force=force, console=err_console)


@app.command("demo")
def demo_cmd(workdir: str = typer.Option("runs/demo", help="Where the demo writes its store, CLT and report"),
             seed: int = typer.Option(0, help="Seed for the tiny CLIP, the split and the CLT"),
             fast: bool = typer.Option(False, help="Fewer CLT steps (for smoke tests)"),
             device: str = typer.Option("cpu", help="Device of every stage: cpu | cuda | cuda:N (the tiny CLIP "
                                                   "itself always trains on CPU)")) -> None:
    """Offline end-to-end run: tiny CLIP trained on sklearn digits -> harvest -> fit -> analyze."""
    from clt_pipe.demo.run import run_demo

    run_demo(workdir, seed=seed, fast=fast, device=device, console=err_console)


@store_app.command("info")
def store_info(url: str = typer.Argument(..., help="Store path or URL"),
               as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table")) -> None:
    """What a store holds, its sizes and whether its harvest finished."""
    from clt_pipe.store.inspect import store_info as info

    data = info(url)
    if as_json:
        console.print_json(json.dumps(data))
    else:
        _print_summary(f"store {url}", data)


@store_app.command("verify")
def store_verify(url: str = typer.Argument(..., help="Store path or URL"),
                 threads: int = typer.Option(4, help="Threads reading chunks")) -> None:
    """Re-read every committed chunk and check it against its commit checksum; names bad shards."""
    from clt_pipe.store.inspect import verify_store

    report = verify_store(url, threads=threads)
    if report["bad_shards"]:
        for shard, why in report["problems"][:20]:
            err_console.print(f"[red]shard {shard}[/]: {why}")
        raise CltPipeError(f"{url}: {len(report['bad_shards'])} bad shard(s): {report['bad_shards'][:10]}")
    status = "complete" if report["complete"] else "INCOMPLETE"
    console.print(f"[green]ok[/]: {report['checked_chunks']} chunks in {report['checked_shards']} committed "
                  f"shards match their checksums; store is {status}")
    if not report["complete"]:
        raise typer.Exit(1)


@store_app.command("repair")
def store_repair(url: str = typer.Argument(..., help="Store path or URL"),
                 threads: int = typer.Option(4, help="Threads reading chunks")) -> None:
    """Drop the commit records of bad shards (and COMPLETE.json) so the same harvest command rewrites them."""
    from clt_pipe.store.inspect import repair_store

    out = repair_store(url, threads=threads)
    if not out["problems"]:
        console.print(f"[green]ok[/]: {url} has no bad shards; nothing to repair")
        return
    for shard, why in out["problems"][:20]:
        err_console.print(f"[yellow]shard {shard}[/]: {why}")
    dropped = ", ".join(str(s) for s in out["dropped_shards"]) or "none"
    groups = f"; dropped {', '.join(out['dropped_groups'])}" if out["dropped_groups"] else ""
    console.print(f"repaired {url}: dropped the commits of shard(s) {dropped}{groups}; now re-run the same "
                  f"`clt-pipe harvest` command to rewrite them")


@store_app.command("ls")
def store_ls(root: str = typer.Argument("storage/stores", help="Folder or URL prefix holding stores")) -> None:
    """List the stores under a root with their model, dataset and completeness."""
    from clt_pipe.store.inspect import list_stores

    table = Table("store", "model", "dataset", "tokens", "images", "complete")
    for row in list_stores(root):
        table.add_row(*(str(row[k]) for k in ("store", "model", "dataset", "tokens", "images", "complete")))
    console.print(table)


@app.command("export")
def export_cmd(clt: str = typer.Argument(..., help="Fitted CLT directory (fit --out)"),
               out: str = typer.Argument(..., help="Destination directory"),
               store: str = typer.Option("", "--store", help="Store to calibrate a relu_topk CLT's JumpReLU thresholds "
                                         "on (required for relu_topk) and to measure circuit-tracer's agreement on"),
               calibration_rows: int = typer.Option(8192, "--calibration-rows",
                                                    help="Token rows for calibration, as many again for agreement"),
               calibration: str = typer.Option("error", "--calibration", help="relu_topk thresholds: error (fitted "
                                               "to the reported R² per token type) | frequency (TopK's firing rate)"),
               min_r2: float = typer.Option(0.9, "--min-r2", help="Warn when a token type's R² vs the CLT falls "
                                            "below this at any layer"),
               input_hook: str = typer.Option("ln2.hook_normalized", "--input-hook", help="ln2.hook_normalized "
                                              "(LN2 affine folded in; loads the ViT) | mlp.hook_in (as trained)"),
               device: str = typer.Option("cpu", "--device", help="cpu | cuda | cuda:N")) -> None:
    """Export a fitted CLT for circuit-tracer (standardisation folded; raw activations in and out)."""
    preflight.check_export(clt, store)  # a CLT it cannot export is refused before torch loads
    from clt_pipe.analyze.circuit_tracer import export_for_circuit_tracer, summary_lines

    summary = export_for_circuit_tracer(clt, out, store, device, calibration_rows, calibration=calibration,
                                        min_r2=min_r2, input_hook=input_hook)
    for line in summary_lines(summary):
        console.print(line, highlight=False, soft_wrap=True)


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit")) -> None:
    if version:
        console.print(f"clt-pipe {__version__}")
        raise typer.Exit()


def main() -> None:
    from clt_pipe import signals

    try:
        with signals.handling():  # explicit SIGTERM/SIGINT handlers: graceful stop, PID 1 in a container too
            app(standalone_mode=True)
    except CltPipeError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except signals.Stopped as e:  # typer turns a KeyboardInterrupt into a bare exit, so SIGINT comes here too
        err_console.print(f"[bold yellow]stopped:[/] {e.message or _stopped_line(e.signum)}", highlight=False,
                          soft_wrap=True)
        signals.exit_now(e.exit_code)


def _stopped_line(signum: int) -> str:
    from clt_pipe.signals import signal_name

    words = [a for a in sys.argv[1:] if not a.startswith("-")]
    command = " ".join(words[:2] if words[:1] == ["store"] else words[:1]) or "clt-pipe"
    kept = {"harvest": "committed shards are kept; re-run the same command to resume",
            "fit": "checkpoints written before are kept; re-run the same command with --resume to continue",
            "analyze": "no report was written; re-run the same command",
            "run": "finished stages, committed shards and checkpoints are kept; re-run the same command to resume"}
    return f"{command} stopped by {signal_name(signum)}; {kept.get(command, 'nothing more was written')}"
