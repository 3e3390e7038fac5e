"""Utility-matched comparison: relearning against utility, one curve per method.

Input: evaluation results of several rows that unlearn with the same method at different
strengths (a grid template's cells; :func:`resalign.reporting.report_for_grid` groups them by
their unlearn row's label). For each method and strength point: x = a utility metric before
fine-tuning (retain accuracy; a second panel for classifier FID when it was measured),
y = the relearning area of the safety metric over one threat (:mod:`.stats`), each with its
mean, 95 % interval (t, clipped to [0, 1] for rates) and n.

The number (per method against the reference ``plain``, per x metric): for each (unlearning
seed, attack seed) pair that both methods have, each method's relearning area is
interpolated linearly in x across its strength points (x of that unlearning seed, area of
that pair), the difference method − reference is averaged over the x range both curves of
that pair span (exactly: the difference is linear between the union of their x points), and
a Student-t interval is taken over the pairs (clipped to [−1, 1] for rates), and, more
conservatively, over the unlearning seeds (each seed's pairs averaged first: pairs that share
an unlearned model are not independent). Pairs whose
ranges do not overlap are left out and counted. The sentence also gives the common range of
the mean curves. There is no extrapolation: outside a method's range nothing is compared.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text as atomic_text
from ..errors import UserError
from .figure import save_png
from .report.results import EvalResult
from .report.rows import REFERENCE_ROW
from .report.table import ValueIndex, relearning
from .stats import bounds_of, by_unlearn_seed, mean_gap_over_common_range, summary


def build_frontier(
    results: Sequence[EvalResult],
    groups: Mapping[str, Sequence[tuple[str, str]]],
    threat: str,
    metric: str,
    x_metrics: Sequence[str],
    reference: str | None = None,
) -> dict[str, Any]:
    """The frontier as JSON-able data. ``groups``: method → [(row name, strength label)];
    ``reference``: the method the others are compared with (``report.reference``; None: its
    default, ``plain``)."""
    reference = reference or REFERENCE_ROW
    idx = ValueIndex(results)
    steps = sorted({r.step for r in results if r.threat == threat})
    if not steps:
        raise UserError(
            f"frontier: no evaluation after threat {threat!r}",
            hint="choose a threat with --threat (one the grid's cells run)",
        )
    ybounds = bounds_of(metric)
    methods: dict[str, list[dict[str, Any]]] = {}
    per_row: dict[str, tuple[dict, dict[str, dict]]] = {}
    for method, rows in groups.items():
        pts = []
        for row, strength in rows:
            areas, _ = relearning(idx, row, metric, threat, steps, None)
            xs = {xm: idx.get(row, xm, None, 0) for xm in x_metrics}
            per_row[row] = (areas, xs)
            pts.append(
                {
                    "row": row,
                    "strength": strength,
                    "y": {**summary(list(areas.values()), ybounds), "units": [*map(list, areas)]},
                    "x": {xm: summary(list(v.values()), bounds_of(xm)) for xm, v in xs.items()},
                }
            )
        methods[method] = pts

    ref = reference if reference in methods else None
    comparisons = []
    for method in methods:
        if ref is None or method == ref:
            continue
        for xm in x_metrics:
            comparisons.append(
                _compare(method, ref, groups, per_row, methods, xm, metric, threat, ybounds)
            )
    return {
        "threat": threat,
        "metric": metric,
        "x_metrics": list(x_metrics),
        "last_step": steps[-1],
        "methods": methods,
        "reference": ref,  # None: no method row of that name
        "reference_row": reference,
        "comparisons": comparisons,
        "method": (
            "per (unlearning seed, attack seed) pair: each method's relearning area "
            "interpolated linearly in x over its strength points, the difference averaged over "
            "the x range both span, Student-t interval over the pairs"
        ),
    }


def matched_transfer(
    results: Sequence[EvalResult],
    groups: Mapping[str, Sequence[tuple[str, str]]],
    threats: Sequence[str],
    metric: str,
    x_metric: str,
    reference: str | None = None,
) -> dict[str, Any] | None:
    """The transfer view's utility-matched entries (issue 20.5): for every method (an unlearn
    row label of ``groups``) other than the reference that a grid ran at two or more strengths,
    and every threat, the frontier comparison of :func:`build_frontier` against the reference
    rows *of the same cells* (one per strength, so each curve is a function of its strength):
    ``{"metric", "x_metric", "threats", "rows": [{"row", "reference", "strengths",
    "matched": {threat: difference}}]}``, a difference as the frontier's (mean, interval over
    pairs, ``by_unlearn_seed``) plus its ``range`` and ``pairs_without_common_range``. None
    when no method has two strengths and a reference to compare with."""
    reference = reference or REFERENCE_ROW
    ref_rows = dict((cell, row) for row, cell in groups.get(reference, ()))
    out = []
    for method, rows in groups.items():
        mine = [(row, cell) for row, cell in rows if cell in ref_rows]
        if method == reference or len(mine) < 2:
            continue
        pairs = {method: mine, reference: [(ref_rows[c], c) for _, c in mine]}
        matched = {}
        for threat in threats:
            front = build_frontier(results, pairs, threat, metric, [x_metric], reference)
            (c,) = front["comparisons"]
            matched[threat] = {
                **c["difference"],
                "range": c["mean_curves"]["range"] if c["mean_curves"] else None,
                "pairs_without_common_range": len(c["pairs_without_common_range"]),
            }
        out.append({"row": method, "reference": reference,
                    "strengths": [c for _, c in mine], "matched": matched})  # fmt: skip
    if not out:
        return None
    return {"metric": metric, "x_metric": x_metric, "threats": list(threats), "rows": out}


def _curve(pts: Sequence[Mapping[str, Any]], xm: str) -> tuple[list[float], list[float]]:
    ok = [p for p in pts if p["x"][xm]["n"] and p["y"]["n"]]
    return [p["x"][xm]["mean"] for p in ok], [p["y"]["mean"] for p in ok]


def _compare(
    method: str,
    ref: str,
    groups: Mapping[str, Sequence[tuple[str, str]]],
    per_row: Mapping[str, tuple[dict, dict]],
    methods: Mapping[str, Sequence[Mapping[str, Any]]],
    xm: str,
    metric: str,
    threat: str,
    ybounds: tuple[float, float] | None,
) -> dict[str, Any]:
    def pair_curve(m: str, unit: tuple) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for row, _ in groups[m]:
            areas, x = per_row[row]
            if unit in areas and (unit[0], None) in x[xm]:
                xs.append(x[xm][(unit[0], None)])
                ys.append(areas[unit])
        return xs, ys

    units = sorted(
        {u for row, _ in groups[method] for u in per_row[row][0]}
        & {u for row, _ in groups[ref] for u in per_row[row][0]},
        key=lambda u: (u[0] is None, u[0] or 0, u[1] is None, u[1] or 0),
    )
    gaps: dict[tuple, float] = {}
    ranges, no_overlap = [], []
    for unit in units:
        a, b = pair_curve(method, unit), pair_curve(ref, unit)
        got = mean_gap_over_common_range(a, b) if a[0] and b[0] else None
        if got is None:
            no_overlap.append(list(unit))
            continue
        gaps[unit] = got[0]
        ranges.append(list(got[1]))
    dbounds = None if ybounds is None else (-1.0, 1.0)
    diff = summary(list(gaps.values()), dbounds)
    diff["by_unlearn_seed"] = by_unlearn_seed(gaps, dbounds)
    mean_curves = mean_gap_over_common_range(_curve(methods[method], xm), _curve(methods[ref], xm))
    out = {
        "method": method,
        "reference": ref,
        "x_metric": xm,
        "difference": diff,
        "pair_ranges": ranges,
        "pairs_without_common_range": no_overlap,
        "mean_curves": None
        if mean_curves is None
        else {"gap": mean_curves[0], "range": list(mean_curves[1])},
    }
    out["sentence"] = _sentence(out, methods, metric, threat)
    return out


def _span(pts: Sequence[Mapping[str, Any]], xm: str) -> str:
    xs = _curve(pts, xm)[0]
    return f"{min(xs):.3f}–{max(xs):.3f}" if xs else "no points"


def _sentence(c: Mapping[str, Any], methods: Mapping[str, Any], metric: str, threat: str) -> str:
    m, ref, xm, d = c["method"], c["reference"], c["x_metric"], c["difference"]
    what = f"relearning area of {metric} under {threat}"
    if not d["n"]:
        return (
            f"{xm}: {m} and {ref} reach no common {xm} range (means: {m} "
            f"{_span(methods[m], xm)}, {ref} {_span(methods[ref], xm)}; no (unlearning seed, "
            "attack seed) pair overlaps), so no utility-matched comparison is possible: widen "
            "the unlearning-strength axis."
        )
    rng = c["mean_curves"]["range"] if c["mean_curves"] else None
    where = (
        f"over {xm} {rng[0]:.3f}–{rng[1]:.3f}" if rng else f"over the {xm} range each pair shares"
    )
    mean = d["mean"]
    who = (
        f"{m} relearns less than {ref}"
        if mean < 0
        else f"{m} relearns more than {ref}"
        if mean > 0
        else f"{m} and {ref} relearn the same"
    )
    text = (
        f"{where.capitalize()} (reached by both methods), {who}: {what}, {m} − {ref} = {mean:+.3f}"
    )
    if d["lo"] is not None:
        text += (
            f", paired 95% t-interval [{d['lo']:+.3f}, {d['hi']:+.3f}] over n = {d['n']} "
            "(unlearning seed, attack seed) pairs"
        )
        k = d.get("by_unlearn_seed")
        if k and k.get("lo") is not None:
            text += (
                f"; over the k = {k['n']} unlearning seeds (each seed's pairs averaged) "
                f"[{k['lo']:+.3f}, {k['hi']:+.3f}]"
            )
        if d["lo"] <= 0 <= d["hi"] or (k and k.get("lo") is not None and k["lo"] <= 0 <= k["hi"]):
            text += "; an interval includes 0, so no difference is established"
    else:
        text += f" (n = {d['n']} pair: no interval)"
    text += (
        ". Per pair, each method's area is interpolated linearly in "
        f"{xm} across its strength points and the difference averaged over the range both reach"
    )
    if c["pairs_without_common_range"]:
        text += (
            f"; {len(c['pairs_without_common_range'])} pair(s) had no common range and are left out"
        )
    return text + "."


def plot_frontier(front: Mapping[str, Any], path: Path) -> None:
    """One panel per x metric: relearning area against it, a line per method through its
    strength points (sorted by x), 95% intervals on both axes, points labelled by strength."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xms = front["x_metrics"]
    fig, axes = plt.subplots(1, len(xms), figsize=(6 * len(xms), 4.5), squeeze=False)
    for ax, xm in zip(axes.flat, xms):
        for method, pts in front["methods"].items():
            ok = sorted(
                (p for p in pts if p["x"][xm]["n"] and p["y"]["n"]),
                key=lambda p: p["x"][xm]["mean"],
            )
            if not ok:
                continue
            xs = [p["x"][xm]["mean"] for p in ok]
            ys = [p["y"]["mean"] for p in ok]

            def err(cells: list[Mapping[str, Any]]) -> list[list[float]]:
                return [
                    [c["mean"] - (c["lo"] if c["lo"] is not None else c["mean"]) for c in cells],
                    [(c["hi"] if c["hi"] is not None else c["mean"]) - c["mean"] for c in cells],
                ]

            ax.errorbar(
                xs,
                ys,
                xerr=err([p["x"][xm] for p in ok]),
                yerr=err([p["y"] for p in ok]),
                marker="o",
                capsize=3,
                label=method,
            )
            for p, x, y in zip(ok, xs, ys):
                ax.annotate(
                    p["strength"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points"
                )
        ax.set_xlabel(f"{xm} before fine-tuning")
        ax.set_ylabel(f"relearning area of {front['metric']} (0–{front['last_step']})")
        if bounds_of(front["metric"]) is not None:
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{front['threat']}: relearning vs {xm}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_png(fig, path)


def write_frontier(front: Mapping[str, Any], out: Path) -> list[str]:
    """Write ``frontier.json``, ``frontier.png`` and ``frontier.md`` (the sentences) to
    ``out``; returns the sentences."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def clean(o: Any) -> Any:  # NaN is not JSON
        if isinstance(o, float) and math.isnan(o):
            return None
        if isinstance(o, Mapping):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [clean(v) for v in o]
        return o

    atomic_text(out / "frontier.json", json.dumps(clean(front), indent=2, default=str))
    plot_frontier(front, out / "frontier.png")
    sentences = [c["sentence"] for c in front["comparisons"]]
    if not sentences:
        sentences = [
            f"No comparison: the frontier needs a method row named "
            f"'{front.get('reference_row') or REFERENCE_ROW}' and one "
            f"other method (methods: {', '.join(front['methods']) or 'none'})."
        ]
    md = ["# Frontier", "", "![frontier](frontier.png)", "", *(s + "\n" for s in sentences)]
    atomic_text(out / "frontier.md", "\n".join(md))
    return sentences
