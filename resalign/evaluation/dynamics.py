"""How each row unlearned: its outer steps' statistics, summarised per report row.

Every unlearn node keeps each outer step's statistics in ``steps.jsonl`` (the method's
callback, :mod:`resalign.algorithms.callbacks`). Per unlearned model this takes the median
over its outer steps of each of :data:`STATS` (the sum for :data:`COUNTS`), and per report
row the median over the row's models with their range. The report shows it for rows with a
resilience term: whether the resilience part dominated the step (``resilience_ratio``), how
it pointed against the direct part (``resilience_cosine``), how far the hypergradient was
from first order (``cosine``), and how often the solve fell back. Issue 20's LoRA-θ rows
that did not unlearn had a ratio of 1.05-1.59 against 0.25-0.42 where ResAlign unlearned,
which then had to be worked out by hand from the norms.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from .store_read import completed_folders, stored_location

STEPS_FILE = "steps.jsonl"  # the unlearn step's per-step statistics (resalign.steps.unlearn)
# (key in steps.jsonl, column title), in the report's order; medians over outer steps
STATS = (
    ("resilience_ratio", "resilience / direct"),
    ("resilience_cosine", "cos(resilience, direct)"),
    ("cosine", "cos(hypergradient, first order)"),
    ("hypergrad_norm", "‖hypergradient‖"),
    ("direct_grad_norm", "‖direct‖"),
)
COUNTS = (("fallbacks", "fallbacks"), ("retries", "retries"))  # summed over outer steps
# statistics only a method with a resilience term reports: a row without any is left out
RESILIENCE = ("resilience_ratio", "resilience_cosine", "cosine", "hypergrad_norm")


@dataclass(frozen=True)
class ModelDynamics:
    """One unlearned model's outer steps: ``values`` per statistic (median, or sum for a
    count) over the ``steps`` steps that report it."""

    row: str
    unlearn_seed: int | None
    steps: int
    values: Mapping[str, float]


def read_dynamics(name: str, row: str, unlearn_seed: int | None, folder: Path) -> ModelDynamics:
    """The model of unlearn node ``name`` from its ``steps.jsonl`` in ``folder``. A line that
    is not a JSON object is a :class:`UserError` naming the file and line; non-finite values
    are left out of the medians (the unlearn step stops on those that reach the weights)."""
    path = Path(folder) / STEPS_FILE
    series: dict[str, list[float]] = {}
    steps = 0
    try:
        text = path.read_text("utf-8")
    except OSError as e:
        raise UserError(f"{name}: cannot read {path}: {e}", where=str(path)) from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict):
            raise UserError(
                f"{name}: line {lineno} of {path} is not a JSON object",
                where=f"{path}:{lineno}",
                hint="`resalign verify` checks the store; re-run the node to rewrite it",
            )
        steps += 1
        for key, _ in (*STATS, *COUNTS):
            v = rec.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                series.setdefault(key, []).append(float(v))
    counts = {k for k, _ in COUNTS}
    values = {k: (sum(v) if k in counts else statistics.median(v)) for k, v in series.items() if v}
    return ModelDynamics(row, unlearn_seed, steps, values)


def dynamics_from_dirs(dirs: Mapping[str, Path]) -> list[ModelDynamics]:
    """The models of unlearn nodes given as ``{node name: folder}`` (the report step's
    inputs), located by their ``node.json``, else by their name ``unlearn/<row>/seed<u>``.
    A folder without ``steps.jsonl`` is left out (as :func:`dynamics_from_store` does)."""
    out = []
    for n, p in dirs.items():
        if not (Path(p) / STEPS_FILE).is_file():
            continue
        stored = stored_location(p)
        if stored is not None:
            row, seed = stored["row"], stored["unlearn_seed"]
        else:  # unlearn/<row>/seed<u>, as resalign.graph.compile names it
            _, row, s = n.split("/")
            seed = int(s.removeprefix("seed"))
        out.append(read_dynamics(n, row, seed, p))
    return out


def dynamics_from_store(graph: Any, store_root: Path, complete: Any = None) -> list[ModelDynamics]:
    """The models of every complete unlearn node of ``graph`` in ``store_root`` that holds a
    ``steps.jsonl``; the others are left out, not an error: the section is an addition to a
    report whose evaluations (read by :func:`completed_folders`, which names what is missing)
    are what it is about. ``complete(kind, key)``: the store's completeness test (default: a
    ``DONE`` marker), so a damaged node is never read."""
    found = completed_folders(graph, store_root, "unlearn", STEPS_FILE, "unlearning",
                              complete=complete, skip_missing=True)  # fmt: skip
    return [read_dynamics(n, graph[n].row, graph[n].unlearn_seed, p) for n, p in found.items()]


def dynamics_table(
    models: Iterable[ModelDynamics], rows: Sequence[str] | None = None
) -> dict[str, Any] | None:
    """Per row with a resilience statistic (in ``rows``' order, then first seen): ``models``
    (n), ``steps`` (outer steps, summed), and per statistic the median over its models with
    ``lo``/``hi`` their range and ``n`` the models reporting it. None when no row has one."""
    per: dict[str, list[ModelDynamics]] = {}
    for m in models:
        per.setdefault(m.row, []).append(m)
    order = [r for r in (rows or []) if r in per] + [r for r in per if r not in (rows or [])]
    out = []
    for r in order:
        ms = per[r]
        if not any(k in m.values for m in ms for k in RESILIENCE):
            continue
        cells: dict[str, Any] = {}
        for key, _ in (*STATS, *COUNTS):
            vals = sorted(m.values[key] for m in ms if key in m.values)
            if vals:
                cells[key] = {"median": statistics.median(vals), "lo": vals[0], "hi": vals[-1],
                              "n": len(vals)}  # fmt: skip
        out.append({"row": r, "models": len(ms), "steps": sum(m.steps for m in ms), **cells})
    if not out:
        return None
    shown = [(k, t) for k, t in (*STATS, *COUNTS) if any(k in x for x in out)]
    return {"rows": out, "columns": [{"key": k, "title": t} for k, t in shown]}


def _fmt(c: Mapping[str, Any] | None, count: bool) -> str:
    if c is None:
        return "–"
    # "to", not a dash: the ranges of cosines are often negative ("-0.141 to -0.043")
    if count:
        return f"{c['median']:g} ({c['lo']:g} to {c['hi']:g})"
    return f"{c['median']:.3g} ({c['lo']:.3g} to {c['hi']:.3g})"


def dynamics_markdown(table: Mapping[str, Any]) -> str:
    """The table as markdown: a row per report row, a column per statistic shown."""
    counts = {k for k, _ in COUNTS}
    cols = table["columns"]
    head = ["row", "models", *[c["title"] for c in cols]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table["rows"]:
        cells = [_fmt(r.get(c["key"]), c["key"] in counts) for c in cols]
        lines.append("| " + " | ".join([r["row"], str(r["models"]), *cells]) + " |")
    return "\n".join(lines)


def dynamics_note() -> str:
    return (
        "Per unlearned model the median over its outer steps (fallbacks and retries: the "
        "total); per row the median over its models, with their range in brackets. "
        "resilience / direct: the norm of the resilience part of the applied step over the "
        "direct part's (β·‖mean hypergradient‖ / ‖direct gradient‖, times the meta rate where "
        "it scales the hypergradient alone); cos(resilience, direct): the cosine between the "
        "two; cos(hypergradient, first order): each hypergradient against ∇L_harm at the "
        "fine-tuned weights, averaged over the step's simulated fine-tunes. The first two "
        "are logged since 2026-12-07: older models show – (a column no model has is left "
        "out)."
    )


__all__ = [
    "COUNTS",
    "STATS",
    "STEPS_FILE",
    "ModelDynamics",
    "dynamics_from_dirs",
    "dynamics_from_store",
    "dynamics_markdown",
    "dynamics_note",
    "dynamics_table",
    "read_dynamics",
]
