"""`clt-pipe analyze` over a fit sweep and `clt-pipe compare` (clt_pipe/analyze/compare.py): each member's own
report, then one table and plot across members, with baselines and standard errors, that renders in a browser."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from clt_pipe.analyze.compare import COMPARE_FILE
from clt_pipe.config import FitConfig, build
from clt_pipe.clt.rundir import DIVERGED_FILE
from clt_pipe.fit.sweep import SweepConfig
from tests.conftest import analyze_config, assert_one_line_error, run_cli

SPARSIFIERS = ("jumprelu", "relu_topk", "abs_topk")


@pytest.fixture(scope="module")
def sweep_report(analyze_env):
    """The three sparsifiers fitted as one short sweep on the analysis store, analyzed as a sweep; the third
    member is then marked diverged and analyzed again, into another folder."""
    from clt_pipe.analyze.run import run_analyze
    from clt_pipe.fit.trainer import run_fit

    root = analyze_env["root"] / "sweep-fit"
    fit = build(FitConfig, {"store": analyze_env["store_url"], "out": str(root), "n_features": 64, "k": 4,
                            "steps": 6, "batch_size": 32, "warmup_steps": 2, "log_every": 3, "device": "cpu",
                            "read_threads": 2, "seed": 1})
    run_fit(fit, sweep=SweepConfig((("sparsifier", SPARSIFIERS),)))
    cfg = analyze_config(analyze_env, clt=str(root), out=str(analyze_env["root"] / "sweep-report"),
                         only=["fidelity", "zeroshot", "openloop", "closedloop"], windows=["0-1", "1-1"],
                         window_tokens=["cls"], max_images=12)
    return cfg, run_analyze(cfg)


def test_sweep_analysis_compares_every_member(sweep_report):
    cfg, summary = sweep_report
    out = Path(cfg.out)
    assert summary["members"] == 3
    rec = json.loads((out / COMPARE_FILE).read_text())
    assert [m["name"] for m in rec["members"]] == list(SPARSIFIERS)
    fid = pd.read_parquet(out / "compare_fidelity.parquet")
    for name in SPARSIFIERS:
        own = json.loads((out / name / "report.json").read_text())  # each member's single-run report
        assert own["identity"]["clt"]["spec"]["sparsifier"] == name
        for agg in own["results"]["fidelity"]["aggregate"]:
            row = fid[(fid.member == name) & (fid.tokens == agg["tokens"])].iloc[0]
            assert row.sparsifier == name
            for key in ("mse", "r2", "cosine", "l0", "fvu"):
                assert row[key] == pytest.approx(agg[key]), (name, key)
    assert set(fid.tokens) == {"cls", "patches", "all"}
    sub = pd.read_parquet(out / "compare_substitution.parquet")
    closed = sub[sub["mode"] == "closedloop"]
    assert set(closed.member) == set(SPARSIFIERS) and set(closed.window) == {"0-1", "1-1"}
    # each accuracy stands beside its baseline (the same for every member: the same images) with its s.e.
    assert closed.baseline_top1.nunique() == 1
    assert (closed.top1_se > 0).all() or (closed.top1.isin([0.0, 100.0])).any()
    assert (closed.delta_top1_pp - (closed.top1 - closed.baseline_top1)).abs().max() < 1e-9
    html = (out / "report.html").read_text()
    assert "compare.png" in html and all(f"href='{n}/report.html'" in html for n in SPARSIFIERS)
    assert "baseline top-1" in html


def test_compare_command_and_left_out_members(sweep_report, analyze_env, capsys, monkeypatch, tmp_path):
    cfg, _ = sweep_report
    members = [str(Path(cfg.out) / n) for n in SPARSIFIERS[:2]]
    code, out, err = run_cli(capsys, monkeypatch, ["compare", *members, "--out", str(tmp_path / "cmp")])
    assert code == 0, err
    rec = json.loads((tmp_path / "cmp" / COMPARE_FILE).read_text())
    assert [m["name"] for m in rec["members"]] == list(SPARSIFIERS[:2])
    # a comparison folder expands to its members
    code, _, err = run_cli(capsys, monkeypatch, ["compare", cfg.out, "--out", str(tmp_path / "cmp2")])
    assert code == 0, err
    assert len(json.loads((tmp_path / "cmp2" / COMPARE_FILE).read_text())["members"]) == 3
    code, _, err = run_cli(capsys, monkeypatch, ["compare", str(tmp_path), "--out", str(tmp_path / "cmp3")])
    assert_one_line_error(code, err, "no report.json")


def test_diverged_member_is_left_out_with_a_note(sweep_report, analyze_env):
    from dataclasses import replace

    from clt_pipe.analyze.run import run_analyze
    from clt_pipe.clt import rundir

    cfg, _ = sweep_report
    member = Path(cfg.clt) / "abs_topk"
    meta = rundir.read_run(member)
    rundir.write_run(member, meta, finished=False)
    (member / DIVERGED_FILE).write_text("the loss went non-finite at step 3\n")
    try:
        out = analyze_env["root"] / "sweep-report-2"
        run_analyze(replace(cfg, out=str(out), only=["fidelity"]))
        rec = json.loads((out / COMPARE_FILE).read_text())
        assert [m["name"] for m in rec["members"]] == ["jumprelu", "relu_topk"]
        assert any("abs_topk left out" in n and "non-finite" in n for n in rec["notes"])
    finally:
        (member / DIVERGED_FILE).unlink()
        rundir.write_run(member, meta, finished=True)


def test_comparison_renders_in_chromium(sweep_report, page_checker, tmp_path):
    cfg, _ = sweep_report
    problems = page_checker.problems(Path(cfg.out) / "report.html", screenshot=tmp_path / "compare.png")
    assert problems == [], "\n".join(problems)


def test_clt_pipe_run_fits_and_compares_a_sweep(analyze_env, tmp_path):
    """A pipeline's [fit.sweep] through `clt-pipe run`: the members, the comparison, and a re-run skips both."""
    from clt_pipe.pipeline import run_pipeline

    toml = tmp_path / "p.toml"
    toml.write_text(f'''
[fit]
store = "{analyze_env["store_url"]}"
out = "{tmp_path / "fit"}"
n_features = 64
k = 4
steps = 3
batch_size = 32
device = "cpu"
read_threads = 2

[fit.sweep]
sparsifier = ["relu_topk", "abs_topk"]

[analyze]
store = "{analyze_env["store_url"]}"
out = "{tmp_path / "report"}"
only = ["fidelity"]
device = "cpu"
''')
    first = run_pipeline(toml)
    assert first["fit"]["members"] == 2
    rec = json.loads((tmp_path / "report" / COMPARE_FILE).read_text())
    assert [m["name"] for m in rec["members"]] == ["relu_topk", "abs_topk"]
    again = run_pipeline(toml)
    assert again["fit"]["already_finished"] and again["analyze"]["skipped"]
