"""The local executor: sequential in this process (default) or N worker processes."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor

from .base import Executor, NodeResult, NodeTask


class LocalExecutor(Executor):
    """``workers=1``: run each task here, in order (progress bars work). ``workers>1``: a
    spawn-started process pool (no fork: torch and threads do not survive it)."""

    def __init__(self, workers: int = 1):
        self.max_parallel = max(1, int(workers))
        self.in_process = self.max_parallel == 1
        self._pool: ProcessPoolExecutor | None = None
        self.ui = None  # set by the driver for in-process progress bars

    def submit(self, task: NodeTask) -> Future[NodeResult]:
        from ..worker import execute_task

        if self.in_process:
            fut: Future[NodeResult] = Future()
            try:
                fut.set_result(execute_task(task, ui=self.ui))
            except BaseException as e:  # KeyboardInterrupt reaches the driver through here
                fut.set_exception(e)
                if not isinstance(e, Exception):
                    raise
            return fut
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.max_parallel,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_share_cores,
                initargs=(self.max_parallel,),
            )
        return self._pool.submit(execute_task, task)

    def interrupt(self) -> None:
        """SIGINT to each worker process (a SIGTERM sent to the driver alone, as
        ``kill PID`` does, would otherwise leave them running their nodes to the end):
        each stops its node as Ctrl-C does, and :meth:`shutdown` then returns."""
        import signal

        # ProcessPoolExecutor has no public list of its processes
        for proc in list(getattr(self._pool, "_processes", {}).values()):
            with contextlib.suppress(OSError):
                os.kill(proc.pid, signal.SIGINT)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _share_cores(workers: int) -> None:
    """Give each worker its share of the cores: torch defaults every process to all of them,
    and N such processes on a small CPU run several times slower than N single-threaded ones
    (measured: ~10x on 2 cores). An explicit ``OMP_NUM_THREADS`` wins. And stop its node
    on SIGTERM and SIGHUP as on Ctrl-C (a scheduler signals every process of the job)."""
    from ..signals import stop_like_ctrl_c

    stop_like_ctrl_c()
    if os.environ.get("OMP_NUM_THREADS"):
        return
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
