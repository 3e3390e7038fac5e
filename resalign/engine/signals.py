"""SIGTERM and SIGHUP stop a run the way Ctrl-C does.

Slurm (preemption, the time limit), ``docker stop``, systemd and a closed terminal stop a job
with SIGTERM or SIGHUP, whose default action ends the process on the spot: no resume command,
a staging folder and a lock left behind, MLflow runs left RUNNING. Here the first such signal
raises :class:`KeyboardInterrupt` in the main thread, as SIGINT does, so every cleanup that
Ctrl-C gets runs (the node's staging folder removed, its lock released, its checkpoints kept,
MLflow runs ended as KILLED, the resume command printed); the process then exits with
128 + the signal's number (143, 129; 130 for Ctrl-C). Further SIGTERM/SIGHUP during that
cleanup are ignored (Slurm signals every process of the job, and may signal again) so the
cleanup is not cut short; SIGKILL is what remains for an impatient scheduler.

A safe point: inside :func:`deferred` (every MLflow client call, a node's commit) the
interrupt waits until the block ends. Raised in the middle of a SQLite transaction it left
the tracking database locked, and the cleanup's own MLflow calls then spent their retries
(~30 s) on it; Ctrl-C gets the same safe points.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_depth = 0  # nesting of deferred() blocks in the main thread
_pending: list[int] = []  # a signal that arrived inside one


def _interrupt(signum: int) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _handler(caught: list[int]) -> Any:
    def handle(signum: int, frame: object) -> None:
        caught.append(signum)
        # a second Ctrl-C is the user insisting; a second SIGTERM is the scheduler repeating
        if len(caught) > 1 and signum != signal.SIGINT:
            return
        if _depth:
            _pending.append(signum)
            return
        _interrupt(signum)

    return handle


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block no stop signal interrupts: one that arrives meanwhile is raised as
    :class:`KeyboardInterrupt` when the block ends (the main thread; elsewhere a no-op)."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and _pending:
            signum = _pending[0]
            _pending.clear()
            _interrupt(signum)


def stop_like_ctrl_c() -> list[int]:
    """Install the handlers for good (a worker process); returns the signals caught."""
    caught: list[int] = []
    for s in STOP_SIGNALS:
        signal.signal(s, _handler(caught))
    return caught


@contextlib.contextmanager
def stopping_on_signals() -> Iterator[list[int]]:
    """The handlers while the block runs (the driver), then the previous ones again; yields
    the signals caught, in order. Outside the main thread (where Python delivers signals)
    it does nothing."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    old = {s: signal.signal(s, _handler(caught)) for s in STOP_SIGNALS}
    try:
        yield caught
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def exit_code(caught: list[int]) -> int:
    """The shell's code for a process ended by the first signal caught (SIGINT if none)."""
    return 128 + (caught[0] if caught else int(signal.SIGINT))
