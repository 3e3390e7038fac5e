"""What a running invocation has left: the count and time its ``done`` lines carry.

A study on 2 cores runs for hours, mostly in the background (``nohup``, a scheduler), where
the terminal bars (:mod:`.progress`) are off and the log said only which node finished. Each
``done`` line now ends with the nodes finished of those to run and the wall time left,
``[12/127; about 24 min left]``, from the same model as ``plan --estimate``
(:mod:`.estimate`), with two corrections learnt while running:

- **the pace**: the estimate is a node's busy time on an idle machine; the wall time of the
  nodes finished so far over their estimate says how this machine runs now (the load, the
  workers sharing cores), and multiplies what is left. The module docstring of
  :mod:`.estimate` measured how far that can be from 1 (6.6x on a loaded machine);
- **this run's nodes**: each finished node joins the recorded history, so a kind the store
  had no record of (the first run on an empty store) is estimated as soon as one of its
  nodes has finished; until then the line counts such nodes apart ("+ 3 not estimated
  yet"). Each finished node's estimate, from what was recorded before it, sets the pace.

Time left = max(what is left / workers, the longest node left), times the pace: nodes
overlap up to the number of workers, and no schedule finishes before its longest node.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from ..graph.nodes import Graph
from .estimate import Recorded, duration, estimate, node_work, record, recorded_cost


class Remaining:
    """The nodes an invocation still has to run and the time they will take."""

    def __init__(
        self, graph: Graph, to_run: Iterable[str], recorded: Sequence[Recorded], workers: int
    ):
        self.graph = graph
        self.pending = list(to_run)
        self.total = len(self.pending)
        self.recorded = list(recorded)
        self.workers = max(1, int(workers))
        self._predicted = 0.0  # the estimates of the finished nodes that had one
        self._wall = 0.0  # their wall seconds

    @property
    def pace(self) -> float:
        """Wall seconds per estimated second, over the finished nodes (1 before any)."""
        return self._wall / self._predicted if self._predicted > 0 else 1.0

    def finished(self, name: str, wall_s: float | None, folder: str | Path | None = None) -> None:
        """Node ``name`` finished in ``wall_s`` seconds (None: another invocation computed
        it, so its wait says nothing of the pace); ``folder``: its folder in the store, whose
        ``DONE`` cost record joins the history."""
        if name in self.pending:
            self.pending.remove(name)
        # its estimate from what was recorded before it (this run's earlier nodes included)
        mine = estimate(self.graph, [name], self.recorded).per_node.get(name)
        if mine is not None and mine[0] > 0 and wall_s is not None:
            self._predicted += mine[0]
            self._wall += max(0.0, float(wall_s))
        cost = recorded_cost(Path(folder)) if folder is not None else None
        if cost is not None:
            n = self.graph[name]
            self.recorded.append(record(n.kind, *node_work(self.graph, n), n.params, cost))

    def left_seconds(self) -> tuple[float | None, int]:
        """(wall seconds left for the estimated nodes, None when none is; the number of
        nodes left without an estimate)."""
        est = estimate(self.graph, self.pending, self.recorded)
        known = [p[0] for p in est.per_node.values() if p is not None]
        missing = len(est.per_node) - len(known)
        if not known:
            return None, missing
        return max(sum(known) / self.workers, max(known)) * self.pace, missing

    def line(self) -> str:
        """``12/127; about 24 min left`` (``+ 3 not estimated yet``: the nodes that leaves
        out), or ``12/127; no estimate yet``."""
        done = self.total - len(self.pending)
        head = f"{done}/{self.total}"
        if not self.pending:
            return head
        left, missing = self.left_seconds()
        if left is None:
            return f"{head}; no estimate yet"
        out = f"{head}; about {duration(left)} left"
        return out + (f" + {missing} not estimated yet" if missing else "")


__all__ = ["Remaining"]
