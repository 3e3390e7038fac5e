"""Progress display: rich bars with ETA on a terminal, silence otherwise, ``--verbose`` lines.

One :class:`ProgressUI` per invocation. Bars (the node counter, a step's outer steps, attack
steps, image generation) appear only when stderr is a TTY; in CI logs and under a scheduler
they would be noise. ``verbose`` prints one line per logged metric step instead, TTY or not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class _Bar:
    def __init__(self, progress: Progress | None, task: int | None):
        self._p, self._t = progress, task

    def advance(self, n: int = 1) -> None:
        if self._p is not None and self._t is not None:
            self._p.advance(self._t, n)


class ProgressUI:
    """Bars and status lines for one invocation."""

    def __init__(
        self, *, enabled: bool | None = None, verbose: bool = False, console: Console | None = None
    ):
        self.console = console or Console(stderr=True)
        self.enabled = self.console.is_terminal if enabled is None else enabled
        self.verbose = verbose
        self._progress: Progress | None = None

    @contextlib.contextmanager
    def session(self) -> Iterator[ProgressUI]:
        """Keep one live display for the whole invocation (when enabled)."""
        if not self.enabled:
            yield self
            return
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        with self._progress:
            try:
                yield self
            finally:
                self._progress = None

    @contextlib.contextmanager
    def bar(self, total: int, description: str) -> Iterator[_Bar]:
        if self._progress is None:
            yield _Bar(None, None)
            return
        task = self._progress.add_task(description, total=total)
        try:
            yield _Bar(self._progress, task)
        finally:
            self._progress.remove_task(task)

    def line(self, message: str) -> None:
        """A status line (node started / cached / done); always shown."""
        # soft_wrap: the resume command must stay one copy-pasteable line on any width
        self.console.print(message, highlight=False, markup=False, soft_wrap=True)

    def step_line(self, node: str, step: int | None, metrics: Mapping[str, float]) -> None:
        if not self.verbose:
            return
        vals = " ".join(f"{k}={v:.6g}" for k, v in metrics.items() if isinstance(v, int | float))
        at = f" step {step}" if step is not None else ""
        self.console.print(f"  [{node}]{at} {vals}", highlight=False, markup=False)
