"""Issue 12, a newcomer's first hour: the Python version claimed, defaults in --help, input errors before loading."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from typer.testing import CliRunner

from clt_pipe import cli
from clt_pipe.config import STAGES, FitConfig, HarvestConfig

REPO = Path(__file__).resolve().parents[1]


def _requires_python() -> SpecifierSet:
    return SpecifierSet(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"])


def test_claimed_python_is_one_every_dependency_supports():
    """The lowest Python pyproject claims must satisfy each installed dependency's own Requires-Python
    (zarr 3 needs 3.11, and the code uses tomllib): a claim of 3.10 would install nowhere."""
    claim = _requires_python()
    lowest = min((v for v in ("3.9", "3.10", "3.11", "3.12", "3.13", "3.14") if v in claim), key=lambda v: tuple(
        map(int, v.split("."))))
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in claim, "tests run on a Python the package refuses"
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    checked = []
    for dep in deps:
        name = Requirement(dep).name
        try:
            needs = metadata.metadata(name).get("Requires-Python")
        except metadata.PackageNotFoundError:
            continue
        if needs:
            checked.append(name)
            assert f"{lowest}.0" in SpecifierSet(needs), \
                f"requires-python {claim} admits {lowest}, {name} needs {needs}"
    assert "zarr" in checked


def test_installed_metadata_says_what_pyproject_says():
    """A `pip install -e .` of this checkout carries pyproject's claim (skipped when another checkout is installed)."""
    dist = metadata.distribution("clt-pipe")
    direct = dist.read_text("direct_url.json")
    url = json.loads(direct).get("url", "") if direct else ""
    if Path(url.removeprefix("file://")).resolve() != REPO:
        pytest.skip(f"clt-pipe is installed from {url or 'elsewhere'}, not this checkout")
    assert SpecifierSet(dist.metadata["Requires-Python"]) == _requires_python()


def _help(*args: str) -> str:
    res = CliRunner().invoke(cli.app, [*args, "--help"], terminal_width=100)
    assert res.exit_code == 0, res.output
    return " ".join(res.output.split())  # undo click's wrapping


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_help_shows_every_default_and_keeps_brackets(stage):
    text = _help(stage)
    assert f"its [{stage}] table sets defaults" in text
    squeezed = "".join(text.split())  # click may wrap inside a long default
    for f in dataclasses.fields(STAGES[stage]):
        assert "[default:" + "".join(cli.default_text(f).split()) + "]" in squeezed, f.name


def test_help_shows_known_defaults_literally():
    def shows(args: tuple[str, ...], *wanted: str) -> None:
        squeezed = "".join(_help(*args).split())  # click wraps at spaces and hyphens
        for w in wanted:
            assert "".join(w.split()) in squeezed, (args, w)

    shows(("fit",), "[default: relu_topk]", "[default: 2000]", "[default: no-dec-bias]", f"[default: {FitConfig.k}]")
    shows(("harvest",), "[default: ViT-B-32]", "[default: single,ensemble]", "[default: fail]",
          "cifar100 | imagenet100 | coco | imagefolder | digits")  # the choices, too
    shows(("run",), "Pipeline TOML with [harvest], [fit], [analyze] tables")
    shows(("store", "verify"), "[default: 4]")
    shows(("demo",), "[default: runs/demo]")


def test_every_command_shows_defaults():
    """Each option or argument that has a default says it in --help (stage options: in their help text)."""
    import typer.main

    missing = []

    def walk(cmd, path):
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}")
        for p in cmd.params:
            if p.name == "help" or p.required or p.default is None:
                continue
            if not (getattr(p, "show_default", None) or "[default:" in (getattr(p, "help", None) or "")):
                missing.append(f"{path} {p.name}")

    walk(typer.main.get_command(cli.app), "clt-pipe")
    assert not missing, missing


PREFLIGHT_SCRIPT = r"""
import json, sys
from typer.testing import CliRunner
from clt_pipe import cli
cases = json.loads(sys.argv[1])
out = []
for args in cases:
    res = CliRunner().invoke(cli.app, args)
    out.append([type(res.exception).__name__, str(res.exception)])
heavy = [m for m in ("open_clip", "clt_pipe.harvest.run", "clt_pipe.fit.trainer", "clt_pipe.analyze.run",
                     "clt_pipe.backbone.loading", "clt_pipe.analyze.circuit_tracer") if m in sys.modules]
print(json.dumps({"errors": out, "heavy": heavy}))
"""


def test_input_errors_come_before_heavy_imports(tmp_path):
    """Bad inputs fail with the stage's CltPipeError while no model code has even been imported."""
    from clt_pipe.clt.rundir import write_run

    folder = tmp_path / "imgs"
    folder.mkdir()
    write_run(tmp_path / "run", {"spec": {"sparsifier": "relu_topk"}}, finished=True)
    write_run(tmp_path / "signed", {"spec": {"sparsifier": "abs_topk"}}, finished=True)
    cases = [
        (["harvest", "--dataset", "cifar100", "--store", str(tmp_path / "s.zarr")], "--data-root"),
        (["harvest", "--dataset", "cifar100", "--data-root", str(tmp_path / "nope"), "--store",
          str(tmp_path / "s.zarr")], "does not exist"),
        (["harvest", "--dataset", "imagefolder", "--data-root", str(folder), "--store", str(tmp_path / "s.zarr")],
         "no class folders"),
        (["harvest", "--dataset", "digits", "--split", "val", "--store", str(tmp_path / "s.zarr")], "split"),
        (["harvest", "--dataset", "digits", "--pretrained", str(tmp_path / "w.pt"), "--store",
          str(tmp_path / "s.zarr")], "w.pt"),
        (["harvest", "--dataset", "digits", "--device", "cuda:99", "--store", str(tmp_path / "s.zarr")], "cuda:99"),
        (["fit", "--store", str(tmp_path / "nope.zarr"), "--out", str(tmp_path / "o")], "not found"),
        (["fit", "--store", str(tmp_path / "nope.zarr"), "--device", "cuda:99"], "cuda:99"),
        (["analyze", "--store", str(tmp_path / "nope.zarr"), "--clt", str(tmp_path / "c")], "not found"),
        (["export", str(tmp_path / "run"), str(tmp_path / "ct")], "--store"),
        (["export", str(tmp_path / "signed"), str(tmp_path / "ct"), "--store", str(tmp_path / "s.zarr")], "signed"),
        (["export", str(tmp_path / "nope"), str(tmp_path / "ct")], "run.json"),
    ]
    proc = subprocess.run([sys.executable, "-c", PREFLIGHT_SCRIPT, json.dumps([c for c, _ in cases])],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for (args, expect), (kind, msg) in zip(cases, got["errors"]):
        assert kind.endswith("Error") and expect in msg, (args, kind, msg)
    assert got["heavy"] == [], f"imported before the inputs were checked: {got['heavy']}"


def test_pipeline_checks_every_stage_before_the_first_runs(tmp_path, monkeypatch):
    """`clt-pipe run`: a bad analyze data root fails before harvest writes anything."""
    from clt_pipe.errors import CltPipeError
    from clt_pipe.pipeline import run_pipeline

    monkeypatch.setattr("clt_pipe.harvest.run.run_harvest", lambda *a, **k: pytest.fail("harvest ran"))
    f = tmp_path / "p.toml"
    f.write_text(f'[harvest]\ndataset = "digits"\nstore = "{tmp_path}/s.zarr"\n'
                 f'[harvest_eval]\ndataset = "cifar100"\ndata_root = "{tmp_path}/none"\nstore = "{tmp_path}/e.zarr"\n')
    with pytest.raises(CltPipeError, match="does not exist"):
        run_pipeline(f)
    assert not (tmp_path / "s.zarr").exists()


def test_configs_are_frozen():
    cfg = HarvestConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.overwrite = True  # type: ignore[misc]
    assert dataclasses.replace(cfg, overwrite=True).overwrite and not cfg.overwrite
