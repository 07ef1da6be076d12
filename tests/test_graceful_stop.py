"""Graceful stop (issue 24): real SIGTERM/SIGINT to real `clt-pipe` processes (warm children, tests/warmcli.py);
what they keep resumes to the bytes of an uninterrupted run. And full forward batches whatever the shard size."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from clt_pipe.testing.fakedata import make_fake_imagefolder
from clt_pipe.testing.synthstore import RandomRows, write_store

from clt_pipe import signals
from clt_pipe.harvest import loop
from clt_pipe.store.reader import ActivationStore
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "clt_pipe" / "demo" / "assets" / "tiny-clip.json"
ENV = dict(os.environ, HF_HUB_OFFLINE="1")


@pytest.fixture
def ckpt(tiny_seeded_weights) -> Path:
    return tiny_seeded_weights


def harvest_args(store, root, ckpt, batch: int, chunks_per_shard: int = 2) -> list[str]:
    # 1 image per chunk
    return ["harvest", "--model", str(TINY), "--pretrained", str(ckpt), "--dataset", "imagefolder",
            "--data-root", str(root), "--store", str(store), "--chunk-mb", "0.01", "--chunks-per-shard",
            str(chunks_per_shard), "--batch-size", str(batch), "--template-sets", "single"]


def store_files(path: Path) -> dict[str, str]:
    """sha256 of every data file of a store: chunks, statistics, images.parquet, array metadata (not what holds
    timestamps: the commit records, COMPLETE.json, the root's zarr.json; nor the lock)."""
    out = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if p.is_file() and not rel.startswith("commits/") and rel not in ("harvest.lock", "COMPLETE.json",
                                                                           "zarr.json"):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def stopped_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("stopped:")]


def wait_for(proc, cond, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if cond():
            return
        time.sleep(0.005)
    proc.kill()
    proc.wait(60)
    raise AssertionError(f"{what} did not happen while the process ran (rc {proc.returncode}): "
                         f"{proc.stderr()[-2000:]}")


# ------------------------------------------------------------------------------------------ harvest


def test_sigterm_mid_harvest_commits_whole_shards_and_resumes_exactly(tmp_path, ckpt, capsys, monkeypatch,
                                                                        warm_cli):
    data = make_fake_imagefolder(tmp_path / "data", classes=("a", "b", "c"), per_class=32)  # 96 images
    stopped, clean = tmp_path / "stopped.zarr", tmp_path / "clean.zarr"
    args = lambda store: harvest_args(store, data["root"], ckpt, batch=3)  # noqa: E731 - 2-image shards
    proc = warm_cli(args(stopped), tmp_path, env=ENV)
    commits = stopped / "commits"
    wait_for(proc, lambda: commits.is_dir() and any(commits.glob("shard-*.json")), "a first commit")
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(60)
    seconds = time.monotonic() - t0
    assert proc.returncode == 143, proc.stderr()[-2000:]
    lines = stopped_lines(proc.stderr())
    n = len(list(commits.glob("shard-*.json")))
    assert 1 <= n < 48
    assert len(lines) == 1 and re.search(rf"harvest stopped by SIGTERM \([0-9.]+ s after the signal\): {n}/48 shards "
                                         r"are committed", lines[0]), lines
    assert "re-run the same command to resume" in lines[0] and "Traceback" not in proc.stderr()
    assert seconds < 30, seconds  # a bound, not a benchmark: the in-flight batch of 3 tiny images and its commits
    assert not (stopped / "COMPLETE.json").exists()
    code, out, _ = run_cli(capsys, monkeypatch, ["store", "verify", str(stopped)])
    assert code == 1 and f"in {n} committed shards match" in out and "INCOMPLETE" in out

    code, _, err = run_cli(capsys, monkeypatch, args(stopped))  # the same command resumes
    assert code == 0, err
    assert f"resuming: {n}/48 shards already committed" in err
    code, _, err = run_cli(capsys, monkeypatch, args(clean))
    assert code == 0, err
    ActivationStore(str(stopped))
    assert store_files(stopped) == store_files(clean)


# ------------------------------------------------------------------------------------------ fit


@pytest.fixture(scope="module")
def synth_store(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("synth") / "s.zarr")
    write_store(url, 256, 8, 3, 16, RandomRows(8, 3, 16, seed=3), chunk_mb=1 / 64)
    return url


def fit_args(store: str, out: Path, steps: int) -> list[str]:
    return ["fit", "--store", store, "--out", str(out), "--n-features", "64", "--k", "8", "--steps", str(steps),
            "--batch-size", "64", "--checkpoint-every", "100000", "--log-every", "1", "--device", "cpu"]


def weights_sha(out: Path) -> dict[str, str]:
    """sha256 of the final checkpoint's weights and of every file of the exported CLT."""
    files = [sorted((out / "checkpoints").iterdir())[-1] / "model.safetensors", *sorted((out / "clt").rglob("*"))]
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def test_ctrl_c_mid_fit_checkpoints_that_step_and_resumes_exactly(tmp_path, synth_store, capsys, monkeypatch,
                                                                   warm_cli):
    """SIGINT (Ctrl-C; SIGTERM takes the same path, tested with a fit as PID 1 and under torchrun below)."""
    sig = signal.SIGINT
    steps = 200  # long enough that the signal lands mid-run (~20 ms a step here); the stopped run ends soon after it
    stopped, clean = tmp_path / "stopped", tmp_path / "clean"
    proc = warm_cli(fit_args(synth_store, stopped, steps), tmp_path, env=ENV)
    metrics = stopped / "metrics.jsonl"
    wait_for(proc, lambda: metrics.is_file() and metrics.stat().st_size > 0, "a first step")
    os.kill(proc.pid, sig)
    proc.wait(60)
    code = 130 if sig == signal.SIGINT else 143
    assert proc.returncode == code, proc.stderr()[-2000:]
    lines = stopped_lines(proc.stderr())
    assert len(lines) == 1, proc.stderr()[-2000:]
    name = signal.Signals(sig).name
    step = int(lines[0].split(f"fit stopped by {name} after step ")[1].split("/")[0])
    assert 1 <= step < steps
    assert f"step-{step:08d}" in lines[0] and "--resume" in lines[0]
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == [f"step-{step:08d}"]  # no periodic ones
    assert not (stopped / "clt").exists()

    code, _, err = run_cli(capsys, monkeypatch, fit_args(synth_store, stopped, steps) + ["--resume"])
    assert code == 0, err
    code, _, err = run_cli(capsys, monkeypatch, fit_args(synth_store, clean, steps))
    assert code == 0, err
    assert weights_sha(stopped) == weights_sha(clean)


# ------------------------------------------------------------------------------------------ analyze


def test_sigterm_during_analyze_stops_cleanly(tmp_path, analyze_env, warm_cli):
    env = analyze_env
    out = tmp_path / "report"
    args = ["analyze", "--store", env["store_url"], "--clt", str(env["run_dir"]), "--out", str(out),
            "--data-root", str(env["root"] / "data"), "--device", "cpu"]
    proc = warm_cli(args, tmp_path, env=ENV)
    time.sleep(1.0)
    assert proc.poll() is None, proc.stderr()[-2000:]
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(60)
    assert proc.returncode == 143, proc.stderr()[-2000:]
    lines = stopped_lines(proc.stderr())
    assert lines == ["stopped: analyze stopped by SIGTERM; no report was written; re-run the same command"]
    assert "Traceback" not in proc.stderr()
    assert not (out / "report.json").exists()


# ------------------------------------------------------------------------------------------ the handlers


def _stop_point_forever(ready: str) -> None:
    """A command that never reaches a point where it polls the stop flag: only a second signal ends it."""
    with signals.handling(), signals.stop_point():
        Path(ready).write_text("ready")
        while True:
            time.sleep(0.01)


def test_a_second_signal_ends_the_process_at_once_an_echo_does_not(tmp_path):
    from tests.warmcli import WarmProcess

    ready = tmp_path / "ready"
    proc = WarmProcess(_stop_point_forever, (str(ready),), tmp_path)
    wait_for(proc, ready.exists, "the handlers' installation")
    os.kill(proc.pid, signal.SIGTERM)
    time.sleep(0.1)
    os.kill(proc.pid, signal.SIGINT)  # within ECHO_S: the same stop fanned out (Ctrl-C, torchrun's agent)
    time.sleep(signals.ECHO_S + 0.3)
    assert proc.poll() is None, proc.stderr()
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(30)
    assert time.monotonic() - t0 < 5
    assert proc.returncode == 143
    err = proc.stderr()
    # the first line names SIGINT when both were pending before the child ran (Python runs lower numbers first)
    assert re.search(r"SIG(TERM|INT): stopping after the work in flight is saved", err), err
    assert "SIGTERM again: exiting now" in err


# ------------------------------------------------------------------------------------------ full forward batches


@pytest.mark.parametrize("batch,chunks_per_shard", [(8, 2), (4, 6)])
def test_forward_batches_span_shards_and_store_bytes_do_not_change(tmp_path, ckpt, batch, chunks_per_shard,
                                                                   capsys, monkeypatch):
    """(8, 2): 2-image shards, a forward of 8 fills 4 of them. (4, 6): 6-image shards, so a write batch (4 images
    from a shard's start) is split across two forwards and joined before it is added."""
    data = make_fake_imagefolder(tmp_path / "data", classes=("a", "b", "c"), per_class=8)  # 24 images
    sizes: list[int] = []
    real = loop.run_capture

    def counting(bb, images, *a, **k):
        sizes.append(images.shape[0])
        return real(bb, images, *a, **k)

    monkeypatch.setattr(loop, "run_capture", counting)
    new, old = tmp_path / "new.zarr", tmp_path / "old.zarr"
    code, _, err = run_cli(capsys, monkeypatch, harvest_args(new, data["root"], ckpt, batch, chunks_per_shard))
    assert code == 0, err
    assert sizes == [batch] * (24 // batch)  # one forward per --batch-size images
    sizes.clear()
    monkeypatch.setattr(loop.ShardHarvest, "forward_batches", loop.ShardHarvest.shard_cut_batches)
    code, _, err = run_cli(capsys, monkeypatch, harvest_args(old, data["root"], ckpt, batch, chunks_per_shard))
    assert code == 0, err
    assert max(sizes) == min(batch, chunks_per_shard)  # cut at shard boundaries, as before
    assert store_files(new) == store_files(old)
    ga, gb = zarr.open_group(str(new), mode="r"), zarr.open_group(str(old), mode="r")
    assert ga.attrs["clt_pipe_store"]["fingerprint"] == gb.attrs["clt_pipe_store"]["fingerprint"]
    np.testing.assert_array_equal(ga["stats/mean_in"][:], gb["stats/mean_in"][:])


def test_resume_recomputes_the_batch_a_committed_shard_shares(tmp_path, ckpt, capsys, monkeypatch):
    """A shard rewritten on resume is computed in the forward batch an uninterrupted run used, images of
    committed shards included (and dropped)."""
    data = make_fake_imagefolder(tmp_path / "data", classes=("a", "b"), per_class=6)  # 12 images, 2 per shard
    store = tmp_path / "s.zarr"
    code, _, err = run_cli(capsys, monkeypatch, harvest_args(store, data["root"], ckpt, 5))
    assert code == 0, err
    want = store_files(store)
    for s in (2, 3):  # images 4-7: forward batches [0, 5) and [5, 10)
        (store / "commits" / f"shard-{s:06d}.json").unlink()
    (store / "COMPLETE.json").unlink()
    sizes: list[tuple[int, int]] = []
    real = loop.ShardHarvest.step

    def recording(self, open_shards, idx, pieces, *a):
        sizes.append((idx.start, idx.stop, [tuple(p.rows) for p in pieces]))
        return real(self, open_shards, idx, pieces, *a)

    monkeypatch.setattr(loop.ShardHarvest, "step", recording)
    code, _, err = run_cli(capsys, monkeypatch, harvest_args(store, data["root"], ckpt, 5))
    assert code == 0, err
    assert sizes == [(0, 5, [(4,)]), (5, 10, [(5,), (6, 7)])]
    assert store_files(store) == want
    assert json.loads((store / "COMPLETE.json").read_text())["n_shards"] == 6


# ------------------------------------------------------------------------------------------ torchrun ranks


def test_sigterm_to_one_torchrun_rank_stops_both_after_the_same_checkpointed_step(tmp_path, synth_store, warm_cli):
    """A signal that reaches one rank only (the agent forwards docker stop's SIGTERM to all, but not at the same
    instant) stops every rank after the same step: the checkpoint holds both ranks' loader positions."""
    import threading

    import psutil
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from clt_pipe.fit import checkpoint as ckpt
    from tests import warmcli

    out = tmp_path / "run"
    args = fit_args(synth_store, out, 150) + ["--shuffle-chunks", "2"]
    warmcli.warm_forkserver()
    t_launch = time.time()
    signalled: list = []

    def signal_one_rank():  # torchrun's agent needs the main thread (it installs signal handlers)
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (metrics.is_file() and metrics.stat().st_size > 0):
            time.sleep(0.01)
        # the ranks: forked from the forkserver, a child of this process, after the launch
        ranks = [p for p in psutil.Process().children(recursive=True) if p.create_time() >= t_launch - 1]
        signalled.extend(ranks)
        if len(ranks) == 2:
            ranks[1].send_signal(signal.SIGTERM)

    thread = threading.Thread(target=signal_one_rank)
    thread.start()
    with pytest.raises(ChildFailedError) as failed:
        warmcli.torchrun(2, args, tmp_path / "logs")
    thread.join(60)
    assert len(signalled) == 2, signalled
    assert {f.exitcode for f in failed.value.failures.values()} == {143}, failed.value.failures
    logs = [p.read_text() for p in (tmp_path / "logs").rglob("stderr.log")]
    lines = [ln for text in logs for ln in text.splitlines() if "fit stopped by SIGTERM after step" in ln]
    assert len(lines) == 2, logs
    steps = {int(ln.split("after step ")[1].split("/")[0]) for ln in lines}
    assert len(steps) == 1, lines  # the same step on both ranks
    step = steps.pop()
    _, state = ckpt.load_latest(out, "cpu")  # what --resume under torchrun continues from
    assert state["step"] == step and len(state["loader"]) == 2
    assert not (out / "clt").exists()


# ------------------------------------------------------------------------------------------ PID 1 (docker stop)

CLONE_NEWPID = 0x20000000


def _as_pid1(args: list[str] | None, pid_file: str) -> None:
    """Run ``clt-pipe ARGS`` (None: a bare sleep with Python's default handlers) as PID 1 of a new PID namespace,
    as the entrypoint of a container is; exit with its status (128 + N for a signal death)."""
    import ctypes

    from tests.warmcli import _run_clt_pipe

    if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWPID) != 0:
        os._exit(99)  # not permitted here
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            if args is None:
                time.sleep(20)
            else:
                _run_clt_pipe(args)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        os._exit(code)
    Path(pid_file).write_text(str(pid))
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def test_sigterm_reaches_a_fit_that_is_pid_1(tmp_path, synth_store):
    """The kernel gives PID 1 of a namespace no default action for SIGTERM: a process without a handler ignores
    ``docker stop`` until SIGKILL. The CLI's explicit handler stops the fit there as anywhere."""
    from tests.warmcli import WarmProcess

    pid_file = tmp_path / "pid"
    control = WarmProcess(_as_pid1, (None, str(pid_file)), tmp_path)
    wait_for(control, pid_file.exists, "the control's start")
    if control.poll() == 99:
        pytest.skip("no permission to create a PID namespace")
    time.sleep(0.3)
    os.kill(int(pid_file.read_text()), signal.SIGTERM)
    time.sleep(1.0)
    assert control.poll() is None  # PID 1 with the default handler: SIGTERM ignored
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    control.wait(30)

    pid_file.unlink()
    out = tmp_path / "run"
    proc = WarmProcess(_as_pid1, (fit_args(synth_store, out, 100000), str(pid_file)), tmp_path)
    metrics = out / "metrics.jsonl"
    wait_for(proc, lambda: pid_file.exists() and metrics.is_file() and metrics.stat().st_size > 0, "a first step")
    os.kill(int(pid_file.read_text()), signal.SIGTERM)
    proc.wait(60)
    assert proc.returncode == 143, proc.stderr()[-2000:]
    assert len(stopped_lines(proc.stderr())) == 1 and "--resume" in proc.stderr()
