"""Rendering: a built table (:mod:`.table`) as text, report.md and report.html.

Cell and column texts (:func:`fmt`, :func:`fmt_diff`, :func:`column_title`), the notes under
the table (:func:`notes`, :func:`oracle_notes`), the metric definitions, the attacker-search
section, and the two pages (:func:`markdown_page`, :func:`html_page`). The transfer,
resurgence and predictor sections' texts are their modules' own
(:mod:`..transfer`, :mod:`..resurgence`, :mod:`..predictors`). Nothing here computes a
number the table does not hold, nor draws a figure (:mod:`.plots`).
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..dynamics import dynamics_markdown, dynamics_note
from ..resurgence import resurgence_markdown, resurgence_note
from ..transfer import transfer_markdown, transfer_note
from .rows import ORACLE_ROW, sibling


def at_text(c: Mapping[str, Any]) -> str:
    """Where a column's value sits on its threat: ``radius r`` (perturb) or ``step n``."""
    if c.get("radius") is not None:
        return f"radius {c['radius']:g}"
    return f"step {c['step']}"


def _num(v: float, digits: int) -> str:
    return f"{v:.{digits}f}"


def fmt(cell: Mapping[str, Any] | float, ci: float | None = None) -> str:
    """A cell as text: ``mean [lo, hi] n=k`` (value and area cells), ``median (k/n relearned)``
    or ``> last (0/n)`` (first-step cells). A bare number (and half-width) is still accepted."""
    if not isinstance(cell, Mapping):
        mean = float(cell)
        if mean != mean:
            return "–"
        d = 4 if abs(mean) < 10 else 2
        return f"{mean:.{d}f}" + ("" if ci is None else f" ± {ci:.{d}f}")
    if "median" in cell:
        if not cell["n"] or cell.get("threshold") is None:
            return "–"
        med = cell["median"]
        when = f"> {cell['last_step']}" if med is None else str(med)
        return f"{when} ({cell['relearned']}/{cell['n']} relearned)"
    if not cell["n"] or cell["mean"] is None:
        return "–"
    mean = cell["mean"]
    d = 3 if abs(mean) < 10 else 2
    text = _num(mean, d)
    if cell.get("lo") is not None:
        text += f" [{_num(cell['lo'], d)}, {_num(cell['hi'], d)}]"
    return f"{text} n={cell['n']}"


def fmt_diff(d: Mapping[str, Any] | None) -> str:
    """A paired difference: ``+mean [lo, hi] n=k`` (then ``; by seed [lo, hi] k=j``, the interval
    over unlearning seeds, when there are several), or for first steps
    ``later a / earlier b / tied c`` (sign test p)."""
    if not d or not d["n"]:
        return "–"
    if "later" in d:
        p = "" if d["sign_test_p"] is None else f", p={d['sign_test_p']:.2f}"
        return f"later {d['later']} / earlier {d['earlier']} / tied {d['tied']}{p}"
    d_ = 3 if abs(d["mean"]) < 10 else 2
    text = f"{d['mean']:+.{d_}f}"
    if d.get("lo") is not None:
        text += f" [{d['lo']:+.{d_}f}, {d['hi']:+.{d_}f}]"
    text += f" n={d['n']}"
    k = d.get("by_unlearn_seed")
    if k and k.get("lo") is not None:
        text += f"; by seed [{k['lo']:+.{d_}f}, {k['hi']:+.{d_}f}] k={k['n']}"
    return text


def column_title(c: Mapping[str, Any], info: Mapping[str, Any]) -> str:
    arrow = {"lower": "↓", "higher": "↑"}.get(info.get(c["metric"], {}).get("better"), "")
    kind = c.get("kind", "value")
    if kind == "worst":
        return f"worst-case {c['metric']} {arrow} over searched {c['threat']} ({c['bound']})"
    if kind == "area" and c.get("radius") is not None:
        return (
            f"relearning area of {c['metric']} {arrow} over radius, {c['threat']} "
            f"(0–{c['radius']:g})"
        )
    if kind == "area":
        return f"relearning area of {c['metric']} {arrow} over {c['threat']} (0–{c['step']})"
    if kind == "first":
        what = "radius" if c.get("radius") is not None else "step"
        return f"first {what} {c['metric']} > ½·original pre-FT, {c['threat']}"
    when = "pre-FT" if c["threat"] is None else f"after {c['threat']} ({at_text(c)})"
    return f"{c['metric']} {arrow} {when}".replace("  ", " ")


def _display_rows(table: Mapping[str, Any]) -> list[tuple[str, list[str]]]:
    """(label, cell texts) per line: each row, and below a method row its paired difference."""
    cols = table["columns"]
    lines = []
    for r in table["table"]:
        lines.append((r["row"], [fmt(r["cells"][c["id"]]) for c in cols]))
        if r.get("reference"):
            label = f"Δ {r['row']} − {r['reference']} (paired)"
            lines.append((label, [fmt_diff(r["diff"].get(c["id"])) for c in cols]))
    return lines


def markdown_table(table: Mapping[str, Any]) -> str:
    cols = table["columns"]
    head = ["model"] + [column_title(c, table["metrics"]) for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, cells in _display_rows(table):
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)


def notes(table: Mapping[str, Any]) -> list[str]:
    """What the cells are, as sentences under the table."""
    refs = list(dict.fromkeys(r["reference"] for r in table["table"] if r.get("reference")))
    # a grid report pairs each cell's rows with that cell's own reference row
    names = sorted({r.rsplit("/", 1)[-1] for r in refs})
    own = f"its cell's {names[0]}" if len(names) == 1 else "its cell's reference row"
    ref = refs[0] if len(refs) == 1 else (f"the row it names ({own})" if refs else None)
    # a spec whose threats are all searched has no fixed attack in the table (the search
    # table below reports the trials); "attack seeds []" read as if nothing had been attacked
    seeds = table.get("seeds") or "none outside the searches"
    out = [
        f"Cells: mean [95% interval] n, over units: (unlearning seed, attack seed) pairs after "
        f"fine-tuning, unlearning seeds before it (original, oracle: attack seeds). Unlearning "
        f"seeds {table.get('unlearn_seeds', [])}, attack seeds {seeds}. Interval: "
        "Student t over the units, clipped to [0, 1] for rates (concept_rate, retain_accuracy, "
        "nudenet_ip, mhsc_us, q16_rate); none for n = 1.",
        "Relearning area: trapezoid area under the safety metric against the attack step over "
        "[0, last evaluated step] (step 0: the same unlearning seed's pre-FT value), divided by "
        "the last step, per unit. First step: the first evaluated step at which the metric "
        "exceeds half of the original model's pre-FT value, lower median over units "
        "('> last' when that median never relearned within the attack), with the number of "
        "units that relearned.",
    ]
    perturbed = [t for t, meta in table["threats"].items() if meta.get("radii")]
    if perturbed:
        out.append(
            f"Perturbation threats ({', '.join(perturbed)}): no fine-tuning; the row's weights "
            "moved along a seeded direction by radius r relative to their norm "
            "(‖θ'−θ‖ = r·‖θ‖, per tensor; resalign.algorithms.perturb), one evaluation per "
            "radius. Their columns and curves are against the radius, not a step: the "
            "relearning area is the area over radius [0, largest radius] (radius 0: the "
            "pre-FT value) divided by the largest radius, and the first column gives the "
            "first radius above half the original's pre-FT value."
        )
    if ref:
        out.append(
            f"Δ rows: paired difference to {ref} (same unlearning seed and attack seed; pre-FT: "
            "same unlearning seed), mean with a t-interval over the pairs (clipped to [−1, 1] "
            "for rates); with several unlearning seeds also 'by seed': each unlearning seed's "
            "mean difference, t-interval over the k unlearning seeds (pairs sharing an "
            "unlearned model are not independent: a difference is established only when this "
            "interval excludes 0 too); for first steps, pairs where the method relearns later "
            "/ earlier / tied, with the two-sided exact sign-test p over the untied pairs."
        )
    out += oracle_notes(table)
    ev = table.get("evaluation_n") or {}
    parts = [
        f"{m} from n = {', '.join(map(str, e['n']))} images (binomial SE ≤ "
        f"{e['max_binomial_se']:.3f})"
        for m, e in ev.items()
        if "max_binomial_se" in e
    ]
    if parts:
        out.append(
            "One evaluation: " + "; ".join(parts) + " — the standard error of a single value "
            "at p = 0.5, before any seed-to-seed variation."
        )
    return out


def _versus(cell: Mapping[str, Any], oracle: Mapping[str, Any]) -> str:
    """Where ``cell``'s 95 % interval lies against the oracle's: above it, below it,
    overlapping it, or no interval (n = 1 on either side)."""
    if cell.get("lo") is None or oracle.get("lo") is None:
        return "no interval (n = 1)"
    if cell["lo"] > oracle["hi"]:
        return "interval above the oracle's"
    if cell["hi"] < oracle["lo"]:
        return "interval below the oracle's"
    return "interval overlapping the oracle's"


def oracle_notes(table: Mapping[str, Any]) -> list[str]:
    """One sentence per oracle row, safety metric and threat that reads the oracle control
    at the threat's last evaluation step: the oracle's value (what the attack teaches a model
    that never learned the concept) and each other row of its cell as row − oracle, with the
    two cells' means, n and whether the 95 % intervals are disjoint. Only numbers of the
    table's own cells."""
    rows = table["rows"]
    by_row = {r["row"]: r["cells"] for r in table["table"]}
    out = []
    for orow in (r for r in rows if r.rsplit("/", 1)[-1] == ORACLE_ROW):
        others = [r for r in rows if r != orow and sibling(r, ORACLE_ROW, rows) == orow]
        for c in table["columns"]:
            if c["kind"] != "value" or c["threat"] is None:
                continue
            if c["step"] != table["threats"][c["threat"]]["last_step"]:
                continue
            oc = by_row[orow][c["id"]]
            if not oc["n"] or oc["mean"] is None:
                continue
            parts, where = [], {}
            for r in others:
                cell = by_row[r][c["id"]]
                if not cell["n"] or cell["mean"] is None:
                    continue
                parts.append(f"{r} {cell['mean'] - oc['mean']:+.3f} ({fmt(cell)})")
                where.setdefault(_versus(cell, oc), []).append(r)
            if not parts:
                continue
            spans = "; ".join(f"{', '.join(v)}: {k}" for k, v in where.items())
            out.append(
                f"Oracle control ({orow}: the same attack on a model pretrained without the "
                f"concept's items): after {c['threat']} ({at_text(c)}) it reaches "
                f"{c['metric']} {fmt(oc)} with no concept to recover; "
                f"row − oracle: {', '.join(parts)}. What a row reaches above the oracle is "
                f"the concept coming back, not learned anew (95 % t-intervals: {spans})."
            )
    return out


def _definition_rows(table: Mapping[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(metric, what it measures, role, computed by, images) per reported metric; the
    description is the metric kind's own (``spec.schema.evaluate.METRIC_DESCRIPTIONS``): one
    definition (a judge) may report several metrics, each measuring something else."""
    from ...spec.schema.evaluate import METRIC_DESCRIPTIONS

    ev = table.get("evaluation_n") or {}
    out = []
    for name, i in table["metrics"].items():
        what = (METRIC_DESCRIPTIONS.get(str(i.get("definition"))) or {}).get(name, "")
        role = f"{i.get('role') or 'safety'}, {i.get('better') or 'lower'} is better"
        by = f"{i.get('definition')} v{i.get('version')}"
        n = ", ".join(map(str, (ev.get(name) or {}).get("n", []))) or "–"
        out.append((name, what, role, by, n))
    return out


def _definition_params(table: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(definition and version, the metrics it reports, its parameters) once per definition."""
    seen: dict[str, tuple[list[str], str]] = {}
    for name, i in table["metrics"].items():
        by = f"{i.get('definition')} v{i.get('version')}"
        params = json.dumps(i.get("params"), sort_keys=True, default=str)
        seen.setdefault(by, ([], params))[0].append(name)
    return [(by, ", ".join(names), params) for by, (names, params) in seen.items()]


def _definitions_md(table: Mapping[str, Any]) -> str:
    lines = ["| metric | measures | role | computed by | images per evaluation |",
             "|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {' | '.join(r)} |" for r in _definition_rows(table)]
    lines += ["", "| definition | reports | parameters |", "|---|---|---|"]
    lines += [f"| {by} | {names} | `{params}` |" for by, names, params in _definition_params(table)]
    return "\n".join(lines)


def _img(path: Path) -> str:
    """An <img> with the PNG inline (a data: URI) and its file name as alt text."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"<img alt='{html.escape(path.name)}' src='data:image/png;base64,{data}'>"


def column_groups(table: Mapping[str, Any]) -> list[tuple[str, list[int]]]:
    """The table's columns by threat, for pages too narrow for all of them side by side:
    ("before fine-tuning", the pre-FT columns), then (threat, its columns) per threat."""
    groups: dict[str | None, list[int]] = {}
    for i, c in enumerate(table["columns"]):
        groups.setdefault(c.get("threat"), []).append(i)
    return [("before fine-tuning" if t is None else f"after {t}", ix) for t, ix in groups.items()]


_CSS = (
    "body{font-family:sans-serif;margin:2em;max-width:1400px}"
    "table{border-collapse:collapse;margin-bottom:1em;max-width:100%}"
    "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;overflow-wrap:anywhere}"
    "td{font-size:90%}th{text-align:left}img{max-width:100%;height:auto}"
    "figcaption{font-size:90%;color:#333}"
    # the resurgence, transfer and search sections are markdown tables in <pre>: wrapped, so
    # the page still fits a 1000-px window (tests/test_mlflow_browser.py)
    "pre{white-space:pre-wrap;overflow-wrap:anywhere;font-size:85%}"
)


@dataclass(frozen=True)
class Figures:
    """What the pages show besides the table, as written into the report's folder."""

    curves: Sequence[tuple[str, str]] = ()  # (metric, its <metric>_vs_steps.png)
    grids: str | None = None  # grids.png's caption; None when there is no grids.png
    resurgence_plot: bool = False  # resurgence_areas.png was drawn
    search_plot: bool = False  # search_best_so_far.png was drawn
    # the predictor section (markdown, HTML), resalign.evaluation.predictors.predictor_section
    predictors: tuple[str, str] = ("", "")


def markdown_page(table: Mapping[str, Any], title: str, figs: Figures) -> str:
    """report.md: the table, its notes, the transfer, resurgence, predictor, curve, sample,
    search and unlearning sections (those the table has) and the metric definitions."""
    md = [f"# {title}", "", markdown_table(table), ""]
    for line in notes(table):
        md += [line, ""]
    transfer = table.get("transfer")
    if transfer:
        md += ["## Transfer: what each row simulated, against each attack", ""]
        md += [transfer_markdown(transfer, fmt_diff), "", transfer_note(transfer), ""]
    if table["resurgence"]:
        md += ["## Resurgence: how many unlearned models come back", ""]
        md += [resurgence_markdown(table["resurgence"]), "", resurgence_note(), ""]
        if figs.resurgence_plot:
            md += ["![resurgence](resurgence_areas.png)", ""]
    if figs.predictors[0]:
        md += [figs.predictors[0]]
    for m, f in figs.curves:
        md += [f"## {m} vs fine-tuning steps", "", f"![{m} vs fine-tuning steps]({f})", ""]
    if figs.grids:
        md += ["## Samples before / after fine-tuning", "", "![grids](grids.png)", "", figs.grids]
        md += [""]
    if "searches" in table:  # add_worst_case was given searches
        md += ["## Attacker search: worst case per row", "", search_markdown(table), ""]
        md += [search_note(table), ""]
        if figs.search_plot:
            md += ["![best so far](search_best_so_far.png)", ""]
    if table.get("dynamics"):
        md += ["## Unlearning: the outer steps per row", ""]
        md += [dynamics_markdown(table["dynamics"]), "", dynamics_note(), ""]
    md += ["## Metric definitions", "", _definitions_md(table), ""]
    return "\n".join(md)


def html_page(table: Mapping[str, Any], title: str, out: Path, figs: Figures) -> str:
    """report.html, self-contained (its images inline from ``out``): the table as one table
    per column group (:func:`column_groups`; the 9-column table of the demo ran off a
    1000-px window), the notes, the curves and samples, the sections of
    :func:`markdown_page` as preformatted text, the metric definitions."""
    e = html.escape
    cols = table["columns"]
    lines = _display_rows(table)
    tables = []
    for name, ix in column_groups(table):
        head = "".join(f"<th>{e(column_title(cols[i], table['metrics']))}</th>" for i in ix)
        body = "".join(
            f"<tr><th>{e(label)}</th>{''.join(f'<td>{e(cells[i])}</td>' for i in ix)}</tr>"
            for label, cells in lines
        )
        tables.append(f"<h3>{e(name)}</h3><table><tr><th>model</th>{head}</tr>{body}</table>")
    defs = "".join(
        "<tr>" + "".join(f"<td>{e(x)}</td>" for x in r) + "</tr>" for r in _definition_rows(table)
    )
    params = "".join(
        f"<tr><td>{e(by)}</td><td>{e(names)}</td><td><code>{e(p)}</code></td></tr>"
        for by, names, p in _definition_params(table)
    )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<meta name='viewport' content='width=device-width'><title>{e(title)}</title>"
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        *tables,
        *(f"<p>{e(line)}</p>" for line in notes(table)),
    ]
    for m, f in figs.curves:
        parts.append(f"<h2>{e(m)} vs fine-tuning steps</h2>{_img(out / f)}")
    if figs.grids:
        parts.append(
            "<h2>Samples before / after fine-tuning</h2>"
            f"<figure>{_img(out / 'grids.png')}<figcaption>{e(figs.grids)}</figcaption></figure>"
        )
    sections = ""  # in the same element as the definitions' heading, as before
    transfer = table.get("transfer")
    if transfer:
        sections += (
            "<h2>Transfer: what each row simulated, against each attack</h2>"
            f"<pre>{e(transfer_markdown(transfer, fmt_diff))}</pre>"
            f"<p>{e(transfer_note(transfer))}</p>"
        )
    if table["resurgence"]:
        sections += (
            "<h2>Resurgence: how many unlearned models come back</h2>"
            f"<pre>{e(resurgence_markdown(table['resurgence']))}</pre>"
            f"<p>{e(resurgence_note())}</p>"
            + (_img(out / "resurgence_areas.png") if figs.resurgence_plot else "")
        )
    if figs.predictors[1]:
        # self-contained as the rest of the page (MLflow's viewer resolves no relative path)
        sections += figs.predictors[1].replace(
            "<img src='predictors.png'>", _img(out / "predictors.png")
        )
    if "searches" in table:
        sections += (
            "<h2>Attacker search: worst case per row</h2>"
            f"<pre>{e(search_markdown(table))}</pre>"
            f"<p>{e(search_note(table))}</p>"
            + (_img(out / "search_best_so_far.png") if figs.search_plot else "")
        )
    if table.get("dynamics"):
        sections += (
            "<h2>Unlearning: the outer steps per row</h2>"
            f"<pre>{e(dynamics_markdown(table['dynamics']))}</pre><p>{e(dynamics_note())}</p>"
        )
    parts.append(
        f"{sections}<h2>Metric definitions</h2><table><tr><th>metric</th><th>measures</th>"
        "<th>role</th><th>computed by</th><th>images per evaluation</th></tr>"
        f"{defs}</table>"
        "<table><tr><th>definition</th><th>reports</th><th>parameters</th></tr>"
        f"{params}</table></body></html>"
    )
    return "\n".join(parts)


def _settings(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in params.items())  # fmt: skip


def search_markdown(table: Mapping[str, Any]) -> str:
    """One line per study: its worst case, the utility there, the trial that found it, the
    trial's settings and how many trials kept the bound."""
    lines = [
        "| row | unlearning seed | threat | worst case | utility | found at trial | settings "
        "| within bound | sampler (seed) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in table.get("searches", []):
        b = s["best"]
        c = s["constraint"]
        worst = "none within the bound" if b is None else f"{s['objective']} {b['objective']:.3f}"
        util = "–" if b is None else f"{c['metric']} {b['utility']:.3f}"
        found = "–" if b is None else f"#{b['number']} ({b['number'] + 1} of {s['done']})"
        settings = "–" if b is None else _settings(b["params"])
        useed = "–" if s["unlearn_seed"] is None else str(s["unlearn_seed"])
        done = (
            f"{s['feasible']}/{s['done']}"
            + (f" (budget {s['budget']})" if s["done"] < s["budget"] else "")
            + (f", {s['failed']} diverged" if s.get("failed") else "")
            + (f", {s['pruned']} pruned" if s.get("pruned") else "")
        )
        lines.append(
            f"| {s['row']} | {useed} | {s['threat']} | {worst} | {util} | {found} | {settings} "
            f"| {done} | {s['sampler']} ({s['seed']}) |"
        )
    return "\n".join(lines)


def search_note(table: Mapping[str, Any]) -> str:
    return (
        "Worst case: the highest objective metric of the attacked model (mean over the "
        "threat's attack seeds, at the attack's last step) among the search's trials that "
        "keep the utility bound. Trial #k is the (k+1)-th the sampler asked, node names "
        "<threat>:trial<k>. Every row is searched with the same budget, sampler and seed. "
        "The worst-case column aggregates over unlearning seeds (one study each) with the paired difference "
        "to the reference row. search_best_so_far.png: the best value within the bound after "
        "each trial (dots: every trial; hollow: outside the bound; crosses at 0: diverged, "
        "told to the sampler as failed; hollow triangles: pruned, at the value where the "
        "pruner stopped them). A pruned trial (search.pruner) stopped at an intermediate "
        "rung and never counts as the worst case; 'within bound' counts finished trials."
    )


__all__ = [
    "Figures",
    "at_text",
    "column_groups",
    "column_title",
    "fmt",
    "fmt_diff",
    "html_page",
    "markdown_page",
    "markdown_table",
    "notes",
    "oracle_notes",
    "search_markdown",
    "search_note",
]
