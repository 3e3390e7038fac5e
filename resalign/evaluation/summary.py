"""The report's numbers per report row and unlearning seed, as flat metrics with short keys:
what one MLflow "summary" run carries, so MLflow's runs table, compare view and
parallel-coordinates plot show the rows side by side (``resalign.engine.tracking.summaries``).

Keys (``<m>``: a metric of the evaluation, ``<t>``: a threat, ``<s>``: an evaluated attack
step):

- ``<m>/pre``: the evaluation before any fine-tuning (every metric);
- ``<m>/<t>/step<s>``: a safety metric after ``s`` attack steps, mean over the attack seeds;
- ``relearning_area/<t>``: the relearning area of the safety metric (:mod:`.stats`: trapezoid
  area over the attack, step 0 = the pre-FT value, divided by the last step), mean over the
  attack seeds; ``first_relearn_step/<t>``: the lower median over attack seeds of the first
  step above half the original's pre-FT value (absent when that median never relearned) and
  ``relearned/<t>`` the share of attack seeds that relearned. With several safety metrics
  these three carry the metric too: ``relearning_area/<m>/<t>``;
- ``unlearn/<stat>``: how the model unlearned, from its unlearn node's outer steps
  (:mod:`.dynamics`: the median over outer steps of ``resilience_ratio``,
  ``resilience_cosine``, ``cosine``, the gradient norms; the total of ``fallbacks`` and
  ``retries``), where the method logged them; so the parallel-coordinates plot can set the
  resilience part's size beside the relearning it was meant to prevent.

Means over attack seeds, not intervals: a run is one unlearning seed, and MLflow's own
grouping (Group by ``resalign.row``) aggregates over seeds. The numbers are those of the
report's table (``table.json``): the same units, areas and thresholds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .dynamics import ModelDynamics
from .report.results import EvalResult
from .report.table import ValueIndex, build_table, metric_roles, relearning
from .stats import first_step_summary


@dataclass
class RowSummary:
    """One report row and unlearning seed (None for rows without unlearning)."""

    row: str
    unlearn_seed: int | None
    metrics: dict[str, float] = field(default_factory=dict)


def _mean(vals: Sequence[float]) -> float | None:
    return sum(vals) / len(vals) if vals else None


def row_summaries(
    results: Sequence[EvalResult],
    rows: Sequence[str] | None = None,
    threats: Mapping[str, Mapping[str, Any]] | None = None,
    dynamics: Sequence[ModelDynamics] = (),
) -> list[RowSummary]:
    """Per report row and unlearning seed, the metrics of the module docstring;
    ``dynamics``: the unlearned models' outer steps, for the ``unlearn/`` keys."""
    outer = {(m.row, m.unlearn_seed): m.values for m in dynamics}
    table = build_table(results, rows, threats, all_steps=True)
    info = table["metrics"]
    safety, _ = metric_roles(info)
    idx = ValueIndex(results)
    steps_of = {t: sorted({r.step for r in results if r.threat == t}) for t in table["threats"]}
    cells = {r["row"]: r["cells"] for r in table["table"]}
    out: list[RowSummary] = []
    for row in table["rows"]:
        seeds = sorted(
            {r.unlearn_seed for r in results if r.row == row},
            key=lambda s: (s is not None, s or 0),
        )
        for useed in seeds:
            s = RowSummary(row, useed)

            def pre(m: str) -> None:
                v = idx.get(row, m, None, 0).get((useed, None))  # noqa: B023
                if v is not None:
                    s.metrics[f"{m}/pre"] = v  # noqa: B023

            for m in safety:  # in the table's order: safety metrics, then utility
                pre(m)
                named = "" if len(safety) == 1 else f"{m}/"
                for t, steps in steps_of.items():
                    for step in steps:
                        vals = [v for (u, _), v in idx.get(row, m, t, step).items() if u == useed]
                        if vals:
                            s.metrics[f"{m}/{t}/step{step}"] = _mean(vals)  # type: ignore[assignment]
                    threshold = cells[row][f"{m}/{t}/first"].get("threshold")
                    areas, firsts = relearning(idx, row, m, t, steps, threshold)
                    area = _mean([v for (u, _), v in areas.items() if u == useed])
                    if area is not None:
                        s.metrics[f"relearning_area/{named}{t}"] = area
                    mine = [v for (u, _), v in firsts.items() if u == useed]
                    if mine and steps:
                        first = first_step_summary(mine, steps[-1])
                        s.metrics[f"relearned/{named}{t}"] = first["relearned"] / first["n"]
                        if first["median"] is not None:
                            s.metrics[f"first_relearn_step/{named}{t}"] = float(first["median"])
            for m in info:
                if m not in safety:
                    pre(m)
            for k, v in outer.get((row, useed), {}).items():
                s.metrics[f"unlearn/{k}"] = float(v)
            if s.metrics:
                out.append(s)
    return out
