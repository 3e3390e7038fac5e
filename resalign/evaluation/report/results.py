"""The report's input: one :class:`EvalResult` per evaluate node, its ``metrics.json`` and
where the node sits (row, unlearning seed, threat, attack seed, step).

Where a node sits is what :class:`resalign.graph.nodes.Node` records (``row``, ``threat``,
``seed``, ``step``, ``unlearn_seed``, set by :mod:`resalign.graph.compile`), never parsed out
of its name when the node is at hand: :func:`results_from_store` (``resalign report``, the
MLflow summaries) reads the compiled graph's nodes. The report step sees only its input
folders; :func:`results_from_dirs` reads each folder's ``node.json`` (:func:`locate`; see
:func:`resalign.evaluation.store_read.stored_location` for the nodes whose ``node.json`` does
not record where they sit).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from ...errors import UserError
from ..stats import Unit
from ..store_read import completed_folders, stored_location


@dataclass(frozen=True)
class EvalResult:
    """One evaluate node's results. ``threat`` and ``seed`` (the attack seed) are None before
    any attack (step 0); ``unlearn_seed`` is None for rows without unlearning."""

    row: str
    threat: str | None
    seed: int | None
    step: int
    metrics: Mapping[str, Mapping[str, Any]]
    folder: Path
    unlearn_seed: int | None = None

    @property
    def unit(self) -> Unit:
        return (self.unlearn_seed, self.seed)


class Location(Protocol):
    """Where an evaluate node sits: the fields of :class:`resalign.graph.nodes.Node` the
    report reads (a ``Node`` is one; so is :class:`EvalName`)."""

    @property
    def row(self) -> str | None: ...
    @property
    def threat(self) -> str | None: ...
    @property
    def seed(self) -> int | None: ...
    @property
    def step(self) -> int | None: ...
    @property
    def unlearn_seed(self) -> int | None: ...


class EvalName(NamedTuple):
    row: str
    unlearn_seed: int | None
    threat: str | None
    seed: int | None
    step: int


_EVAL_NAME = re.compile(
    r"^evaluate/(?P<row>.+?)(?:/seed(?P<useed>-?\d+))?"
    r"/(?:pre|(?P<threat>[^/]+)/seed(?P<seed>-?\d+))/step(?P<step>\d+)$"
)


def parse_eval_name(name: str) -> EvalName:
    """``evaluate/<row>[/seed<u>]/pre/step0`` or
    ``evaluate/<row>[/seed<u>]/<threat>/seed<a>/step<n>`` (``seed<u>``: the unlearning seed,
    absent for rows without unlearning; see :func:`resalign.graph.compile.compile_spec`).
    Only for a stored node whose ``node.json`` does not record its location (:func:`locate`)."""
    m = _EVAL_NAME.match(name)
    if m is None:
        raise ValueError(f"not an evaluate node name: {name!r}")

    def num(g: str) -> int | None:
        return None if m.group(g) is None else int(m.group(g))

    return EvalName(m["row"], num("useed"), m["threat"], num("seed"), int(m["step"]))


def locate(name: str, folder: Path) -> Location:
    """Where the stored evaluate node ``name`` in ``folder`` sits: as its ``node.json``
    records it, else (every node stored so far, see
    :func:`resalign.evaluation.store_read.stored_location`) as its name says."""
    loc = stored_location(folder)
    return parse_eval_name(name) if loc is None else EvalName(**loc)


def read_result(name: str, loc: Location, folder: Path) -> EvalResult:
    """The result of the evaluate node ``name`` at ``loc``, from ``folder/metrics.json``."""
    if loc.row is None or loc.step is None:  # compile.py locates every evaluate node
        raise ValueError(f"{name}: an evaluate node without a row or step")
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        raise UserError(f"{name}: no metrics.json in {folder}", where=str(folder))
    metrics = json.loads(path.read_text("utf-8"))
    return EvalResult(
        loc.row, loc.threat, loc.seed, loc.step, metrics, Path(folder), loc.unlearn_seed
    )


def results_from_dirs(dirs: Mapping[str, Path]) -> list[EvalResult]:
    """Results of stored evaluate nodes given as ``{node name: output folder}`` (the report
    step's inputs), located by :func:`locate`."""
    return [read_result(n, locate(n, p), p) for n, p in dirs.items()]


def results_from_store(
    graph: Any,
    store_root: Path,
    spec_path: str = "SPEC",
    complete: Callable[[str, str], bool] | None = None,
) -> list[EvalResult]:
    """Results of every evaluate node of ``graph`` from ``store_root`` (``runs/``), each
    located by its :class:`~resalign.graph.nodes.Node`.

    ``complete(kind, key)``: whether a node's result may be read (the engine's
    ``Store.is_complete``, which also checks the files against the ``DONE`` manifest, so a
    damaged result is reported as missing, never read); default: a ``DONE`` marker exists.
    A node without a completed result is a :class:`UserError` naming every missing node.
    """
    found = completed_folders(
        graph, store_root, "evaluate", "metrics.json", "evaluation", spec_path, complete
    )
    return [read_result(n, graph[n], p) for n, p in found.items()]


__all__ = [
    "EvalName",
    "EvalResult",
    "Location",
    "locate",
    "parse_eval_name",
    "read_result",
    "results_from_dirs",
    "results_from_store",
]
