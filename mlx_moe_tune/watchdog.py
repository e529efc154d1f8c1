"""A per-config time limit (`--config-timeout`) for the sweep and the tuner.

A kernel config that hangs (a deadlocked barrier, a compiler that never returns) must cost one
row, not the run. Two stages:

1. Soft: SIGALRM at the limit raises `ConfigTimeout` in the main thread, which the caller
   records like any failure (`failed: ConfigTimeout: ...` in the sweep, `error` in the tuner's
   cache) and goes on. This works whenever the hung code returns to Python now and then (a
   Python loop, a sleep, a subprocess wait).
2. Hard: code stuck in C (a GPU sync that never returns, a signal-blocked loop) never sees the
   signal. A grace period later a watchdog thread records the timeout itself (`on_hang`) and,
   when this process is the command line's own, replaces the process with the same command
   (`os.execv`, plus `--resume` for the sweep): the recorded timeout makes the new process skip
   that config and the run goes on. Elsewhere (a library call, a notebook) it only warns.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Callable, Iterator, Sequence

from .safeio import warn

DEFAULT_TIMEOUT_S = 600.0  # one config: compile + verify + time (a GPU point takes seconds)
RESTART_ENV = "MLX_MOE_TUNE_RESTARTS"
MAX_RESTARTS = 50


class ConfigTimeout(Exception):
    """A config ran past --config-timeout."""


def grace_s(seconds: float) -> float:
    """How long after the limit the hard stage steps in."""
    return min(30.0, max(2.0, 0.25 * seconds))


def parse_timeout(value) -> float | None:
    """--config-timeout: seconds > 0, or 0 / 'none' for no limit."""
    if value is None:
        return DEFAULT_TIMEOUT_S
    s = str(value).strip().lower().rstrip("s")
    if s in ("0", "none", "off", ""):
        return None
    try:
        v = float(s)
    except ValueError:
        v = float("nan")
    if not (v > 0 and v < float("inf")):
        raise ValueError(f"--config-timeout {value!r}: expected seconds > 0 (e.g. 600 or 600s), or 0 for no limit")
    return v


class Watchdog:
    """Arms a time limit around one measurement (`with dog.limit("tuned.qmm BM16 m=4"): ...`).
    `seconds=None`: no limit. `restart_argv`: the command line to exec on a hard hang (None:
    only warn)."""

    def __init__(self, seconds: float | None, restart_argv: Sequence[str] | None = None):
        self.seconds = seconds
        self.restart_argv = list(restart_argv) if restart_argv else None
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def limit(self, what: str, on_hang: Callable[[], None] | None = None) -> Iterator[None]:
        if not self.seconds:
            yield
            return
        seconds = float(self.seconds)
        msg = f"{what}: no result after {seconds:g} s (--config-timeout)"
        state = {"armed": True, "hung": False}
        soft = threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGALRM")
        old_handler = None
        if soft:
            def on_alarm(signum, frame):
                if state["armed"]:
                    state["armed"] = False
                    raise ConfigTimeout(msg)

            old_handler = signal.signal(signal.SIGALRM, on_alarm)
            old_left = signal.setitimer(signal.ITIMER_REAL, seconds)[0]  # someone else's alarm (kept)
            t_armed = time.monotonic()

        def hard():
            with self._lock:
                if state.get("done"):
                    return
                state["hung"] = True
            self._hang(msg, on_hang)

        timer = threading.Timer(seconds + grace_s(seconds), hard)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            with self._lock:
                state["armed"] = False
                state["done"] = True
                timer.cancel()
                hung = state["hung"]
            if soft:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old_handler if old_handler is not None else signal.SIG_DFL)
                if old_left > 0:  # give the previous owner of SIGALRM its alarm back
                    signal.setitimer(signal.ITIMER_REAL, max(old_left - (time.monotonic() - t_armed), 1e-3))
            if hung and self.restart_argv is not None:
                while True:  # the watchdog thread is replacing this process
                    time.sleep(1)

    def _hang(self, msg: str, on_hang) -> None:
        restarts = int(os.environ.get(RESTART_ENV, "0") or 0)
        if self.restart_argv is None or restarts >= MAX_RESTARTS:
            why = "not the command line's own process" if self.restart_argv is None else f"{restarts} restarts already"
            warn(f"{msg}; still stuck {grace_s(self.seconds):g} s later and cannot restart ({why}): "
                 "kill it and rerun (with --resume for a sweep) to skip past it")
            return
        try:
            if on_hang is not None:
                on_hang()
        except Exception as e:  # noqa: BLE001 (the restart matters more than the record)
            warn(f"could not record the timeout: {type(e).__name__}: {e}")
        warn(f"{msg}; stuck in native code: recorded it and restarting the run past it")
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.environ[RESTART_ENV] = str(restarts + 1)
        if hasattr(signal, "pthread_sigmask"):  # exec keeps the signal mask: start the new run clean
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
        os.execv(sys.executable, [sys.executable, *self.restart_argv[1:]])
