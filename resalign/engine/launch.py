"""Run one node on several processes under ``torchrun`` (the unlearn node's meta-learning).

The driver side, :func:`run_ranks`, is called by :func:`resalign.engine.worker.execute_task`
(wherever the executor put it: this process, a local worker, a slurm job) after it took the
node's lock and created the staging folder. It writes the task to
``runs/launch/<kind>/<key>/task.json`` (data, see :mod:`.taskfile`) and starts::

    <this python> -m torch.distributed.run --standalone --nproc_per_node N \\
        -m resalign.engine.launch <store> <kind> <key>

Every rank (:func:`rank_main`) loads that task, joins the process group
(:func:`resalign.algorithms.distributed.setup`: NCCL on CUDA, one GPU per local rank, else
gloo), reads the node's inputs from the store and runs the step. Rank 0 runs it with the real
context: it writes the outputs into the staging folder, the metrics, params and checkpoints
under ``runs/state/`` and mirrors metrics to MLflow; the other ranks compute the same thing
with a context that records nothing (their outputs go to a scratch folder that is deleted).
Each rank writes ``runs/launch/<kind>/<key>/rank<r>.json`` (ok, or the error) and its
stdout/stderr to ``rank<r>.log`` there; the folder is removed when the node is committed and
kept after a failure (the error message points at the logs).

Departure from "rank 0 marks the node done": the driver commits the staging folder (fsync,
``DONE``, atomic rename, as for any node) once torchrun exited 0 and rank 0 reported success.
Only the driver knows that *every* rank finished, and it holds the node's lock, so a result
is never committed by a job one of whose ranks failed.

A failure of any rank makes torchrun stop the others and exit non-zero; the driver then
reports which rank failed, its exit code (as torchrun saw it), its error and the tail of its
output. The task file is JSON (:mod:`.taskfile`): nothing a rank reads back from the store
is unpickled, so write access to a shared store does not give a way to run code.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_json, atomic_write_text
from .store import Store, read_json
from .taskfile import dumps_task, loads_task

LAUNCH_DIR = "launch"


def launch_dir(store_root: Path | str, kind: str, key: str) -> Path:
    """``runs/launch/<kind>/<key>/``: the task file and every rank's record and output."""
    return Store(store_root).root / LAUNCH_DIR / kind / key


TASK_FILE = "task.json"
TAIL_LINES = 25
# Variables of an enclosing torchrun/slurm-torchrun job: the nested torchrun must start its
# own standalone group, not join the outer one.
_DIST_ENV = (
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_ERROR_FILE",
)


@dataclass
class RanksOutcome:
    """What the driver learnt from one torchrun job."""

    ok: bool
    returncode: int
    error: str | None = None  # one line: which rank, its exit code, its error
    details: str | None = None  # the failed ranks' output tails and torchrun's
    user_error: bool = False
    log_seconds: float = 0.0


def launch_command(store_root: Path | str, kind: str, key: str, nproc: int) -> list[str]:
    """The torchrun command line for one node: torchrun from this interpreter (never a
    ``torchrun`` found on PATH, which may belong to another environment)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(int(nproc)),
        "-m",
        "resalign.engine.launch",
        str(store_root),
        kind,
        key,
    ]


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    # The ranks must import what this process imports (step modules registered from a path
    # added at run time, e.g. by a test runner), as a spawn-started worker would.
    paths = [p for p in sys.path if p] + env.get("PYTHONPATH", "").split(os.pathsep)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    return env


def _die_with_parent() -> None:
    """In the torchrun child before exec: get SIGTERM when the driver dies (Linux), so a
    ``kill -9`` of the driver does not leave ranks writing into a node another invocation may
    pick up once the lock is free. torchrun stops its ranks on SIGTERM."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop(proc: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    """Stop torchrun and its ranks: SIGTERM (torchrun forwards it), then SIGKILL the group."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _tail(path: Path, n: int = TAIL_LINES) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return "(no output)"
    return "\n".join(lines[-n:]) if lines else "(no output)"


# torchrun's failure summary: "rank      : 1 (local_rank: 1)\n  exitcode  : 7 (pid: 123)"
_SUMMARY = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")


def torchrun_exit_codes(log_text: str) -> tuple[dict[int, int], int | None]:
    """Rank → exit code of the failed ranks in torchrun's failure summary (negative: the
    signal that killed it), and the rank torchrun names as the root cause (first failure)."""
    codes = {int(r): int(c) for r, c in _SUMMARY.findall(log_text)}
    _, _, after = log_text.rpartition("Root Cause")
    first = _SUMMARY.search(after) if after else None
    return codes, int(first.group(1)) if first else None


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exit code unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _outcome(rc: int, d: Path, nproc: int) -> RanksOutcome:
    records = {r: read_json(d / f"rank{r}.json") for r in range(nproc)}
    log_seconds = sum(float(x.get("log_seconds", 0.0)) for x in records.values() if x)
    main = records.get(0)
    if rc == 0 and main and main.get("ok"):
        return RanksOutcome(True, rc, log_seconds=log_seconds)
    log_text = (d / "torchrun.log").read_text(encoding="utf-8", errors="replace") if (
        d / "torchrun.log"
    ).exists() else ""  # fmt: skip
    exits, root = torchrun_exit_codes(log_text)
    failed = {r: x for r, x in records.items() if x and not x.get("ok")}
    # The first failure first (torchrun's root cause, else the earliest error record): the
    # others are mostly its echo (a peer's collective failing on the closed connection).
    ranks = sorted(
        set(failed) | set(exits),
        key=lambda r: (r != root, float((failed.get(r) or {}).get("time", 1e18)), r),
    )
    parts, tails = [], []
    for i, r in enumerate(ranks):
        what = f"({_describe_exit(exits.get(r))})"
        if r in failed:
            parts.append(f"rank {r} {'failed' if i == 0 else 'then'} {what}: {failed[r]['error']}")
        else:  # died without reporting: a signal, os._exit, a crash in native code
            last = _tail(d / f"rank{r}.log", 1)
            parts.append(f"rank {r} {'died' if i == 0 else 'then'} {what}, last output: {last}")
        tails.append(f"--- rank {r} of {nproc}, last lines of {d / f'rank{r}.log'} ---")
        tails.append(_tail(d / f"rank{r}.log"))
    if not parts:
        parts.append("no rank reported a result")
    tails.append(f"--- torchrun, last lines of {d / 'torchrun.log'} ---")
    tails.append(_tail(d / "torchrun.log"))
    user = bool(failed) and all(x.get("user_error") for x in failed.values())
    if user:
        error = str(failed[next(r for r in ranks if r in failed)].get("error"))
    else:
        error = f"torchrun with {nproc} processes exited with code {rc}: " + "; ".join(parts)
    return RanksOutcome(
        False,
        rc,
        error=error,
        details="\n".join(tails) + "\n",
        user_error=user,
        log_seconds=log_seconds,
    )


def run_ranks(
    task: Any,
    staging: Path,
    *,
    on_poll: Callable[[], None] | None = None,
    poll_seconds: float = 1.0,
) -> RanksOutcome:
    """Run ``task`` (a :class:`~resalign.engine.executors.base.NodeTask`) on
    ``task.nproc_per_node`` torchrun ranks (rank 0 writes into ``staging`` and the node's
    state folder); wait for them.

    ``on_poll`` is called about every ``poll_seconds`` while the ranks run (the driver shows
    the logged steps). An exception here (Ctrl-C) stops torchrun and its ranks first.
    """
    node = task.node
    d = launch_dir(task.store_root, node.kind, node.key)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    atomic_write_text(d / TASK_FILE, dumps_task(task, staging))
    cmd = launch_command(task.store_root, node.kind, node.key, task.nproc_per_node)
    with open(d / "torchrun.log", "wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_child_env(),
            start_new_session=True,  # Ctrl-C reaches the driver, which stops the job in order
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        try:
            while True:
                try:
                    rc = proc.wait(timeout=poll_seconds)
                    break
                except subprocess.TimeoutExpired:
                    if on_poll is not None:
                        on_poll()
        except BaseException:
            _stop(proc)
            raise
    if on_poll is not None:
        on_poll()
    return _outcome(rc, d, int(task.nproc_per_node))


# -- the rank side ---------------------------------------------------------------------------


def _redirect_output(path: Path) -> None:
    """Point this process's fds 1 and 2 (Python and native code alike) at ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _follower_context(**kw: Any) -> Any:
    """A context for ranks other than 0: the same inputs and resume state, but it writes
    nothing shared (metrics, params, checkpoints are rank 0's) and outputs go to scratch."""
    from .context import NodeContext

    class FollowerContext(NodeContext):
        def _declare(self, keep_through: int | None, *, infer: bool = False) -> None:
            self._resume_declared = True
            self._resumed_step = None if infer else keep_through

        def log_metrics(self, metrics: Any, step: int | None = None) -> None:
            if not self._resume_declared:
                self._declare(int(step or 0) - 1, infer=True)

        def log_params(self, params: Any) -> None:
            pass

        def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
            pass

        def sync_metrics(self) -> None:
            pass

        def save_checkpoint(self, state: Any, step: int) -> None:
            pass

    return FollowerContext(**kw)


def rank_main(argv: list[str]) -> int:
    """Entry point of one torchrun rank: ``<store> <kind> <key>``. Returns the exit code."""
    from ..algorithms import distributed
    from ..errors import UserError
    from ..models.device import resolve_device
    from .progress import ProgressUI

    store_root, kind, key = argv
    state = Store(store_root).state_dir(kind, key)
    d = launch_dir(store_root, kind, key)
    rank = int(os.environ.get("RANK", "0"))
    _redirect_output(d / f"rank{rank}.log")
    record: dict[str, Any] = {"rank": rank, "ok": False}
    logger = None
    code = 1
    try:
        task, staging = loads_task((d / TASK_FILE).read_text(encoding="utf-8"))
        importlib.import_module(task.step_module)
        from ..steps.base import STEPS

        dctx = distributed.setup()
        device = resolve_device(task.device)
        if device == "cuda" or (device.startswith("cuda") and dctx.distributed):
            device = f"cuda:{dctx.local_rank}"
        kw: dict[str, Any] = {
            "node": task.node,
            "inputs": {k: Path(v) for k, v in task.inputs.items()},
            "state": state,
            "device": device,
            "checkpoint_every": task.checkpoint_every,
            "ui": ProgressUI(enabled=False),
        }
        if dctx.is_main:
            from .context import NodeContext

            if task.tracking is not None:
                from .tracking import NodeLogger

                logger = NodeLogger(task.tracking, state / "metrics.jsonl")
                logger.start_system_metrics()
            ctx = NodeContext(out=staging, logger=logger, **kw)
        else:
            scratch = d / f"rank{rank}.out"
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir()
            ctx = _follower_context(out=scratch, **kw)
        try:
            STEPS[task.node.kind]().run(ctx)
        finally:
            ctx.close()
            if logger is not None:
                logger.flush()
                logger.stop_system_metrics()
        if not dctx.is_main:
            shutil.rmtree(d / f"rank{rank}.out", ignore_errors=True)
        record.update(ok=True, world_size=dctx.world_size)
        code = 0
    except BaseException as e:  # noqa: BLE001 - every failure must reach the driver
        traceback.print_exc()
        user = isinstance(e, UserError)
        record.update(
            error=e.render() if user else f"{type(e).__name__}: {e}",
            user_error=user,
            time=time.time(),
        )
        if isinstance(e, SystemExit) and isinstance(e.code, int) and e.code:
            code = e.code
    record["log_seconds"] = logger.log_seconds if logger is not None else 0.0
    atomic_write_json(d / f"rank{rank}.json", record)
    sys.stdout.flush()
    sys.stderr.flush()
    if code == 0:
        distributed.teardown()
    return code


if __name__ == "__main__":
    sys.exit(rank_main(sys.argv[1:]))
