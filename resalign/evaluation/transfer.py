"""The transfer view (issue 20): what a row simulated × which attack it faced.

A grid whose cells vary ResAlign's simulated fine-tune (templates/transfer_digits.yaml.j2)
reports one table row per cell; this view pivots the table's paired differences to plain so
that rows are the cells (what was simulated), columns the attacks, and each entry the paired
difference in relearning area of the safety metric (the report's ``<metric>/<threat>/area``
cell, same unlearning and attack seeds as plain, interval over pairs and over unlearning
seeds), with the paired difference of each utility metric before fine-tuning beside it: the
entries compare the methods at the cell's own utility, so a cell whose utility interval
excludes 0 is read with the frontier, not alone. Nothing is recomputed: every number is one
of the table's own.

When the grid also varies the unlearning strength, ``resalign report`` passes the
utility-matched entries (:func:`resalign.evaluation.frontier.matched_transfer`, computed where
the frontier is): a second table whose rows are the simulated configurations (the unlearn row
labels) and whose entries are the frontier's difference to plain at equal utility, the number
the issue asks for; this module only lays them out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


def transfer_view(
    table: Mapping[str, Any], matched: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """``{"metric", "threats", "utility", "rows": [{"row", "reference", "area": {threat:
    diff}, "utility": {metric: diff}}], "matched": matched}`` for the first safety metric, or
    None when the table has fewer than two method rows or fewer than two threats (nothing to
    pivot) and there are no utility-matched entries."""
    methods = [r for r in table["table"] if r.get("reference")]
    threats = list(table["threats"])
    areas = [c for c in table["columns"] if c["kind"] == "area"]
    if len(methods) < 2 or len(threats) < 2 or not areas:
        if not matched:
            return None
        methods = []
    metric = areas[0]["metric"] if areas else matched["metric"]  # type: ignore[index]
    utility = [
        c["metric"]
        for c in table["columns"]
        if c["kind"] == "value" and c["threat"] is None
        and table["metrics"].get(c["metric"], {}).get("role") == "utility"
    ]  # fmt: skip
    rows = []
    for r in methods:
        diff = r.get("diff") or {}
        rows.append(
            {
                "row": r["row"],
                "reference": r["reference"],
                "area": {t: diff.get(f"{metric}/{t}/area") for t in threats},
                "utility": {m: diff.get(f"{m}/pre") for m in utility},
            }
        )
    return {"metric": metric, "threats": threats, "utility": utility, "rows": rows,
            "matched": matched or None}  # fmt: skip


def transfer_markdown(
    view: Mapping[str, Any], fmt_diff: Callable[[Mapping[str, Any] | None], str]
) -> str:
    """The view as a markdown table (entries written by the report's ``fmt_diff``)."""
    head = (
        ["simulated (row)"]
        + [f"Δ relearning area, {t}" for t in view["threats"]]
        + [f"Δ {m} pre-FT" for m in view["utility"]]
    )
    lines = []
    if view["rows"]:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in view["rows"]:
        cells = [fmt_diff(r["area"][t]) for t in view["threats"]]
        cells += [fmt_diff(r["utility"][m]) for m in view["utility"]]
        lines.append("| " + " | ".join([f"{r['row']} − {r['reference']}", *cells]) + " |")
    m = view.get("matched")
    if m:
        if lines:
            lines.append("")
        head = ["simulated (method)", "strengths"] + [
            f"Δ relearning area at equal {m['x_metric']}, {t}" for t in m["threats"]
        ]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in m["rows"]:
            cells = [_matched_cell(r["matched"].get(t), fmt_diff) for t in m["threats"]]
            name = f"{r['row']} − {r['reference']}"
            lines.append("| " + " | ".join([name, ", ".join(r["strengths"]), *cells]) + " |")
    return "\n".join(lines)


def _matched_cell(d: Mapping[str, Any] | None, fmt_diff: Callable[[Any], str]) -> str:
    if not d or not d.get("n"):
        return "no common range"
    rng = d.get("range")
    where = f" over {rng[0]:.3f}–{rng[1]:.3f}" if rng else ""
    left = d.get("pairs_without_common_range") or 0
    return fmt_diff(d) + where + (f" ({left} pair(s) without a common range)" if left else "")


def transfer_note(view: Mapping[str, Any]) -> str:
    return (
        f"Transfer view: each entry is the row's paired difference to its reference (plain, "
        f"same unlearning and attack seeds) in the relearning area of {view['metric']} under "
        "that attack (negative: relearns less than plain), with its t-interval over the pairs "
        "and 'by seed' over the unlearning seeds; the last columns are the paired utility "
        "differences before fine-tuning. Entries compare at each row's own utility: where a "
        "utility interval excludes 0 the rows sit at different utility (see the frontier)."
        + _matched_note(view.get("matched"))
    )


def _matched_note(m: Mapping[str, Any] | None) -> str:
    if not m:
        return ""
    x = m["x_metric"]
    return (
        f" The second table compares at equal {x}: per method (what it simulated, over the "
        "strengths it ran), the frontier's paired difference to the reference rows of the "
        f"same cells, each pair's areas interpolated linearly in {x} across the strengths and "
        "averaged over the range both reach (shown: that of the mean curves), with the "
        "intervals over pairs and by unlearning seed; 'no common range' where the curves do "
        "not overlap in utility."
    )


__all__ = ["transfer_markdown", "transfer_note", "transfer_view"]
