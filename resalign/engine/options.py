"""How an invocation runs a spec, as one value: :class:`RunOptions`.

Everything a run is told besides the spec itself (the store, tracking, where nodes run, the
device, what is forced, checkpointing, the progress display, the MLflow nesting and tags, the
command that resumes it) travels as one frozen :class:`RunOptions` through
:func:`.run.run_spec`, :func:`.runner.run_graph`, :func:`.search.run_searches` and
:func:`.grid.run_grid`, so no layer forwards a keyword the next one forgot (issue 22: the
grid's search trials lost the cell's tags that way). None of it enters a node key.

Imports nothing heavy: ``resalign --help`` and ``validate`` import this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .executors.base import Executor
    from .progress import ProgressUI

# `resalign run`'s default store (relative to the working directory)
DEFAULT_STORE = "runs"


@dataclass(frozen=True)
class RunOptions:
    """The options of one run; every field has the default of ``resalign run``.

    - ``store``: the store folder.
    - ``force``: nodes to run even when cached ('all', a kind, a name or a glob).
    - ``tracking`` / ``tracking_uri``: log to MLflow; the URI (else MLFLOW_TRACKING_URI, the
      spec's ``tracking.uri``, else SQLite at STORE/mlflow.db).
    - ``workers``: local worker processes; ``executor``: a zero-argument factory of the
      executor instead (a fresh one per graph run: the driver shuts it down after each).
    - ``device``, ``checkpoint_every``, ``nproc_per_node``: overrides of the spec's.
    - ``verbose``: a line per logged step; ``ui``: the progress display (default: a new one
      with ``verbose``; :func:`.run.run_spec` makes one and shares it with the searches).
    - ``command``: the invocation as argv without ``--force`` (the resume line); None:
      ``resalign run SPEC`` with these options (:meth:`run_argv`).
    - ``parent_run_id``: an MLflow run this invocation's run nests under (a grid's cell run
      under the grid run, a search round under the invocation's run); ``tags`` / ``params``:
      added to this invocation's MLflow run (a grid cell's axes), and ``tags`` also to the
      search trials' attack runs.
    - How :func:`.run.run_spec` loads a spec given as a path: ``sets`` (``--set`` items),
      ``rehearse`` (None, or the rehearsal profile: toy or full), ``strict`` (sanity
      warnings are errors).
    """

    store: str | Path = DEFAULT_STORE
    force: tuple[str, ...] = ()
    tracking: bool = True
    tracking_uri: str | None = None
    workers: int = 1
    executor: Callable[[], Executor] | None = None
    device: str | None = None
    checkpoint_every: int | None = None
    nproc_per_node: int | None = None
    verbose: bool = False
    ui: ProgressUI | None = field(default=None, compare=False)
    command: tuple[str, ...] | None = None
    parent_run_id: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    sets: tuple[str, ...] = ()
    rehearse: str | None = None
    strict: bool = False

    def __post_init__(self) -> None:
        # callers pass lists and dicts; the value keeps its own copies
        set_ = object.__setattr__
        set_(self, "force", tuple(self.force))
        set_(self, "sets", tuple(self.sets))
        if self.command is not None:
            set_(self, "command", tuple(str(a) for a in self.command))
        set_(self, "tags", dict(self.tags))
        set_(self, "params", dict(self.params))

    def replace(self, **changes: Any) -> RunOptions:
        """A copy with ``changes`` (the value itself is frozen)."""
        return dataclasses.replace(self, **changes)

    def new_executor(self) -> Executor:
        """A fresh executor: ``executor()``, else local with ``workers`` processes."""
        if self.executor is not None:
            return self.executor()
        from .executors.local import LocalExecutor

        return LocalExecutor(workers=self.workers)

    @contextlib.contextmanager
    def shared_executor(self) -> Iterator[RunOptions]:
        """These options with one executor for every graph run inside the ``with`` block
        (a search's rounds, a grid's cells), shut down once at its end. Each ``run_graph``
        call otherwise starts a fresh spawn pool whose workers import torch and diffusers
        and load their first model again (7 s of a worker's first node here, against
        0.07-0.16 s for a later load); nodes seed themselves, so a reused worker changes no
        result. An in-process executor has nothing to keep, and one an enclosing block
        already shares is kept by that block: the options come back as they are."""
        pool = self.new_executor()
        # in-process, or already shared by an enclosing block (a grid cell's searches)
        if getattr(pool, "in_process", False) or isinstance(pool, _KeepAlive):
            yield self
            return
        kept = _KeepAlive(pool)
        try:
            yield self.replace(executor=lambda: kept)
        finally:
            pool.shutdown()

    def progress(self) -> ProgressUI:
        """``ui``, else a new display with ``verbose``."""
        if self.ui is not None:
            return self.ui
        from .progress import ProgressUI

        return ProgressUI(verbose=self.verbose)

    def run_argv(self, spec: str | Path) -> list[str]:
        """``resalign run SPEC`` with these options, without ``--force`` (the runner re-adds
        the forced nodes that had not started): the one place the resume command of
        ``resalign run`` is spelt."""
        cmd = ["resalign", "run", str(spec)]
        if self.rehearse is not None:
            cmd += ["--rehearse", "--rehearse-profile", self.rehearse]
        store = None if str(self.store) == DEFAULT_STORE else self.store
        flags: Sequence[tuple[str, Any]] = (
            ("--store", store),
            ("--tracking-uri", self.tracking_uri),
            ("--device", self.device),
            ("--checkpoint-every", self.checkpoint_every),
            ("--workers", self.workers if self.workers != 1 else None),
            ("--nproc-per-node", self.nproc_per_node),
        )
        for flag, value in flags:
            if value is not None:
                cmd += [flag, str(value)]
        cmd += ["--no-tracking"] * (not self.tracking) + ["--verbose"] * self.verbose
        cmd += ["--strict"] * self.strict
        return cmd + [arg for item in self.sets for arg in ("--set", item)]


class _KeepAlive:
    """An executor whose ``shutdown`` (called by ``run_graph`` at the end of each graph run)
    keeps its workers; :meth:`RunOptions.shared_executor` shuts the real one down."""

    def __init__(self, executor: Any):
        self._executor = executor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._executor, name)

    def shutdown(self) -> None:
        pass
