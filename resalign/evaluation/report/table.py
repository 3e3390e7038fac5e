"""The table: evaluate results → cells, paired differences, relearning summaries, curves.

:func:`build_table` turns the :class:`~.results.EvalResult` objects into JSON-able data
(``table.json``), with no text and no figure. It has one line per row (``original`` first,
then each method) and, for each safety metric, a pre-fine-tuning column, one
post-fine-tuning column per threat (at the threat's last evaluation step; every step with
``all_steps``) and two columns per threat that sum up the whole attack (the relearning area
and the first relearn step, see :mod:`resalign.evaluation.stats`); utility metrics get their
pre-fine-tuning column. A cell aggregates over units (unlearning seed × attack seed; see
:mod:`..stats`): mean, 95 % interval (Student t, clipped to [0, 1] for rates) and n. Below
each method row, its paired difference to the reference row (``report.reference``, default
``plain``; ``<cell>/<reference>`` in a grid report): same unlearning seed and attack seed. :func:`add_worst_case` adds the attacker
searches' worst-case columns.

A perturbation threat (``algorithm: perturb``; its meta carries ``radii``) has steps 1..K,
step k its k-th radius: its columns carry ``radius``, its curves have ``x: "radius"`` and
points with ``radius``, and its area and first columns are over the radius (step 0 = radius
0, the pre-FT value; :func:`radius_map`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..resurgence import resurgence_table
from ..stats import (
    RATE_METRICS,
    Unit,
    area_under,
    bounds_of,
    first_exceeding,
    first_step_summary,
    paired,
    paired_first,
    summary,
)
from .results import EvalResult
from .rows import ORIGINAL_ROW, REFERENCE_ROW, reference_row, sibling


def metric_info(results: Iterable[EvalResult]) -> dict[str, dict[str, Any]]:
    """Per metric: its definition, version, params, role and better (as the first result
    reporting it has them)."""
    info: dict[str, dict[str, Any]] = {}
    for r in results:
        for name, m in r.metrics.items():
            info.setdefault(
                name,
                {k: m.get(k) for k in ("definition", "version", "params", "role", "better")},
            )
    return info


def metric_roles(info: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    """``(safety, utility)`` metric names of :func:`metric_info`'s result (a metric without a
    role is a safety metric), in order."""
    safety = [m for m, i in info.items() if i.get("role", "safety") == "safety"]
    utility = [m for m, i in info.items() if i.get("role") == "utility"]
    return safety, utility


class ValueIndex:
    """Values by (row, metric, threat, step) → {unit: value}."""

    def __init__(self, results: Sequence[EvalResult]):
        self.data: dict[tuple[str, str, str | None, int], dict[Unit, float]] = {}
        for r in results:
            for m, v in r.metrics.items():
                self.data.setdefault((r.row, m, r.threat, r.step), {})[r.unit] = float(v["value"])

    def get(self, row: str, metric: str, threat: str | None, step: int) -> dict[Unit, float]:
        return self.data.get((row, metric, threat, step), {})


def radius_map(meta: Mapping[str, Any]) -> dict[int, float]:
    """Step → radius of a perturb threat (its meta has ``radii``; step k is the k-th radius,
    step 0 radius 0, the unperturbed row); empty for any other threat."""
    radii = meta.get("radii")
    if not radii:
        return {}
    return {0: 0.0, **{k: float(r) for k, r in enumerate(radii, start=1)}}


def relearning(
    idx: ValueIndex,
    row: str,
    metric: str,
    threat: str,
    steps: Sequence[int],
    threshold: float | None,
    xs: Sequence[float] | None = None,
) -> tuple[dict[Unit, float], dict[Unit, int | None]]:
    """Per unit (unlearning seed, attack seed) of ``row``: the area under ``metric`` over the
    attack (step 0 = that unlearning seed's pre-fine-tuning value) and the first step above
    ``threshold`` (see :mod:`.stats`). Units missing a step are left out. ``xs``: the
    position of each step on the x axis (a perturb threat's radii), default the steps."""
    pre = idx.get(row, metric, None, 0)
    post = [idx.get(row, metric, threat, s) for s in steps]
    areas: dict[Unit, float] = {}
    firsts: dict[Unit, int | None] = {}
    if not steps or not post[-1]:
        return areas, firsts
    for unit in post[-1]:
        useed, _ = unit
        if (useed, None) not in pre or any(unit not in p for p in post):
            continue
        at = steps if xs is None else xs
        pts = [(0, pre[(useed, None)])] + [(x, p[unit]) for x, p in zip(at, post)]
        areas[unit] = area_under(pts)
        if threshold is not None:
            firsts[unit] = first_exceeding(pts, threshold)
    return areas, firsts


def build_table(
    results: Sequence[EvalResult],
    rows: Sequence[str] | None = None,
    threats: Mapping[str, Mapping[str, Any]] | None = None,
    all_steps: bool = False,
    resurgence: Mapping[str, Any] | None = None,
    reference: str = REFERENCE_ROW,
) -> dict[str, Any]:
    """The table as JSON-able data: columns, one entry per row with its cells and its paired
    differences to the reference row, the metric definitions, the per-step curves, the
    evaluation sizes and the resurgence shares (``resurgence``: the spec's
    ``report.resurgence``, :mod:`.resurgence`; default: ½ × the original's pre-FT value). ``all_steps``: a post-fine-tuning column for every evaluation step of
    each threat (id ``metric/threat@step``), not only the last (id ``metric/threat``).
    Relearning columns: ``metric/threat/area`` and ``metric/threat/first``. ``reference``:
    the row method rows are paired with (``report.reference``)."""
    rows = list(rows) if rows else list(dict.fromkeys(r.row for r in results))
    if threats is None:
        names = dict.fromkeys(r.threat for r in results if r.threat)
        threats = {t: {} for t in names}
    info = metric_info(results)
    safety, utility = metric_roles(info)
    idx = ValueIndex(results)

    steps_of = {t: sorted({r.step for r in results if r.threat == t}) for t in threats}
    last_step = {}
    for t, meta in threats.items():
        last_step[t] = max(meta.get("eval_at") or steps_of[t] or [0])
    # a perturb threat (meta ``radii``): step k is its k-th radius, and x is the radius
    radius_of = {t: radius_map(meta) for t, meta in threats.items()}

    def at_x(t: str, steps: Sequence[int]) -> list[float] | None:
        return [radius_of[t][s] for s in steps] if radius_of[t] else None

    columns: list[dict[str, Any]] = []
    for m in safety:
        columns.append({"id": f"{m}/pre", "kind": "value", "metric": m, "threat": None, "step": 0})
        for t in threats:
            shown = [last_step[t]]
            if all_steps:
                shown = sorted(set(steps_of[t]) | {last_step[t]})
            for s in shown:
                cid = f"{m}/{t}" if s == last_step[t] else f"{m}/{t}@{s}"
                col = {"id": cid, "kind": "value", "metric": m, "threat": t, "step": s}
                if radius_of[t]:
                    col["radius"] = radius_of[t].get(s)
                columns.append(col)
    for m in safety:
        for t in threats:
            for kind in ("area", "first"):
                col = {
                    "id": f"{m}/{t}/{kind}",
                    "kind": kind,
                    "metric": m,
                    "threat": t,
                    "step": last_step[t],
                }
                if radius_of[t]:
                    col["radius"] = radius_of[t].get(last_step[t])
                columns.append(col)
    for m in utility:
        columns.append({"id": f"{m}/pre", "kind": "value", "metric": m, "threat": None, "step": 0})

    def threshold(row: str, metric: str, fraction: float = 0.5) -> float | None:
        orig = row if row.split("/")[-1] == ORIGINAL_ROW else sibling(row, ORIGINAL_ROW, rows)
        vals = list(idx.get(orig, metric, None, 0).values()) if orig else []
        return fraction * sum(vals) / len(vals) if vals else None

    res_spec = dict(resurgence or {})

    def resurgence_threshold(row: str, metric: str) -> float | None:
        if res_spec.get("threshold") is not None:
            return float(res_spec["threshold"])
        return threshold(row, metric, float(res_spec.get("relative", 0.5)))

    relearn: dict[tuple[str, str, str], tuple[dict, dict]] = {}
    for row in rows:
        for m in safety:
            for t in threats:
                relearn[(row, m, t)] = relearning(
                    idx, row, m, t, steps_of[t], threshold(row, m), at_x(t, steps_of[t])
                )

    def unit_values(row: str, c: Mapping[str, Any]) -> dict[Unit, Any]:
        if c["kind"] == "area":
            return relearn[(row, c["metric"], c["threat"])][0]
        if c["kind"] == "first":
            return relearn[(row, c["metric"], c["threat"])][1]
        return idx.get(row, c["metric"], c["threat"], c["step"])

    table_rows = []
    for row in rows:
        cells, diffs = {}, {}
        ref = reference_row(row, rows, reference)
        for c in columns:
            vals = unit_values(row, c)
            if c["kind"] == "first":
                cell = first_step_summary(list(vals.values()), c.get("radius", c["step"]))
                cell["threshold"] = threshold(row, c["metric"])
            else:
                cell = summary(list(vals.values()), bounds_of(c["metric"]))
            cell["units"] = [list(u) for u in vals]
            cells[c["id"]] = cell
            if ref is not None:
                other = unit_values(ref, c)
                if c["kind"] == "first":
                    diffs[c["id"]] = paired_first(vals, other)
                else:
                    diffs[c["id"]] = paired(vals, other, bounds_of(c["metric"], difference=True))
        entry: dict[str, Any] = {"row": row, "cells": cells}
        if ref is not None:
            entry["reference"] = ref
            entry["diff"] = diffs
        table_rows.append(entry)

    resurged = resurgence_table(
        idx.get,
        rows,
        safety,
        {t: steps_of[t] for t in threats},
        resurgence_threshold,
        lambda row, m, t: relearn[(row, m, t)][0],
        lambda row: reference_row(row, rows, reference),
    )

    curves = {}
    for m in safety:
        for t in threats:
            per_row = {}
            for row in rows:
                pts = []
                for step, threat in [(0, None)] + [(s, t) for s in steps_of[t]]:
                    vals = list(idx.get(row, m, threat, step).values())
                    if vals:
                        pts.append({"step": step, **summary(vals, bounds_of(m))})
                        if radius_of[t]:
                            pts[-1]["radius"] = radius_of[t].get(step, 0.0)
                per_row[row] = pts
            curves[f"{m}/{t}"] = {"metric": m, "threat": t, "rows": per_row}
            if radius_of[t]:
                curves[f"{m}/{t}"]["x"] = "radius"
    return {
        "rows": rows,
        "threats": {t: {"last_step": last_step[t], **dict(threats[t])} for t in threats},
        "columns": columns,
        "table": table_rows,
        "metrics": info,
        "curves": curves,
        "evaluation_n": evaluation_sizes(results),
        "resurgence": resurged,
        "ci": "two-sided 95% Student-t interval of the mean over units (unlearning seed x "
        "attack seed), clipped to [0, 1] for rates; paired differences: t-interval of the "
        "per-unit differences, clipped to [-1, 1] for rates",
    }


def evaluation_sizes(results: Iterable[EvalResult]) -> dict[str, dict[str, Any]]:
    """Per metric: the numbers of images its values were computed from (``n`` in
    metrics.json) and, for rates, the largest binomial standard error of one evaluation,
    sqrt(p(1−p)/n) at p = 0.5, for the smallest n."""
    ns: dict[str, set[int]] = {}
    for r in results:
        for m, v in r.metrics.items():
            if v.get("n") is not None:
                ns.setdefault(m, set()).add(int(v["n"]))
    out = {}
    for m, vals in ns.items():
        entry: dict[str, Any] = {"n": sorted(vals)}
        if m in RATE_METRICS and min(vals) > 0:
            entry["max_binomial_se"] = 0.5 / math.sqrt(min(vals))
        out[m] = entry
    return out


def table_metrics(table: Mapping[str, Any]) -> dict[str, float]:
    """The relearning summaries as flat MLflow metrics: for each row, safety metric and
    threat, ``relearn_area.<metric>.<threat>.<row>`` (mean, ``.lo``, ``.hi``, ``.n``),
    ``first_relearn_step.<metric>.<threat>.<row>`` (the lower median, when not censored)
    and ``.relearned`` (the share of units that relearned), and the paired difference to the
    reference row ``relearn_area_diff.<metric>.<threat>.<row>`` (mean, ``.lo``, ``.hi``,
    ``.n``)."""
    out: dict[str, float] = {}

    def safe(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9_\-. /]", "_", text)

    for r in table["table"]:
        for c in table["columns"]:
            if c["kind"] == "value":
                continue
            cell = r["cells"][c["id"]]
            tail = safe(f"{c['metric']}.{c['threat']}.{r['row']}")
            if c["kind"] == "area" and cell["n"]:
                out[f"relearn_area.{tail}"] = cell["mean"]
                out[f"relearn_area.{tail}.n"] = float(cell["n"])
                if cell["lo"] is not None:
                    out[f"relearn_area.{tail}.lo"] = cell["lo"]
                    out[f"relearn_area.{tail}.hi"] = cell["hi"]
                d = (r.get("diff") or {}).get(c["id"])
                if d and d["n"]:
                    out[f"relearn_area_diff.{tail}"] = d["mean"]
                    out[f"relearn_area_diff.{tail}.n"] = float(d["n"])
                    if d["lo"] is not None:
                        out[f"relearn_area_diff.{tail}.lo"] = d["lo"]
                        out[f"relearn_area_diff.{tail}.hi"] = d["hi"]
            elif c["kind"] == "first" and cell["n"] and cell.get("threshold") is not None:
                if cell["median"] is not None:
                    out[f"first_relearn_step.{tail}"] = float(cell["median"])
                out[f"first_relearn_step.{tail}.relearned"] = cell["relearned"] / cell["n"]
    return out


def bound_text(c: Mapping[str, Any]) -> str:
    if c.get("min") is not None:
        return f"{c['metric']} ≥ {c['min']:g}"
    return f"{c['metric']} ≤ {c['max']:g}"


def add_worst_case(table: dict[str, Any], searches: Sequence[Mapping[str, Any]]) -> None:
    """Add a worst-case column per searched threat (id ``<metric>/<threat>/worst``, kind
    ``worst``) to ``table``: per row, over its studies (one per unlearning seed, the units),
    the highest objective among trials within the utility bound, with the paired difference
    to the reference row (same unlearning seed). A study without a trial within the bound
    gives no unit. The studies themselves go to ``table["searches"]``."""
    rows = table["rows"]
    cols: list[dict[str, Any]] = []
    for s in searches:
        cid = f"{s['objective']}/{s['threat']}/worst"
        if all(c["id"] != cid for c in cols):
            cols.append(
                {"id": cid, "kind": "worst", "metric": s["objective"], "threat": s["threat"],
                 "step": None, "bound": bound_text(s["constraint"]),
                 "budget": s["budget"], "sampler": s["sampler"], "seed": s["seed"]}
            )  # fmt: skip
    # after the objective metric's own value columns (pre-FT and fixed threats)
    same = [i for i, c in enumerate(table["columns"])
            if c["kind"] == "value" and cols and c["metric"] == cols[0]["metric"]]  # fmt: skip
    at = same[-1] + 1 if same else len(table["columns"])
    table["columns"][at:at] = cols

    def units(row: str, c: Mapping[str, Any]) -> dict[Unit, float]:
        return {
            (s["unlearn_seed"], None): float(s["best"]["objective"])
            for s in searches
            if s["row"] == row and s["threat"] == c["threat"] and s["objective"] == c["metric"]
            and s["best"] is not None
        }  # fmt: skip

    for r in table["table"]:
        for c in cols:
            vals = units(r["row"], c)
            cell = summary(list(vals.values()), bounds_of(c["metric"]))
            cell["units"] = [list(u) for u in vals]
            r["cells"][c["id"]] = cell
            if r.get("reference"):
                other = units(r["reference"], c)
                r["diff"][c["id"]] = paired(vals, other, bounds_of(c["metric"], difference=True))
    known = set(rows)
    table["searches"] = [dict(s) for s in searches if s["row"] in known]


__all__ = [
    "ValueIndex",
    "add_worst_case",
    "bound_text",
    "build_table",
    "evaluation_sizes",
    "metric_info",
    "radius_map",
    "relearning",
    "table_metrics",
]
