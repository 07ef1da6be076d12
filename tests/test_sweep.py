"""Fit sweeps (clt_pipe/fit/sweep.py) and divergence (clt_pipe/fit/divergence.py) on a synthetic store: members
bit-identical to fitting alone, exact resume of the whole sweep, a diverging member stopped while the rest go on,
the memory refusal, and the config/CLI forms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clt_pipe.clt import rundir
from clt_pipe.clt.rundir import load_fitted
from clt_pipe.config import FitConfig, build
from clt_pipe.errors import ConfigError
from clt_pipe.fit import checkpoint as ckpt
from clt_pipe.fit import sweep as S
from clt_pipe.clt.rundir import DIVERGED_FILE
from clt_pipe.fit.divergence import DivergedError
from clt_pipe.fit.trainer import run_fit
from clt_pipe.pipeline import parse_pipeline, stage_sweep
from clt_pipe.testing.synthstore import RandomRows, write_store
from tests.conftest import assert_one_line_error, run_cli
from tests.test_fit import assert_same_weights as assert_same
from tests.test_fit import final_weights as weights
from tests.test_fit import fit_cfg

L, D, T = 3, 16, 8
SPARSIFIERS = ["jumprelu", "relu_topk", "abs_topk"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("sweep") / "s.zarr")
    write_store(url, 128, T, L, D, RandomRows(T, L, D, seed=5), chunk_mb=1 / 64)
    return url


def cfg(store: str, out, **kw) -> FitConfig:
    return fit_cfg(store, out, **{**dict(n_features=32, steps=12, batch_size=32, warmup_steps=3, log_every=2,
                                         dead_tokens=500, shuffle_chunks=2, seed=7), **kw})


def metrics(run_dir) -> list[dict]:
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x]
    return [{k: v for k, v in r.items() if k not in ("time", "steps_per_s", "tokens_per_s")} for r in lines]


SWEEP = S.SweepConfig((("sparsifier", tuple(SPARSIFIERS)),))


@pytest.fixture(scope="module")
def swept(store, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("swept") / "sweep"
    summary = run_fit(cfg(store, root), sweep=SWEEP)
    assert summary["members"] == 3
    return root


def test_members_are_bit_identical_to_fitting_alone(store, swept, tmp_path):
    for name in SPARSIFIERS:
        alone = tmp_path / name
        run_fit(cfg(store, alone, sparsifier=name))
        member = swept / name
        assert_same(weights(member), weights(alone))
        assert metrics(member) == metrics(alone)
        a, meta_a = load_fitted(member)
        b, meta_b = load_fitted(alone)
        assert_same(a.state_dict(), b.state_dict())
        # run.json is the single fit's, but for --out: analyze, atlas and export read it unchanged
        assert {**meta_a["config"], "out": ""} == {**meta_b["config"], "out": ""}
    rec = S.read_sweep(swept)
    assert [m["name"] for m in rec["members"]] == SPARSIFIERS and rec["mode"] == "cross"


def test_sweep_resume_is_exact(store, swept, tmp_path):
    root = tmp_path / "sweep"

    def stop_at(step):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_fit(cfg(store, root, checkpoint_every=4), sweep=SWEEP, on_step=stop_at)
    # a crash while the members wrote their step-4 checkpoints: one of them has none
    for p in ckpt.list_checkpoints(root / "abs_topk"):
        (p / ckpt.DONE_FILE).unlink()
    assert ckpt.complete_steps(root / "jumprelu") == [4]
    run_fit(cfg(store, root, checkpoint_every=4, resume=True), sweep=SWEEP)
    for name in SPARSIFIERS:
        assert_same(weights(root / name), weights(swept / name))
        assert metrics(root / name) == metrics(swept / name)
    # and again with every member at step 8: resumed from there
    root2 = tmp_path / "sweep2"
    with pytest.raises(KeyboardInterrupt):
        run_fit(cfg(store, root2, checkpoint_every=4), sweep=SWEEP, on_step=lambda s: s == 9 and stop_at(6))
    assert all(ckpt.complete_steps(root2 / n) == [4, 8] for n in SPARSIFIERS)
    run_fit(cfg(store, root2, checkpoint_every=4, resume=True), sweep=SWEEP)
    for name in SPARSIFIERS:
        assert_same(weights(root2 / name), weights(swept / name))
    assert run_fit(cfg(store, root2, checkpoint_every=4, resume=True), sweep=SWEEP)["already_finished"]


def test_members_of_other_lengths_finish_on_their_own_step(store, tmp_path):
    sweep = S.SweepConfig((("steps", (6, 12)), ("lr", (3e-3, 1e-3))), "zip")
    run_fit(cfg(store, tmp_path / "sw"), sweep=sweep)
    for steps, lr in ((6, 3e-3), (12, 1e-3)):
        name = f"steps{steps}-lr{lr}"
        alone = tmp_path / f"alone-{steps}"
        run_fit(cfg(store, alone, steps=steps, lr=lr))
        assert_same(weights(tmp_path / "sw" / name), weights(alone))
        assert rundir.read_run(tmp_path / "sw" / name)["finished"]


def poison(monkeypatch, lr: float, from_step: int, weights_only: bool = False) -> None:
    """From ``from_step`` on, the trainers of learning rate ``lr`` diverge: their batches' inputs become inf (a NaN
    loss, NaN gradients, NaN weights), or with ``weights_only`` one weight turns NaN after the step (its loss still
    finite). lr > 1 is refused up front (issue 21), so a real run cannot be made to diverge on demand here."""
    from clt_pipe.fit.trainer import Trainer
    from clt_pipe.store.loader import Batch

    step = Trainer.train_step

    def train_step(self, batch):
        bad = self.cfg.lr == lr and self.step >= from_step
        if bad and not weights_only:
            batch = Batch(batch.x * float("inf"), batch.y, batch.image)
        metrics = step(self, batch)
        if bad and weights_only:
            with torch.no_grad():
                self.model.W_enc[0, 0, 0] = float("nan")
        return metrics

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_diverging_member_stops_and_the_rest_go_on(store, swept, tmp_path, monkeypatch):
    poison(monkeypatch, 2e-3, from_step=4)
    sweep = S.SweepConfig((("lr", (3e-3, 2e-3)),))
    root = tmp_path / "sw"
    with pytest.raises(DivergedError) as err:
        run_fit(cfg(store, root, checkpoint_every=2), sweep=sweep)
    assert "lr0.002" in str(err.value) and "1 of 2 finished" in str(err.value)
    bad, good = root / "lr0.002", root / "lr0.003"
    line = (bad / DIVERGED_FILE).read_text()
    assert "the loss went non-finite at step 5" in line and "(step-00000004)" in line
    assert len(line.strip().splitlines()) == 1
    meta = rundir.read_run(bad)
    assert not meta["finished"] and not (bad / rundir.CLT_DIR).exists()
    assert [p.name for p in ckpt.list_checkpoints(bad)] == ["step-00000002", "step-00000004"]
    assert all(torch.isfinite(t).all() for t in weights(bad).values())
    assert rundir.read_run(good)["finished"]
    assert_same(weights(good), weights(swept / "relu_topk"))
    # the sweep is re-run as a pipeline would: the finished member is kept, the diverged one named again
    with pytest.raises(DivergedError):
        run_fit(cfg(store, root, checkpoint_every=2, resume=True), sweep=sweep)
    assert_same(weights(good), weights(swept / "relu_topk"))


def test_single_fit_divergence_is_one_line_and_nonzero(store, tmp_path, capsys, monkeypatch):
    poison(monkeypatch, 0.5, from_step=2)
    out = tmp_path / "run"
    args = ["fit", "--store", store, "--out", str(out), "--n-features", "32", "--k", "4", "--steps", "12",
            "--batch-size", "32", "--lr", "0.5", "--checkpoint-every", "1", "--shuffle-chunks", "2",
            "--device", "cpu"]
    code, _, err = run_cli(capsys, monkeypatch, args)
    assert_one_line_error(code, err, "non-finite at step 3", "last finite checkpoint (step-00000002)")
    meta = json.loads((out / rundir.RUN_FILE).read_text())
    assert meta["finished"] is False and not (out / rundir.CLT_DIR).exists()
    assert all(torch.isfinite(t).all() for t in weights(out).values())
    # re-running the same command names the divergence again instead of training into it
    for again in ([], ["--resume"]):
        code, _, err = run_cli(capsys, monkeypatch, args + again)
        assert_one_line_error(code, err, "non-finite")


def test_nan_weights_with_a_finite_loss_are_never_checkpointed(store, tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        poison(mp, 1e-3, from_step=3, weights_only=True)
        with pytest.raises(DivergedError, match="the weights went non-finite at step 4"):
            run_fit(cfg(store, tmp_path / "run", lr=1e-3, checkpoint_every=2))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step-00000002"]
    assert all(torch.isfinite(t).all() for t in weights(tmp_path / "run").values())


def test_sweep_that_does_not_fit_is_refused_in_one_line(store, tmp_path, capsys, monkeypatch):
    import clt_pipe.fit.trainer as trainer

    monkeypatch.setattr(trainer, "available_memory", lambda device: 2**16)
    out = tmp_path / "sw"
    code, _, err = run_cli(capsys, monkeypatch, ["fit", "--store", store, "--out", str(out), "--n-features", "32",
                                                 "--k", "4", "--steps", "4", "--batch-size", "32", "--device", "cpu",
                                                 "--sweep", "sparsifier=relu_topk,abs_topk", "--sweep", "k=2,4"])
    assert_one_line_error(code, err, "4 members need", "more than the 0.1 MiB available")
    assert not out.exists()


def test_sweep_says_its_memory_before_the_first_step(store, tmp_path, capsys, monkeypatch):
    out = tmp_path / "sw"
    code, _, err = run_cli(capsys, monkeypatch, ["fit", "--store", store, "--out", str(out), "--n-features", "32",
                                                 "--k", "4", "--steps", "2", "--batch-size", "32", "--device", "cpu",
                                                 "--shuffle-chunks", "2", "--log-every", "1", "--sweep", "k=2,4"])
    assert code == 0, err
    assert "sweep: 2 members need" in err
    assert err.index("sweep: 2 members need") < err.index("step 2")
    assert [m["name"] for m in S.read_sweep(out)["members"]] == ["k2", "k4"]


# ---- declaring a sweep --------------------------------------------------------------------------------------
def test_cross_and_zip():
    table = {"sparsifier": ["jumprelu", "relu_topk"], "k": [16, 32]}
    assert [m for m in S.SweepConfig.parse(table).combinations()] == [
        {"sparsifier": "jumprelu", "k": 16}, {"sparsifier": "jumprelu", "k": 32},
        {"sparsifier": "relu_topk", "k": 16}, {"sparsifier": "relu_topk", "k": 32}]
    assert S.SweepConfig.parse({**table, "mode": "zip"}).combinations() == [
        {"sparsifier": "jumprelu", "k": 16}, {"sparsifier": "relu_topk", "k": 32}]
    base = build(FitConfig, {"out": "runs/x"})
    names = [m.name for m in S.members(base, S.SweepConfig.parse(table))]
    assert names == ["jumprelu-k16", "jumprelu-k32", "relu_topk-k16", "relu_topk-k32"]
    m = S.members(base, S.SweepConfig.from_cli(["k=16,32"], "cross"))
    assert [x.cfg.k for x in m] == [16, 32] and m[0].cfg.out == "runs/x/k16"


@pytest.mark.parametrize("table, needle", [
    ({"batch_size": [1, 2]}, "shared by every member"),
    ({"seed": [1, 2]}, "shared by every member"),
    ({"kk": [1]}, "unknown key"),
    ({"k": []}, "non-empty list"),
    ({"k": 4}, "non-empty list"),
    ({"k": [1, 2], "lr": [1e-3], "mode": "zip"}, "one length"),
    ({"k": [1], "mode": "diagonal"}, "cross, zip"),
    ({"k": [0, 4]}, "k"),
    ({"k": [4, 4]}, "repeat"),
])
def test_bad_sweeps_are_named(table, needle):
    with pytest.raises(ConfigError, match=needle):
        S.members(build(FitConfig, {}), S.SweepConfig.parse(table))


def test_pipeline_and_config_file_declare_the_sweep(tmp_path):
    toml = tmp_path / "p.toml"
    toml.write_text('[fit]\nout = "runs/sw"\nk = 8\n[fit.sweep]\nsparsifier = ["jumprelu", "abs_topk"]\n'
                    'mode = "zip"\n')
    pipe = parse_pipeline(toml)
    assert pipe.fit.k == 8 and pipe.sweep.axes == (("sparsifier", ("jumprelu", "abs_topk")),)
    assert pipe.sweep.mode == "zip"
    assert stage_sweep(str(toml), None, None) == pipe.sweep
    assert stage_sweep(str(toml), ["k=1,2"], None).axes == (("k", ("1", "2")),)
    flat = tmp_path / "fit.toml"
    flat.write_text('k = 8\n[sweep]\nk = [4, 8]\n')
    assert stage_sweep(str(flat), None, "zip").mode == "zip"
    with pytest.raises(ConfigError, match="no sweep"):
        stage_sweep(None, None, "zip")


def test_sweep_root_and_single_run_do_not_mix(store, swept, tmp_path):
    from clt_pipe.errors import CheckpointError

    with pytest.raises(CheckpointError, match="holds a sweep"):
        run_fit(cfg(store, swept))
    with pytest.raises(CheckpointError, match="another sweep"):
        run_fit(cfg(store, swept, resume=True), sweep=S.SweepConfig((("k", (2, 4)),)))


@pytest.mark.parametrize("path", sorted(Path("pipelines").glob("vit-b*.toml")), ids=lambda p: p.stem)
def test_paper_pipelines_sweep_the_three_sparsifiers(path):
    import re

    env = {v: "/data" for v in re.findall(r"\$\{(\w+)\}", path.read_text())}
    pipe = parse_pipeline(path, env=env)
    names = [m.name for m in S.members(pipe.fit, pipe.sweep)]
    assert names == SPARSIFIERS
    assert pipe.fit.shuffle_chunks == 0  # the auto-sized window that mixes batches, not a stale override
