"""The worker side of the engine: execute one node and commit its result.

:func:`execute_task` runs wherever the executor put it (the driver's process, a local worker,
a slurm job): it takes the node's lock, re-checks the cache (another invocation may have
finished the node meanwhile), creates the staging folder, runs the step (in this process, or
on torchrun ranks through :mod:`.launch`), and commits (:meth:`.store.Store.commit`). It never
imports the driver (:mod:`.runner`), so the executors and the launcher depend on it alone.

A node that cannot write (full disk, read-only store) fails with a :class:`~resalign.errors.
UserError` naming the path, the free space and how much the node needs, and leaves no staging
folder behind; its resume state stays, so the same command continues once space is freed.
"""

from __future__ import annotations

import errno
import importlib
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..graph.keys import step_version
from ..graph.nodes import LOCATION_FIELDS, Node
from ..steps.base import STEPS
from .cost import CostMeter
from .executors.base import NodeResult, NodeTask
from .progress import ProgressUI
from .store import (
    REHASH_BELOW,
    WRITE_ERRNOS,
    ManifestError,
    Store,
    atomic_write_json,
    atomic_write_text,
    free_bytes,
    tree_bytes,
)


def resolve_device(device: str) -> str:
    """``auto`` → cuda / mps / cpu; an explicit device that is missing is a UserError."""
    from ..models.device import resolve_device as resolve

    return resolve(device)


def execute_task(task: NodeTask, ui: ProgressUI | None = None) -> NodeResult:
    """Execute one node (in whatever process the executor chose) and commit its result."""
    importlib.import_module(task.step_module)
    node = task.node
    t0 = time.perf_counter()
    store = Store(task.store_root)
    ui = ui or ProgressUI(enabled=False, verbose=task.verbose)
    staging: Path | None = None
    try:
        with store.lock(node.kind, node.key, on_wait=lambda: ui.line(f"waiting for {node.name}")):
            # done meanwhile by another invocation (re-hashed like an upstream: a node the
            # driver found damaged behind its size and mtime is not "done")
            if (
                not task.fresh
                and store.has_done(node.kind, node.key)
                and store.check(node.kind, node.key, rehash_below=REHASH_BELOW) is None
            ):
                if task.tracking is not None:
                    from .tracking import NodeLogger

                    NodeLogger(task.tracking, Path("/dev/null")).finish_elsewhere(
                        store.node_dir(node.kind, node.key)
                    )
                return NodeResult(node.name, True, already_done=True)
            try:  # what it reads, as it is now (the manifest's provenance, store.py)
                provenance = {"inputs": store.inputs_record(task.inputs)}
            except ManifestError as e:
                err = UserError(
                    f"{e}; {node.name} did not run",
                    hint="run the same command again: the damaged node is recomputed first",
                )
                return NodeResult(node.name, False, error=err.render(), user_error=True)
            if task.fresh:
                store.discard_state(node.kind, node.key)
            staging = store.new_staging(node.kind, node.key)
            atomic_write_json(
                staging / "node.json",
                {
                    "kind": node.kind,
                    "name": node.name,
                    "key": node.key,
                    "params": node.params,
                    "deps": dict(node.deps),
                    "inputs": task.inputs,
                    "version": step_version(node.kind),
                    # where the node sits in the study (the report's rows and columns), so a
                    # reader of the store never parses it out of the name
                    **{f: getattr(node, f) for f in LOCATION_FIELDS},
                },
            )
            state = store.state_dir(node.kind, node.key)
            state.mkdir(parents=True, exist_ok=True)
            if task.nproc_per_node > 1:
                return _execute_ranks(task, store, staging, state, ui, t0, provenance)
            return _execute_here(task, store, staging, state, ui, t0, provenance)
    except KeyboardInterrupt:
        if staging is not None:  # stopped before the step took charge of its staging folder
            shutil.rmtree(staging, ignore_errors=True)
        raise
    except Exception as e:  # the engine's own writes (lock, staging, commit) failed
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        err = e if isinstance(e, UserError) else write_failure(e, store, node, staging)
        if err is None:
            raise
        return NodeResult(node.name, False, error=err.render(), user_error=True,
                          seconds=time.perf_counter() - t0)  # fmt: skip


def _execute_here(
    task: NodeTask,
    store: Store,
    staging: Path,
    state: Path,
    ui: ProgressUI,
    t0: float,
    extra: dict[str, Any] | None = None,
) -> NodeResult:
    from .context import NodeContext
    from .tracking import NodeLogger

    node = task.node
    logger = NodeLogger(task.tracking, state / "metrics.jsonl") if task.tracking else None
    if logger is not None:
        logger.start_system_metrics()
    ctx = NodeContext(
        node=node,
        inputs={k: Path(v) for k, v in task.inputs.items()},
        out=staging,
        state=state,
        device=resolve_device(task.device),
        checkpoint_every=task.checkpoint_every,
        logger=logger,
        ui=ui,
    )
    step = STEPS[node.kind]()
    meter = CostMeter(ctx.device)
    try:
        step.run(ctx)
        ctx.close()
        commit(
            store, node, staging, ctx.metrics_path, logger, {**(extra or {}), "cost": meter.read()}
        )
    except BaseException as e:
        try:
            ctx.close()
        except OSError:
            pass  # the disk that failed the step may fail the metrics fsync too
        interrupted = not isinstance(e, Exception)
        if logger is not None:
            logger.finish("KILLED" if interrupted else "FAILED", ctx.metrics_path, None)
        # before the staging folder goes: how far the node got, how full the disk is
        disk = None if interrupted else write_failure(e, store, node, staging)
        shutil.rmtree(staging, ignore_errors=True)
        if interrupted:
            raise
        user = isinstance(e, UserError) or disk is not None
        return NodeResult(
            node.name,
            False,
            error=(disk or e).render() if user else f"{type(e).__name__}: {e}",  # type: ignore[union-attr]
            details=None if user else traceback.format_exc(),
            user_error=user,
            error_type=type(disk or e).__name__,
            seconds=time.perf_counter() - t0,
            log_seconds=logger.log_seconds if logger else 0.0,
        )
    return NodeResult(
        node.name,
        True,
        seconds=time.perf_counter() - t0,
        log_seconds=logger.log_seconds if logger else 0.0,
    )


def commit(
    store: Store,
    node: Node,
    staging: Path,
    metrics: Path,
    logger: Any,
    extra: dict[str, Any] | None = None,
) -> None:
    """Copy the metrics history into ``staging`` and commit it as ``node``'s result, with
    the optional manifest keys in ``extra`` (see :mod:`.store`)."""
    atomic_write_text(
        staging / "metrics.jsonl", metrics.read_text(encoding="utf-8") if metrics.exists() else ""
    )
    final = store.commit(staging, node.kind, node.key, extra)
    store.discard_state(node.kind, node.key)
    if logger is not None:
        logger.finish("FINISHED", final / "metrics.jsonl", final)


# -- a full or read-only disk ----------------------------------------------------------------


def _os_error(e: BaseException) -> OSError | None:
    """The first OSError with a write errno in ``e``'s chain (cause, context)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in WRITE_ERRNOS:
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def write_failure(
    e: BaseException,
    store: Store,
    node: Node,
    staging: Path | None,
) -> UserError | None:
    """A clear error when ``e`` came from a full or read-only disk, else None.

    Libraries report a full disk in their own words (safetensors and ``torch.save`` raise
    their own errors, not ``OSError``): an error while the store's filesystem has less than
    1 MiB free counts as a full disk too.
    """
    if isinstance(e, UserError):
        return None
    ose = _os_error(e)
    free = free_bytes(store.root)
    full = (ose is not None and ose.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)) or (
        ose is None and free is not None and free < 2**20
    )
    if ose is None and not full:
        return None
    path = (ose.filename if ose is not None else None) or staging or store.root
    state = store.state_dir(node.kind, node.key)
    resume = "then run the same command again" + (
        f": {node.name} resumes from its checkpoints in {state}"
        if store.has_state(node.kind, node.key)
        else ""
    )
    if not full:
        what = ose.strerror if ose is not None and ose.strerror else "not writable"
        return UserError(
            f"cannot write {path}: {what}; nothing of the node was kept",
            hint=f"make the store writable (or pass --store with a writable folder), {resume}",
        )
    done = (tree_bytes(staging) if staging else 0) + tree_bytes(state)
    # the space a completed node of this kind took (the largest in this store), as a guide
    sizes = [tree_bytes(d) for _k, _key, d in store.node_dirs() if _k == node.kind]
    typical = max(sizes, default=0)
    need = (
        f"a completed {node.kind} node in this store takes {_mib(typical)}; "
        f"this one had written {_mib(done)} when the disk filled up, so it needs at least "
        f"{_mib(max(typical - done, 0) + 2**20)} more"
        if typical
        else f"this node had written {_mib(done)} when the disk filled up and needs more than that"
    )
    return UserError(
        f"no space left on device writing {path} ({_mib(free or 0)} free on the store's "
        f"filesystem); {need}; nothing of the node was kept",
        hint=f"free space on {store.root}'s filesystem (or pass --store elsewhere), {resume}",
    )


# -- torchrun ------------------------------------------------------------------------------


def _execute_ranks(
    task: NodeTask,
    store: Store,
    staging: Path,
    state: Path,
    ui: ProgressUI,
    t0: float,
    extra: dict[str, Any] | None = None,
) -> NodeResult:
    """The node on ``task.nproc_per_node`` torchrun ranks (see :mod:`.launch`), called with
    the node's lock held. Rank 0 writes the outputs into ``staging``; this process commits."""
    from .launch import launch_dir, run_ranks
    from .tracking import NodeLogger, _read_tail

    node, n = task.node, int(task.nproc_per_node)
    metrics = state / "metrics.jsonl"
    device = resolve_device(task.device)
    if device.startswith("cuda"):
        import torch

        if torch.cuda.device_count() < n:
            shutil.rmtree(staging, ignore_errors=True)
            err = UserError(
                f"{node.name} is to run on {n} processes, one GPU each, but "
                f"{torch.cuda.device_count()} GPU(s) are visible",
                where="--nproc-per-node / execution.nproc_per_node",
                hint="use at most as many processes as GPUs (CUDA_VISIBLE_DEVICES), or run on cpu",
            )
            return NodeResult(node.name, False, error=err.render(), user_error=True)
    ui.line(
        f"     {node.name}: {n} processes (torchrun, {'nccl' if device.startswith('cuda') else 'gloo'})"
    )
    offset = 0

    def show_steps() -> None:
        # --verbose: the step lines rank 0 logs (its own console is its log file)
        nonlocal offset
        if not ui.verbose:
            return
        if metrics.exists() and metrics.stat().st_size < offset:
            offset = 0  # rank 0 truncated the history on resume
        records, offset = _read_tail(metrics, offset)
        for r in records:
            ui.step_line(node.name, r.get("step"), {k: v for k, v in r.items() if k != "step"})

    meter = CostMeter(device, children=True)
    try:
        out = run_ranks(task, staging, on_poll=show_steps)
    except BaseException:
        if task.tracking is not None:
            NodeLogger(task.tracking, metrics).finish("KILLED", metrics, None)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # Created after the ranks exit: it continues from the sync record rank 0's logger left.
    logger = NodeLogger(task.tracking, metrics) if task.tracking is not None else None
    if not out.ok:
        if logger is not None:
            logger.finish("FAILED", metrics, None)
        shutil.rmtree(staging, ignore_errors=True)
        return NodeResult(
            node.name,
            False,
            error=out.error,
            details=None if out.user_error else out.details,
            user_error=out.user_error,
            seconds=time.perf_counter() - t0,
            log_seconds=out.log_seconds + (logger.log_seconds if logger else 0.0),
        )
    commit(store, node, staging, metrics, logger, {**(extra or {}), "cost": meter.read()})
    shutil.rmtree(launch_dir(store.root, node.kind, node.key), ignore_errors=True)
    return NodeResult(
        node.name,
        True,
        seconds=time.perf_counter() - t0,
        log_seconds=out.log_seconds + (logger.log_seconds if logger else 0.0),
        extra={"processes": n},
    )
