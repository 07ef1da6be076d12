"""``clt-pipe`` in a real child process that starts warm.

Tests that SIGKILL a harvest, or race two of them, need separate processes, and a fresh interpreter spends
about 5 s importing torch and open_clip before it reads its first image. Children here are forked from one
``multiprocessing`` forkserver that imported the pipeline once, and each runs ``clt_pipe`` as ``python -m
clt_pipe`` does. A forkserver, not a plain fork of the caller: the server never ran a torch op, so no
OpenMP thread pool is copied into a child (forking a process that has run one hangs the child's first
parallel op) and no zarr or fsspec event loop thread is half-copied.

The server is one per calling process and is shared with dask: a ``LocalCluster`` started while
``distributed.worker.multiprocessing-method`` is "forkserver" forks its workers from it too.

A child exits through ``os._exit`` after its threads finish, like every multiprocessing child: plain
``atexit`` hooks do not run there, as they would in a console process.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import signal
import sys
import tempfile
import threading
from pathlib import Path

# What the server imports before it forks anything: the CLI, both harvest paths, the tiny CLIP's trainer
# and dask's worker.
PRELOAD = ("clt_pipe.cli", "clt_pipe.harvest.run", "clt_pipe.harvest.dask", "clt_pipe.demo.tinyclip",
           "distributed")


_start_lock = threading.Lock()
_started = False


def warm_forkserver() -> multiprocessing.context.BaseContext:
    """Start the forkserver now if it is not running; it imports ``PRELOAD`` in the background, and the first
    child waits for that. Returns the forkserver context."""
    global _started
    ctx = multiprocessing.get_context("forkserver")
    with _start_lock:  # the fd swap below must happen once, not interleaved between two threads
        if not _started:
            ctx.set_forkserver_preload(list(PRELOAD))
            # The server would inherit this process's stdout and stderr and hold them open until it exits,
            # ~2 s after the caller (finalising torch and open_clip): a shell pipe on the test run waited for
            # it. Its children send their output to files of their own.
            saved = [os.dup(1), os.dup(2)]
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
                multiprocessing.forkserver.ensure_running()
            finally:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                for fd in (*saved, devnull):
                    os.close(fd)
            _started = True
    return ctx


def _child_main(target, args: tuple, env: dict[str, str] | None, stdout_path: str, stderr_path: str) -> None:
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    target(*args)


def _run_clt_pipe(args: list[str]) -> None:
    # A forkserver child starts with "forkserver" as its start method, under which every multiprocessing lock
    # (numcodecs' blosc mutex is one) registers with the parent's resource tracker and is reported as leaked
    # when the child is SIGKILLed. A console process has the platform default.
    multiprocessing.set_start_method(None, force=True)
    sys.argv = ["clt-pipe", *args]
    runpy.run_module("clt_pipe", run_name="__main__", alter_sys=True)  # its SystemExit is the exit code


class WarmProcess:
    """``target(*args)`` running in a warm child; ``poll``/``wait``/``returncode`` read like
    ``subprocess.Popen`` (a signal death is the negative signal number), stdout and stderr go to files under
    ``log_dir``."""

    def __init__(self, target, args: tuple, log_dir: Path, env: dict[str, str] | None = None):
        fd, self._stdout = tempfile.mkstemp(prefix="warm-", suffix=".out", dir=log_dir)
        os.close(fd)
        fd, self._stderr = tempfile.mkstemp(prefix="warm-", suffix=".err", dir=log_dir)
        os.close(fd)
        self.process = warm_forkserver().Process(target=_child_main, daemon=False,
                                                 args=(target, tuple(args), env, self._stdout, self._stderr))
        self.process.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise TimeoutError(f"warm child {self.pid} still running after {timeout} s")
        return self.process.exitcode

    def kill(self) -> None:
        if self.process.exitcode is None:
            os.kill(self.pid, signal.SIGKILL)

    def stdout(self) -> str:
        return Path(self._stdout).read_text()

    def stderr(self) -> str:
        return Path(self._stderr).read_text()


def start_cli(args: list[str], log_dir: Path, env: dict[str, str] | None = None) -> WarmProcess:
    """Start ``clt-pipe ARGS`` in a warm child, as ``python -m clt_pipe ARGS`` would run."""
    return WarmProcess(_run_clt_pipe, (list(args),), Path(log_dir), env)


def _train_tiny_clip(out_dir: str, epochs: int, progress_file: str) -> None:
    from clt_pipe.demo import tinyclip as tc

    tc.TRAIN_THREADS = 1  # beside the test process on a 2-core machine; the thread count is in the meta
    calls: list = []
    tc.train_tiny_clip(Path(out_dir), seed=0, epochs=epochs, progress=lambda *a: calls.append(list(a)))
    Path(progress_file).write_text(json.dumps(calls))


def start_tiny_clip_training(out_dir: Path, epochs: int) -> WarmProcess:
    """``tinyclip.train_tiny_clip(out_dir, seed=0, epochs)`` on one thread in a warm child, so that a test
    session trains the tiny CLIP on the other core while its first tests run; the progress calls land in
    ``out_dir/../progress.json``."""
    out_dir = Path(out_dir)
    return WarmProcess(_train_tiny_clip, (str(out_dir), epochs, str(out_dir.parent / "progress.json")),
                       out_dir.parent)


def _rank_main(args: list[str], threads: int) -> int:
    import torch

    torch.set_num_threads(threads)  # what OMP_NUM_THREADS does for a rank that starts cold
    try:
        _run_clt_pipe(args)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    return 0


def torchrun(nproc: int, args: list[str], log_dir: Path, threads: int = 1) -> dict[int, int]:
    """``torchrun --standalone --nproc-per-node NPROC -m clt_pipe ARGS`` through torchrun's own launcher,
    ``elastic_launch``: the same agent, c10d rendezvous and rank environment (RANK, LOCAL_RANK, WORLD_SIZE,
    MASTER_ADDR/PORT, TORCHELASTIC_*), with the ranks forked warm from the forkserver instead of each
    importing torch and the pipeline. The ranks' output goes to files under ``log_dir``. Returns each rank's
    result (0); a failed rank raises ChildFailedError with its traceback."""
    import uuid

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    warm_forkserver()
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                       rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.05,
                       start_method="forkserver", logs_specs=DefaultLogsSpecs(str(log_dir), redirects=Std.ALL))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)}
    try:
        return elastic_launch(cfg, _rank_main)(list(args), threads)
    finally:  # the agent installs its own handlers in this process
        for s, h in handlers.items():
            signal.signal(s, h)
