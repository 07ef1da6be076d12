"""Graceful stop on SIGTERM and SIGINT (``docker stop``, preemption, Ctrl-C).

The CLI installs explicit handlers for both signals for the whole command (``handling``): a process that is
PID 1 in a container gets no default action for SIGTERM, so without a handler ``docker stop`` would wait its
grace period and SIGKILL. The first signal asks the command to stop:

- inside a ``stop_point`` block (the harvest loop, the fit loop) it only sets a flag; the loop finishes what
  it can keep (the forward batch in flight and the shards it completes; the current step and its checkpoint),
  then raises ``Stopped`` with a line saying what was kept and how to resume;
- anywhere else (start-up, analyze, a dask client waiting for its workers) ``Stopped`` is raised at once in
  the main thread, as KeyboardInterrupt would be: everything the stages write is atomic (commits, checkpoints,
  reports), so unwinding keeps whatever was committed.

A second signal (ECHO_S or more after the first) ends the process at once (``os._exit``): nothing more is
committed, and nothing committed is lost. The exit status is the shell's convention, 128 + the signal number:
143 for SIGTERM, 130 for SIGINT.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """The command was asked to stop by a signal. A BaseException, like KeyboardInterrupt: ``except Exception``
    handlers must not swallow it. ``message`` says what was kept and how to resume (empty: not known here; a
    caller further up adds it)."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or signal_name(signum))
        self.signum = signum
        self.message = message

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class _State:
    def __init__(self):
        self.requested: int | None = None  # the first signal's number
        self.at: float | None = None  # time.monotonic() of the first signal
        self.stop_points = 0  # >0: inside a loop that checks ``requested`` itself


_state = _State()


def requested() -> int | None:
    """The signal that asked this process to stop, or None."""
    return _state.requested


def seconds_since_request() -> float:
    return 0.0 if _state.at is None else time.monotonic() - _state.at


def _write_stderr(text: str) -> None:
    try:
        os.write(2, text.encode())
    except OSError:
        pass


# A second signal this soon after the first is the same stop fanned out, not a second request: Ctrl-C reaches
# every process of the terminal's group, and torchrun's agent then also sends SIGTERM to its ranks.
ECHO_S = 1.0


def _handler(signum: int, frame) -> None:
    if _state.requested is not None:
        if seconds_since_request() < ECHO_S:
            return
        _write_stderr(f"{signal_name(signum)} again: exiting now; what was committed before is kept\n")
        os._exit(128 + signum)
    _state.requested, _state.at = signum, time.monotonic()
    if _state.stop_points:
        _write_stderr(f"{signal_name(signum)}: stopping after the work in flight is saved (signal again to exit "
                      f"at once)\n")
        return
    raise Stopped(signum)


def exit_now(code: int) -> None:
    """Exit a stopped command: at once (``os._exit`` after flushing stdout and stderr) when a signal stopped it,
    since what it keeps is already committed and the interpreter's teardown (collecting the millions of objects
    torch and open_clip leave) took 20-36 s on a loaded 2-core machine, longer than the stop itself; through
    SystemExit otherwise (a caller in the same process, e.g. a test, gets the exception)."""
    if _state.requested is None:
        raise SystemExit(code)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def request(signum: int) -> None:
    """As if ``signum`` had arrived (tests, and ranks that learn of a stop from another rank)."""
    if _state.requested is None:
        _state.requested, _state.at = signum, time.monotonic()


@contextlib.contextmanager
def handling():
    """Explicit SIGTERM and SIGINT handlers for the duration of a command (main thread only; elsewhere the
    previous handling stays). The previous handlers come back after; a request is forgotten at the next start."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    _state.requested, _state.at, _state.stop_points = None, None, 0
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        _state.stop_points = 0  # ``requested`` stays: the caller's exit reads it (exit_now)


class stop_point:
    """A block whose code polls ``requested()`` and stops at a point where its work is saved: a signal inside it
    sets the flag instead of raising. The code after the block decides what a request still pending means (a
    fit whose last step was running has finished: it exits 0). A context manager, or ``enter()`` ... ``exit()``
    where a ``with`` would re-indent a loop."""

    def enter(self) -> "stop_point":
        _state.stop_points += 1
        return self

    def exit(self) -> None:
        _state.stop_points = max(0, _state.stop_points - 1)

    def __enter__(self) -> "stop_point":
        return self.enter()

    def __exit__(self, *exc) -> None:
        self.exit()
