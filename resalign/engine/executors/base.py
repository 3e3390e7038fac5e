"""The executor interface: how the driver hands node tasks to whatever runs them.

The driver (``resalign.engine.runner``) decides *what* runs: it resolves the cache, creates
the MLflow child run and builds a :class:`NodeTask` (picklable: the node with its params,
input folders, the tracking handle). An executor decides *where*: it calls
:func:`resalign.engine.worker.execute_task` on the task, in this process, in a worker process,
or in a cluster job, and returns a :class:`concurrent.futures.Future` resolving to a
:class:`NodeResult`. ``execute_task`` does everything on the worker side (lock, staging,
resume, metrics, commit, MLflow child logging), so a new executor only has to move the call.

To add one (e.g. slurm via submitit): subclass :class:`Executor`, set ``max_parallel``,
implement ``submit`` (wrap the job in a Future or return submitit's job adapted to one) and
``shutdown``; register it in ``executors/__init__.py:make_executor``. Requeue on preemption
needs nothing special: re-executing the same task resumes from ``ctx.state``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ...graph.nodes import Node


@dataclass
class NodeTask:
    """One node to execute; everything here must pickle."""

    node: Node  # its params are everything the step reads (no spec: issue 22)
    store_root: str
    inputs: dict[str, str]  # role -> completed upstream folder
    step_module: str  # module that registers the step kind (imported in the worker)
    device: str = "auto"
    checkpoint_every: int | None = None
    fresh: bool = False  # forced: discard resume state first
    tracking: Any = None  # resalign.engine.tracking.TrackingHandle or None
    verbose: bool = False
    # > 1: run the step on this many torchrun ranks (steps whose class sets distributed = True)
    nproc_per_node: int = 1


@dataclass
class NodeResult:
    name: str
    ok: bool
    error: str | None = None  # one-line summary
    details: str | None = None  # traceback or rendered UserError
    user_error: bool = False
    # the exception's class name (``NonFiniteError``: the settings diverged; an attacker
    # search tells such a trial to its sampler as failed and goes on)
    error_type: str | None = None
    interrupted: bool = False
    seconds: float = 0.0
    log_seconds: float = 0.0  # time spent in MLflow calls (tracking overhead)
    already_done: bool = False  # another invocation completed it while we waited
    extra: dict[str, Any] = field(default_factory=dict)


class Executor(ABC):
    """Runs :class:`NodeTask`s; at most ``max_parallel`` at a time are submitted."""

    max_parallel: int = 1
    #: True when tasks run in this process and may draw progress bars on its console.
    in_process: bool = False

    @abstractmethod
    def submit(self, task: NodeTask) -> Future[NodeResult]: ...

    def interrupt(self) -> None:  # noqa: B027 - optional hook
        """The run was stopped (Ctrl-C, SIGTERM, SIGHUP): make running tasks stop at once,
        as a Ctrl-C would stop them (called before :meth:`shutdown`)."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Release workers; called once by the driver at the end."""
