"""The driver: run a compiled graph, caching by key, resuming from checkpoints, logging to
MLflow.

``run_graph`` asks :mod:`.plan` what is cached, then hands every node that must run (in
dependency order, longest chain first) to an executor, which calls the worker side
(:func:`.worker.execute_task`) wherever it runs nodes. A node's result counts only once
committed (see :mod:`.store`); a killed node leaves its checkpoints in ``runs/state/`` and
running the same command again continues from them. When a run fails the last line printed
is the exact command that resumes it.
"""

from __future__ import annotations

import functools
import shlex
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any, ParamSpec

from ..errors import UserError
from ..graph.nodes import Graph, Node
from ..steps.base import STEPS
from .estimate import history
from .executors.base import Executor, NodeResult, NodeTask
from .options import RunOptions
from .pace import Remaining
from .plan import (  # noqa: F401  (plan_status, NodeStatus: re-exported for callers)
    FORCED,
    NodeStatus,
    forced_names,
    index_entry,
    load_steps,
    plan_status,
    recheck_reads,
)
from .progress import ProgressUI
from .signals import exit_code as signal_exit_code
from .signals import stopping_on_signals
from .store import Store, unwritable_reason

P = ParamSpec("P")


class RunFailed(Exception):
    """Some node failed; the driver has printed why and the command that resumes."""

    exit_code = 1

    def __init__(
        self,
        failed: Sequence[str],
        resume_command: str,
        interrupted: bool = False,
        user_error: bool = False,
        results: Mapping[str, NodeResult] | None = None,
    ):
        super().__init__(f"failed: {', '.join(failed)}")
        self.failed = list(failed)
        self.results = dict(results or {})  # failed node name -> its result
        self.resume_command = resume_command
        self.interrupted = interrupted
        # Exit 2 when every failure was the user's to fix (bad data found mid-run), as for a
        # bad spec; 1 for a crash; 130 for Ctrl-C.
        self.exit_code = 130 if interrupted else 2 if user_error else 1


@dataclass
class RunSummary:
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    # completed by another invocation while this one waited for the node's lock
    done_elsewhere: list[str] = field(default_factory=list)
    seconds: float = 0.0
    log_seconds: float = 0.0
    parent_run_id: str | None = None
    tracking_uri: str | None = None
    node_seconds: dict[str, float] = field(default_factory=dict)


# -- the driver ----------------------------------------------------------------------------


# Rough relative cost of one node of each kind on the demo scale; only the ORDER of ready
# nodes depends on it, never what runs or what a node computes.
_KIND_COST = {"model": 20.0, "unlearn": 20.0, "harvest": 5.0, "attack": 3.0, "evaluate": 1.0}


def critical_path_order(graph: Graph, nodes: Sequence[Node]) -> list[Node]:
    """``nodes`` with the longest remaining chain of work first (ties: graph order).

    With several workers the engine starts whatever is ready in this order, so the slow chain
    (e.g. ResAlign unlearning, then its attacks and evaluations) starts before cheap side
    branches instead of after them. The order is a topological order when every node's cost
    is positive, as it is here.
    """
    children: dict[str, list[str]] = {n.name: [] for n in graph}
    for n in graph:
        for d in n.deps.values():
            children.setdefault(d, []).append(n.name)
    chain: dict[str, float] = {}
    for n in reversed(list(graph)):
        below = max((chain[c] for c in children.get(n.name, []) if c in chain), default=0.0)
        chain[n.name] = _KIND_COST.get(n.kind, 1.0) + below
    position = {n.name: i for i, n in enumerate(graph)}
    return sorted(nodes, key=lambda n: (-chain[n.name], position[n.name]))


def resume_command(command: Sequence[str] | None, pending_forced: Iterable[str]) -> str:
    """``command`` (the invocation without its --force options) plus --force for the forced
    nodes that had not started: re-forcing a node that was interrupted would throw away the
    checkpoints it is meant to resume from."""
    cmd = list(command or ["resalign", "run", "SPEC"])
    for n in sorted(pending_forced):
        cmd += ["--force", n]
    return shlex.join(cmd)


def _stops_on_signals(fn: Callable[P, RunSummary]) -> Callable[P, RunSummary]:
    """SIGTERM and SIGHUP stop ``fn`` as Ctrl-C does (:mod:`.signals`); the run exits with
    128 + the signal's number."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> RunSummary:
        with stopping_on_signals() as caught:
            try:
                return fn(*args, **kwargs)
            except RunFailed as e:
                if e.interrupted:
                    e.exit_code = signal_exit_code(caught)
                raise
            except KeyboardInterrupt as e:  # outside the node loop (its startup, its cleanup)
                given = args[2] if len(args) > 2 else kwargs.get("options")
                o = given if isinstance(given, RunOptions) else RunOptions()
                cmd = resume_command(o.command, o.force)
                ui = o.progress()
                ui.line(f"interrupted ({e.args[0] if e.args else 'SIGINT'}); to resume, run:")
                ui.line(cmd)
                failed = RunFailed(["interrupted"], cmd, interrupted=True)
                failed.exit_code = signal_exit_code(caught)
                raise failed from None

    return wrapper


@_stops_on_signals
def run_graph(graph: Graph, spec: Any, options: RunOptions | None = None) -> RunSummary:
    """Execute every node of ``graph`` that is not cached; raise :class:`RunFailed` (after
    printing the failures and, last, the resume command) if any node fails.

    ``options`` (:class:`.options.RunOptions`): ``command`` is the invocation as argv
    without ``--force`` options (for the resume line); ``tracking_uri`` is the
    --tracking-uri flag, the environment and the spec come next; ``parent_run_id`` nests
    this invocation's MLflow run under an existing run (a grid's); ``tags`` / ``params`` are
    added to that run (a grid cell's axes); ``nproc_per_node`` (else the spec's
    ``execution.nproc_per_node``, else 1): torchrun ranks for each node whose step supports
    it (``unlearn``); it enters no node key.
    """
    o = options or RunOptions()
    force, tracking, tracking_uri = o.force, o.tracking, o.tracking_uri
    device, checkpoint_every, command = o.device, o.checkpoint_every, o.command
    nproc_per_node = o.nproc_per_node

    store = Store(o.store)
    store.root.mkdir(parents=True, exist_ok=True)
    ui = o.progress()
    executor = o.new_executor()
    if getattr(executor, "in_process", False) and hasattr(executor, "ui"):
        executor.ui = ui
    load_steps()
    status = recheck_reads(graph, store, plan_status(graph, store, force))
    missing = sorted({n.kind for n in graph} - set(STEPS))
    if missing:
        raise UserError(f"no step registered for node kind(s) {', '.join(missing)}")
    plain = spec if hasattr(spec, "tracking") else getattr(spec, "spec", spec)  # ResolvedSpec
    tspec = getattr(plain, "tracking", None)
    tracker = None
    summary = RunSummary()
    to_run = [n for n in graph if status[n.name].state == "run"]
    why = unwritable_reason(store.root)
    read_only = why is not None
    if read_only and to_run:
        raise UserError(
            f"cannot write {store.root}: {why}; {len(to_run)} node(s) must be written to the "
            f"store ({to_run[0].name}: {status[to_run[0].name].describe()}"
            f"{', ...' if len(to_run) > 1 else ''}); nothing was run",
            where="--store",
            hint="make the store writable (chmod -R u+w), or pass --store with a writable "
            "folder; `resalign plan` shows what would run",
        )
    if tracking and (tspec is None or getattr(tspec, "enabled", True)):
        from .tracking import Tracker, _sqlite_path, close_dead_runs, resolve_tracking_uri

        uri = resolve_tracking_uri(tracking_uri, getattr(tspec, "uri", None), store.root)
        db = _sqlite_path(uri)
        if read_only and db is not None and db.is_relative_to(store.root):
            raise UserError(
                f"cannot write {db}: the store is read-only and MLflow logs to it; nothing was run",
                where="--tracking-uri",
                hint="pass --tracking-uri with a database or server elsewhere (e.g. "
                "sqlite:////tmp/mlflow.db), or --no-tracking",
            )
        tracker = Tracker(
            uri,
            store.root,
            experiment=getattr(tspec, "experiment", "resalign"),
            run_name=getattr(tspec, "run_name", None),
            system_metrics=getattr(tspec, "system_metrics", True),
            log_models=getattr(tspec, "log_models", False),
            nest_under=o.parent_run_id,
            extra_tags=o.tags,
            extra_params=o.params,
            # a run that executes nothing writes nothing to the store (a read-only one)
            local_records=bool(to_run),
        )
        # Before any compute: an unreachable server is a UserError here.
        tracker.start(spec, graph, command=shlex.join(command) if command else None)
        summary.parent_run_id = tracker.parent_run_id
        summary.tracking_uri = uri
        try:  # runs that a killed driver left RUNNING (kill -9, out of memory)
            closed = close_dead_runs(store.root, uri)
        except Exception as e:  # never worth failing a run for
            closed = 0
            ui.line(f"could not close the MLflow runs of dead invocations: {e}")
        if closed:
            ui.line(f"ended {closed} MLflow run(s) left RUNNING by a killed invocation (FAILED)")
    if device is None:
        device = getattr(getattr(plain, "model", None), "device", "auto") or "auto"
    if nproc_per_node is None:
        nproc_per_node = getattr(getattr(plain, "execution", None), "nproc_per_node", 1) or 1

    t_start = time.perf_counter()
    # the done lines' count and time left (.pace), from the store's history as plan
    # --estimate has it (a store of 1,419 nodes reads in about 0.5 s)
    remaining = Remaining(graph, [n.name for n in to_run], history(store) if to_run else [],
                          executor.max_parallel)  # fmt: skip
    for n in graph:
        if status[n.name].state == "cached":
            summary.cached.append(n.name)
            if tracker is not None:
                tracker.cached(n)
    ui.line(
        f"{graph.spec_name}: {len(to_run)} node(s) to run, {len(summary.cached)} cached"
        + (f" (store {store.root}) [{remaining.line()}]" if to_run else "")
    )
    done = {n.name for n in graph if status[n.name].state == "cached"}
    failed: dict[str, NodeResult] = {}
    skipped: list[str] = []  # an upstream node failed
    not_started: list[str] = []  # ready or waiting when the run stopped after a failure
    started: set[str] = set()
    running: dict[Future[NodeResult], Node] = {}
    interrupted = False
    index_updates: dict[str, Any] = {n: index_entry(graph[n]) for n in done}
    pending = critical_path_order(graph, to_run)
    stopped_by = "SIGINT"
    crashed = True  # an exception other than an interrupt: the MLflow run ends FAILED
    try:
        with ui.session(), ui.bar(len(to_run), "nodes") as nodes_bar:
            while pending or running:
                progressed = True
                while progressed and len(running) < executor.max_parallel:
                    progressed = False
                    for n in list(pending):
                        deps = list(n.deps.values())
                        if any(d in failed or d in skipped for d in deps):
                            pending.remove(n)
                            skipped.append(n.name)
                            progressed = True
                            continue
                        if failed or not all(d in done for d in deps):
                            continue
                        pending.remove(n)
                        running[_submit(executor, n, graph, spec, store, status, tracker,
                                        device, checkpoint_every, ui,
                                        nproc_per_node)] = n  # fmt: skip
                        started.add(n.name)
                        progressed = True
                        break
                if not running:
                    if failed:
                        not_started += [n.name for n in pending]
                        pending = []
                    continue
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in finished:
                    n = running.pop(fut)
                    res = fut.result()
                    summary.log_seconds += res.log_seconds
                    if res.ok:
                        done.add(n.name)
                        if res.already_done:
                            summary.done_elsewhere.append(n.name)
                        else:
                            summary.executed.append(n.name)
                            summary.node_seconds[n.name] = res.seconds
                        index_updates[n.name] = index_entry(n)
                        wall = None if res.already_done else res.seconds
                        remaining.finished(n.name, wall, store.node_dir(n.kind, n.key))
                        ui.line(
                            (
                                f"done {n.name} ({res.seconds:.1f}s)"
                                if not res.already_done
                                else f"done {n.name} (by another invocation)"
                            )
                            + f" [{remaining.line()}]"
                        )
                        nodes_bar.advance()
                    else:
                        failed[n.name] = res
        crashed = False
    except KeyboardInterrupt as e:
        interrupted, crashed = True, False
        stopped_by = str(e.args[0]) if e.args else stopped_by  # SIGTERM / SIGHUP (.signals)
        executor.interrupt()
    finally:
        if crashed and tracker is not None:
            tracker.finish("FAILED")
        executor.shutdown()
        if index_updates:
            try:
                store.update_index(graph.spec_name, index_updates)
            except OSError as e:  # a full or read-only store: the node errors say so
                ui.line(f"could not record this run in {store.index_path(graph.spec_name)}: {e}")
    summary.seconds = time.perf_counter() - t_start
    if tracker is not None:
        tracker.finish("KILLED" if interrupted else "FAILED" if failed else "FINISHED")
    if failed or interrupted:
        for name, res in failed.items():
            if res.details:
                ui.console.print(res.details, highlight=False, markup=False, end="")
            ui.line(f"FAILED {name}: {res.error}")
        if skipped:
            ui.line(f"not run (upstream failed): {', '.join(skipped)}")
        if not_started:
            ui.line(f"not started (run stopped after a failure): {', '.join(not_started)}")
        pending_forced = {n for n in graph.nodes if status[n].reason == FORCED and n not in started}
        cmd = resume_command(command, pending_forced)
        ui.line(
            f"interrupted ({stopped_by}); to resume, run:" if interrupted else "to resume, run:"
        )
        ui.line(cmd)
        user_only = bool(failed) and all(r.user_error for r in failed.values())
        raise RunFailed(list(failed) or ["interrupted"], cmd, interrupted, user_only, failed)
    ui.line(
        f"{graph.spec_name}: executed {len(summary.executed)}, cached {len(summary.cached)}"
        + (
            f", done by another invocation {len(summary.done_elsewhere)}"
            if summary.done_elsewhere
            else ""
        )
        + f" in {summary.seconds:.1f}s"
        + (
            f"; MLflow run {summary.parent_run_id} at {summary.tracking_uri}"
            if summary.parent_run_id
            else ""
        )
    )
    return summary


def _submit(
    executor: Executor,
    n: Node,
    graph: Graph,
    spec: Any,
    store: Store,
    status: Mapping[str, NodeStatus],
    tracker: Any,
    device: str,
    checkpoint_every: int | None,
    ui: ProgressUI,
    nproc_per_node: int = 1,
) -> Future[NodeResult]:
    st = status[n.name]
    ui.line(f"run  {n.name} [{st.describe()[len('to run (') : -1]}]")
    inputs = {}
    for role, dep in n.deps.items():
        d = graph[dep]
        inputs[role] = str(store.node_dir(d.kind, d.key))
    task = NodeTask(
        node=n,
        store_root=str(store.root),
        inputs=inputs,
        step_module=STEPS[n.kind].__module__,
        device=device,
        checkpoint_every=checkpoint_every,
        fresh=st.reason == FORCED,
        tracking=tracker.child(n) if tracker is not None else None,
        verbose=ui.verbose,
        # only steps that split their work over ranks (STEPS[kind].distributed) get torchrun
        nproc_per_node=int(nproc_per_node) if getattr(STEPS[n.kind], "distributed", False) else 1,
    )
    return executor.submit(task)
