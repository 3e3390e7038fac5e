"""The slurm executor: each node task is one submitit job.

The driver (``run_graph``) stays where the command was typed: it decides what runs, creates
the MLflow runs, and hands each :class:`NodeTask` (which carries the node's MLflow run by id)
to a job that calls :func:`resalign.engine.worker.execute_task` on a compute node. The store
must be on a file system the compute nodes share.

Preemption and time limits: the job callable is a ``submitit.helpers.Checkpointable``; when
slurm signals the job (preemption, or ``signal_delay_s`` before the time limit) submitit
requeues the same task, and ``execute_task`` resumes from the checkpoints the step wrote under
``ctx.state`` (nothing else is saved here). ``cluster="local"`` runs the same job path in local
subprocesses (submitit's local executor, which also simulates the signal), ``"debug"`` in
this process; the tests use both.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ...errors import UserError
from .base import Executor, NodeResult, NodeTask


class _NodeJob:
    """The picklable job body. ``checkpoint`` (called by submitit on the signal) resubmits
    the same task: the resume state lives in the store, not in this object."""

    def __init__(self, task: NodeTask):
        self.task = task

    def __call__(self) -> NodeResult:
        from ..worker import execute_task

        return execute_task(self.task)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(_NodeJob(self.task))


def _checkpointable() -> type:
    import submitit

    # Subclassing Checkpointable at call time keeps submitit an optional import.
    return type("NodeJob", (_NodeJob, submitit.helpers.Checkpointable), {})


class SlurmExecutor(Executor):
    """Submit node tasks through submitit.

    ``partition``, ``gpus`` (per job), ``time`` (minutes), ``cpus`` and ``mem_gb`` are slurm
    resources; ``array_parallelism`` caps how many jobs run at once (the driver never has more
    in flight); ``folder`` holds submitit's logs and pickles; ``cluster`` is ``slurm``,
    ``local`` or ``debug``; ``extra`` passes further ``slurm_*`` parameters to submitit.
    """

    in_process = False

    def __init__(
        self,
        *,
        folder: str | Path = "runs/slurm",
        partition: str | None = None,
        gpus: int = 1,
        time: int = 240,
        cpus: int = 8,
        mem_gb: int | None = None,
        array_parallelism: int = 8,
        cluster: str = "slurm",
        signal_delay_s: int = 120,
        max_requeues: int = 5,
        extra: dict[str, Any] | None = None,
    ):
        try:
            import submitit
        except ImportError:
            raise UserError(
                "the slurm executor needs submitit",
                hint="pip install 'resalign[slurm]' (or submitit) in this environment",
            ) from None
        if cluster not in ("slurm", "local", "debug"):
            raise UserError(f"unknown submitit cluster {cluster!r}", hint="slurm, local or debug")
        self.max_parallel = max(1, int(array_parallelism))
        self.folder = Path(folder)
        self.executor = submitit.AutoExecutor(
            folder=str(self.folder), cluster=cluster, slurm_max_num_timeout=int(max_requeues)
        )
        params: dict[str, Any] = {
            "timeout_min": int(time),
            "gpus_per_node": int(gpus),
            "cpus_per_task": int(cpus),
            "slurm_array_parallelism": self.max_parallel,
            "slurm_signal_delay_s": int(signal_delay_s),
            "name": "resalign",
        }
        if partition:
            params["slurm_partition"] = partition
        if mem_gb:
            params["mem_gb"] = int(mem_gb)
        params.update(extra or {})
        # AutoExecutor drops parameters of other clusters (slurm_* on local), so one set of
        # options serves the real cluster and the local test path.
        self.executor.update_parameters(**params)
        self.jobs: list[Any] = []
        self._job_cls = _checkpointable()

    def submit(self, task: NodeTask) -> Future[NodeResult]:
        self.executor.update_parameters(name=f"resalign:{task.node.name}")
        job = self.executor.submit(self._job_cls(task))
        self.jobs.append(job)
        fut: Future[NodeResult] = Future()

        def wait() -> None:
            try:
                fut.set_result(job.result())
            except Exception as e:  # a job that died without a NodeResult
                fut.set_result(
                    NodeResult(
                        name=task.node.name,
                        ok=False,
                        error=f"slurm job {job.job_id} failed: {str(e).splitlines()[-1:]}",
                        details=str(e),
                    )
                )

        threading.Thread(target=wait, daemon=True, name=f"wait-{job.job_id}").start()
        return fut

    def shutdown(self) -> None:
        """Nothing to release: finished jobs are gone; running ones were awaited."""
