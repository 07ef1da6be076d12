"""Config loading, CLI wiring, pipeline files and the README's commands."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from clt_pipe import cli
from clt_pipe.config import AnalyzeConfig, FitConfig, HarvestConfig, build
from clt_pipe.pipeline import stage_config
from clt_pipe.errors import ConfigError
from clt_pipe.pipeline import parse_pipeline

REPO = Path(__file__).resolve().parents[1]
PIPELINE_ENV = {"CIFAR100_ROOT": "/d/c100", "COCO_ROOT": "/d/coco", "IMAGENET_ROOT": "/d/in",
                "CLT_PIPE_TINY_CLIP_CONFIG": "/c/tiny-clip.json", "CLT_PIPE_TINY_CLIP_CKPT": "/c/tiny-clip.pt"}


def test_unknown_key_is_named(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[harvest]\nmodel = "ViT-B-32"\nbatch_sise = 3\n')
    with pytest.raises(ConfigError, match=r"harvest\.batch_sise: unknown key"):
        stage_config(HarvestConfig, "harvest", str(f), {})


@pytest.mark.parametrize("cls,values,key", [
    (HarvestConfig, {"tokens": "cls+x"}, "tokens"),
    (HarvestConfig, {"batch_size": 0}, "batch_size"),
    (HarvestConfig, {"batch_size": "many"}, "batch_size"),
    (HarvestConfig, {"dtype": "fp8"}, "dtype"),
    (FitConfig, {"k": 0}, "k"),
    (FitConfig, {"sparsifier": "topk"}, "sparsifier"),
    (FitConfig, {"holdout": 1.5}, "holdout"),
    (AnalyzeConfig, {"windows": ["7-3"]}, "windows"),
    (AnalyzeConfig, {"only": ["fidelity", "nope"]}, "only"),
    (AnalyzeConfig, {"window_tokens": []}, "window_tokens"),
])
def test_bad_values_name_the_key(cls, values, key):
    with pytest.raises(ConfigError, match=rf"^{key}"):
        build(cls, values)


def test_k_at_least_features_rejected():
    cfg = build(FitConfig, {"k": 64, "expansion": 1})
    with pytest.raises(ConfigError, match="k: must be smaller"):
        cfg.spec(2, 64)  # CLTSpec is the one validator of k
    assert cfg.spec(2, 128).n_features == 128


def test_precedence_defaults_toml_cli(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[fit]\nk = 8\nlr = 0.01\nsteps = 7\n')
    cfg = stage_config(FitConfig, "fit", str(f), {"k": "4", "steps": None})
    assert (cfg.k, cfg.lr, cfg.steps, cfg.batch_size) == (4, 0.01, 7, FitConfig().batch_size)


def test_cli_override_reaches_config(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr("clt_pipe.preflight.check", lambda cfg, **k: None)  # no store here; tested elsewhere
    monkeypatch.setattr("clt_pipe.fit.trainer.run_fit", lambda cfg, console=None, **kw:
                        seen.setdefault("cfg", cfg) and {})
    f = tmp_path / "c.toml"
    f.write_text('[fit]\nk = 8\nsteps = 9\n')
    res = CliRunner().invoke(cli.app, ["fit", "--config", str(f), "--k", "5", "--no-dec-bias", "--tokens", "cls"])
    assert res.exit_code == 0, res.output
    assert (seen["cfg"].k, seen["cfg"].steps, seen["cfg"].dec_bias, seen["cfg"].tokens) == (5, 9, False, "cls")


def test_every_option_has_help():
    group = typer.main.get_command(cli.app)
    missing = []

    def walk(cmd, path):
        for p in cmd.params:
            if not getattr(p, "help", None) and p.name not in ("help",):
                missing.append(f"{path} {p.name}")
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(group, "clt-pipe")
    assert not missing, missing
    for stage in ("harvest", "fit", "analyze", "run", "demo", "store", "export"):
        assert stage in group.commands


def test_cli_bad_input_is_one_line_error(tmp_path, warm_cli):
    proc = warm_cli(["fit", "--store", str(tmp_path / "nope.zarr"), "--out", str(tmp_path / "o")], tmp_path)
    assert proc.wait(120) != 0
    stderr = proc.stderr()
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "not found" in lines[0], stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("path", sorted((REPO / "pipelines").glob("*.toml")), ids=lambda p: p.name)
def test_pipeline_files_validate(path):
    pipe = parse_pipeline(path, env=PIPELINE_ENV)
    assert pipe.harvest is not None and pipe.fit is not None and pipe.analyze is not None
    assert pipe.fit.store == pipe.harvest.store  # the CLT trains on the harvested store
    assert pipe.analyze.clt == pipe.fit.out
    if pipe.harvest_eval is not None:
        assert pipe.analyze.store == pipe.harvest_eval.store != pipe.harvest.store
        assert pipe.harvest_eval.model == pipe.harvest.model


def test_paper_pipelines_cover_the_six_experiments():
    names = {p.stem for p in (REPO / "pipelines").glob("vit-*.toml")}
    assert names == {f"vit-{m}-{d}" for m in ("b32", "b16") for d in ("cifar100", "coco", "imagenet100")}


def test_pipeline_unset_env_var_is_named(tmp_path):
    with pytest.raises(ConfigError, match="CIFAR100_ROOT"):
        parse_pipeline(REPO / "pipelines" / "vit-b32-cifar100.toml", env={})


def test_packaged_demo_pipeline_is_the_repo_file():
    from clt_pipe.demo.run import demo_pipeline_path

    assert demo_pipeline_path().read_text() == (REPO / "pipelines" / "demo.toml").read_text()


def _readme_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            words = shlex.split(line) if line else []
            if words[:1] == ["clt-pipe"]:
                cmds.append(words[1:])
            elif words[:2] == ["docker", "run"]:  # docker run [flags] IMAGE ARGS...: the image is clt-pipe
                cmds.append(words[words.index("clt-pipe") + 1:])
    return cmds


def test_readme_commands_parse(monkeypatch):
    """Every clt-pipe line of the README (docker lines too) is a valid command with valid settings.

    The stage functions are replaced by recorders, so nothing runs: what is checked is that each option
    exists and each value validates. The commands that run for real (install, test, demo) run in CI.
    """
    seen = []
    monkeypatch.setattr("clt_pipe.preflight.check", lambda cfg, **k: None)  # the README's data roots are not here
    monkeypatch.setattr("clt_pipe.harvest.run.run_harvest", lambda cfg, *a, **k: seen.append(cfg) or {"dry_run": 1,
                        "bytes_uncompressed": 0})
    monkeypatch.setattr("clt_pipe.fit.trainer.run_fit", lambda cfg, **k: seen.append(cfg) or {})
    monkeypatch.setattr("clt_pipe.analyze.run.run_analyze", lambda cfg, **k: seen.append(cfg) or {})
    monkeypatch.setattr("clt_pipe.analyze.atlas.run.run_atlas", lambda cfg, **k: seen.append(cfg) or {"index": ""})
    monkeypatch.setattr("clt_pipe.pipeline.run_pipeline", lambda path, **k: seen.append(parse_pipeline(
        REPO / path, env=PIPELINE_ENV)))
    monkeypatch.setattr("clt_pipe.demo.run.run_demo", lambda *a, **k: seen.append("demo"))
    monkeypatch.setattr("clt_pipe.store.inspect.store_info", lambda url: seen.append(url) or {})
    monkeypatch.setattr("clt_pipe.store.inspect.verify_store", lambda url, threads=4: seen.append(url) or {
        "bad_shards": [], "complete": True, "checked_chunks": 0, "checked_shards": 0})
    monkeypatch.setattr("clt_pipe.store.inspect.repair_store", lambda url, threads=4: seen.append(url) or {
        "problems": [], "dropped_shards": [], "dropped_groups": [], "was_complete": True})
    cmds = _readme_commands()
    assert len(cmds) >= 8
    for args in cmds:
        res = CliRunner().invoke(cli.app, args)
        assert res.exit_code == 0, (args, res.output, res.exception)
    assert len(seen) == len(cmds)


def test_stage_config_reads_a_pipeline_file_like_run(monkeypatch):
    """`clt-pipe fit --config pipelines/X.toml` gets the wiring and ${ENV} expansion of `clt-pipe run`."""
    for k, v in PIPELINE_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("CLT_PIPE_RUNS", "/scratch/runs")
    path = str(REPO / "pipelines" / "vit-b32-coco.toml")
    fit = stage_config(FitConfig, "fit", path, {"steps": "5"})
    harvest = stage_config(HarvestConfig, "harvest", path, {})
    analyze = stage_config(AnalyzeConfig, "analyze", path, {})
    assert fit.store == harvest.store and fit.out == "/scratch/runs/vit-b32-coco/clt" and fit.steps == 5
    assert harvest.data_root == "/d/coco" and analyze.clt == fit.out and analyze.store.endswith("-val.zarr")


def test_demo_variant_moves_every_stage_to_the_device(tmp_path):
    from clt_pipe.demo.run import _variant, demo_pipeline_path

    pipe = parse_pipeline(_variant(demo_pipeline_path(), tmp_path, fast=True, device="cuda:1"), env=PIPELINE_ENV)
    assert {pipe.harvest.device, pipe.harvest_eval.device, pipe.fit.device, pipe.analyze.device} == {"cuda:1"}
    assert pipe.fit.steps == 150
    same = parse_pipeline(_variant(demo_pipeline_path(), tmp_path, fast=False, device="cpu"), env=PIPELINE_ENV)
    assert same.fit.steps == parse_pipeline(demo_pipeline_path(), env=PIPELINE_ENV).fit.steps > 150
