"""The paper-shaped report: table, metric-vs-fine-tuning-steps curves, image grids.

Input: the ``metrics.json`` of every evaluate node (``{name: {"value", "definition",
"version", "params", "role", "better", ...}}``), located either through the compiled graph
and the store (:func:`results_from_store`, the CLI) or through the report step's inputs
(:func:`results_from_dirs`). Output (``out``): ``table.json``, ``report.md``,
``report.html``, ``ip_vs_steps.png`` and ``grids.png``.

The table has one line per row (``original`` first, then each method) and, for each safety
metric, a pre-fine-tuning column and one post-fine-tuning column per threat (at the threat's
last evaluation step); utility metrics get their pre-fine-tuning column. A cell is the mean
over attack seeds ± the half-width of the two-sided 95% confidence interval of the mean
(Student t with n−1 degrees of freedom); a single value is shown alone.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError

PRE = "pre"


@dataclass(frozen=True)
class EvalResult:
    """One evaluate node's results. ``threat`` is None before any attack (step 0)."""

    row: str
    threat: str | None
    seed: int | None
    step: int
    metrics: Mapping[str, Mapping[str, Any]]
    folder: Path


def parse_eval_name(name: str) -> tuple[str, str | None, int | None, int]:
    """``evaluate/<row>/pre/step0`` or ``evaluate/<row>/<threat>/seed<s>/step<n>``."""
    parts = name.split("/")
    if parts[0] != "evaluate" or len(parts) < 4 or not parts[-1].startswith("step"):
        raise ValueError(f"not an evaluate node name: {name!r}")
    step = int(parts[-1][4:])
    if parts[-2] == PRE:
        return "/".join(parts[1:-2]), None, None, step
    return "/".join(parts[1:-3]), parts[-3], int(parts[-2][4:]), step


def read_result(name: str, folder: Path) -> EvalResult:
    row, threat, seed, step = parse_eval_name(name)
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        raise UserError(f"{name}: no metrics.json in {folder}", where=str(folder))
    return EvalResult(row, threat, seed, step, json.loads(path.read_text("utf-8")), Path(folder))


def results_from_dirs(dirs: Mapping[str, Path]) -> list[EvalResult]:
    """Results of evaluate nodes given as ``{node name: output folder}``."""
    return [read_result(n, p) for n, p in dirs.items()]


def results_from_store(graph: Any, store_root: Path, spec_path: str = "SPEC") -> list[EvalResult]:
    """Results of every evaluate node of ``graph`` from ``store_root`` (``runs/``).

    A node without a completed result is a :class:`UserError` naming every missing node.
    """
    found, missing = {}, []
    for node in graph.of_kind("evaluate"):
        folder = Path(store_root) / "evaluate" / node.key
        if (folder / "DONE").is_file() and (folder / "metrics.json").is_file():
            found[node.name] = folder
        else:
            missing.append(node.name)
    if missing:
        shown = ", ".join(missing[:6]) + (
            f" and {len(missing) - 6} more" if len(missing) > 6 else ""
        )
        raise UserError(
            f"{len(missing)} of {len(missing) + len(found)} evaluation results are missing "
            f"from {store_root}: {shown}",
            hint=f"run `resalign run {spec_path}` first (it computes only what is missing), "
            "or pass --store with the folder the runs were written to",
        )
    return results_from_dirs(found)


# ----------------------------------------------------------------------------- statistics


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float | None]:
    """Mean and the half-width of the t confidence interval of the mean (None for n < 2)."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return float("nan"), None
    mean = sum(vals) / n
    if n < 2:
        return mean, None
    from scipy import stats

    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    return mean, float(stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n))


def fmt(mean: float, ci: float | None) -> str:
    if mean != mean:  # NaN
        return "–"
    digits = 4 if abs(mean) < 10 else 2
    return f"{mean:.{digits}f}" + ("" if ci is None else f" ± {ci:.{digits}f}")


# ----------------------------------------------------------------------------- the table


def _metric_info(results: Iterable[EvalResult]) -> dict[str, dict[str, Any]]:
    info: dict[str, dict[str, Any]] = {}
    for r in results:
        for name, m in r.metrics.items():
            info.setdefault(
                name,
                {k: m.get(k) for k in ("definition", "version", "params", "role", "better")},
            )
    return info


def build_table(
    results: Sequence[EvalResult],
    rows: Sequence[str] | None = None,
    threats: Mapping[str, Mapping[str, Any]] | None = None,
    all_steps: bool = False,
) -> dict[str, Any]:
    """The table as JSON-able data: columns, one entry per row with its cells, the metric
    definitions, and the per-step curves. ``all_steps``: a post-fine-tuning column for every
    evaluation step of each threat (id ``metric/threat@step``), not only the last
    (id ``metric/threat``)."""
    rows = list(rows) if rows else list(dict.fromkeys(r.row for r in results))
    if threats is None:
        names = dict.fromkeys(r.threat for r in results if r.threat)
        threats = {t: {} for t in names}
    info = _metric_info(results)
    safety = [m for m, i in info.items() if i.get("role", "safety") == "safety"]
    utility = [m for m, i in info.items() if i.get("role") == "utility"]

    last_step = {}
    for t, meta in threats.items():
        steps = [r.step for r in results if r.threat == t]
        last_step[t] = max(meta.get("eval_at") or steps or [0])

    def values(row: str, threat: str | None, step: int, metric: str) -> list[float]:
        return [
            float(r.metrics[metric]["value"])
            for r in results
            if r.row == row and r.threat == threat and r.step == step and metric in r.metrics
        ]

    columns = []
    for m in safety:
        columns.append({"id": f"{m}/pre", "metric": m, "threat": None, "step": 0})
        for t in threats:
            shown = [last_step[t]]
            if all_steps:
                shown = sorted({r.step for r in results if r.threat == t} | {last_step[t]})
            for s in shown:
                cid = f"{m}/{t}" if s == last_step[t] else f"{m}/{t}@{s}"
                columns.append({"id": cid, "metric": m, "threat": t, "step": s})
    for m in utility:
        columns.append({"id": f"{m}/pre", "metric": m, "threat": None, "step": 0})

    table_rows = []
    for row in rows:
        cells = {}
        for c in columns:
            vals = values(row, c["threat"], c["step"], c["metric"])
            mean, ci = mean_ci(vals)
            cells[c["id"]] = {
                "mean": mean if vals else None,
                "ci95": ci,
                "n": len(vals),
                "values": vals,
            }
        table_rows.append({"row": row, "cells": cells})

    curves = {}
    for m in safety:
        for t in threats:
            steps = sorted({r.step for r in results if r.threat == t})
            per_row = {}
            for row in rows:
                pts = []
                pre = values(row, None, 0, m)
                if pre:
                    pts.append({"step": 0, "mean": mean_ci(pre)[0], "ci95": None, "n": len(pre)})
                for s in steps:
                    vals = values(row, t, s, m)
                    if vals:
                        mean, ci = mean_ci(vals)
                        pts.append({"step": s, "mean": mean, "ci95": ci, "n": len(vals)})
                per_row[row] = pts
            curves[f"{m}/{t}"] = {"metric": m, "threat": t, "rows": per_row}
    return {
        "rows": rows,
        "threats": {t: {"last_step": last_step[t], **dict(threats[t])} for t in threats},
        "columns": columns,
        "table": table_rows,
        "metrics": info,
        "curves": curves,
        "ci": "two-sided 95% Student-t interval of the mean over attack seeds",
    }


def column_title(c: Mapping[str, Any], info: Mapping[str, Any]) -> str:
    arrow = {"lower": "↓", "higher": "↑"}.get(info.get(c["metric"], {}).get("better"), "")
    when = "pre-FT" if c["threat"] is None else f"after {c['threat']} (step {c['step']})"
    return f"{c['metric']} {arrow} {when}".replace("  ", " ")


def markdown_table(table: Mapping[str, Any]) -> str:
    cols = table["columns"]
    head = ["model"] + [column_title(c, table["metrics"]) for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table["table"]:
        cells = []
        for c in cols:
            cell = r["cells"][c["id"]]
            cells.append(fmt(cell["mean"], cell["ci95"]) if cell["n"] else "–")
        lines.append("| " + " | ".join([r["row"], *cells]) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures


# Metrics that are fractions of images or prompts: their mean lies in [0, 1], so a CI band
# beyond it (a t-interval over few seeds is symmetric and wide) would show impossible values.
RATE_METRICS = frozenset({"concept_rate", "retain_accuracy", "nudenet_ip", "mhsc_us"})


def band_limits(metric: str, pts: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[float]]:
    """The 95% CI band (lower, upper) of a curve's points; clipped to [0, 1] for rate metrics
    (the interval itself is unchanged in the table: only the drawing is clipped)."""
    lo = [p["mean"] - (p["ci95"] or 0.0) for p in pts]
    hi = [p["mean"] + (p["ci95"] or 0.0) for p in pts]
    if metric in RATE_METRICS:
        lo = [min(max(v, 0.0), 1.0) for v in lo]
        hi = [min(max(v, 0.0), 1.0) for v in hi]
    return lo, hi


def plot_curves(table: Mapping[str, Any], path: Path) -> bool:
    """Metric vs fine-tuning steps: one panel per (safety metric, threat), one line per row
    with a 95% CI band where there are several seeds. Returns False when there is nothing to
    plot (no threats)."""
    curves = table["curves"]
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(curves)
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        cur = curves[key]
        for row, pts in cur["rows"].items():
            if not pts:
                continue
            xs = [p["step"] for p in pts]
            ys = [p["mean"] for p in pts]
            (line,) = ax.plot(xs, ys, marker="o", label=row)
            lo, hi = band_limits(cur["metric"], pts)
            if any(p["ci95"] for p in pts):
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
        ax.set_title(f"{cur['metric']} after fine-tuning: {cur['threat']}")
        ax.set_xlabel("fine-tuning steps")
        ax.set_ylabel(cur["metric"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def image_grids(results: Sequence[EvalResult], table: Mapping[str, Any], path: Path) -> bool:
    """Before/after sample grids: one line per row, columns pre-FT then each threat's last
    step (first seed). Returns False when no grid images exist."""
    from PIL import Image, ImageDraw

    threats = list(table["threats"])
    cols = [(None, 0)] + [(t, table["threats"][t]["last_step"]) for t in threats]
    cell, label_h, label_w = 192, 18, 110
    grid_of: dict[tuple[str, str | None], Path] = {}
    for r in sorted(results, key=lambda r: (r.seed is None, r.seed or 0)):
        g = r.folder / "grid.png"
        if g.is_file() and any(r.threat == t and r.step == s for t, s in cols):
            grid_of.setdefault((r.row, r.threat), g)
    if not grid_of:
        return False
    rows = table["rows"]
    canvas = Image.new("RGB", (label_w + cell * len(cols), label_h + cell * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, (t, s) in enumerate(cols):
        draw.text((label_w + j * cell + 4, 3), "pre-FT" if t is None else f"{t} @{s}", fill="black")
    for i, row in enumerate(rows):
        draw.text((4, label_h + i * cell + cell // 2), row, fill="black")
        for j, (t, _) in enumerate(cols):
            g = grid_of.get((row, t))
            if g is not None:
                tile = Image.open(g).convert("RGB").resize((cell - 4, cell - 4), Image.NEAREST)
                canvas.paste(tile, (label_w + j * cell + 2, label_h + i * cell + 2))
    canvas.save(path)
    return True


# ----------------------------------------------------------------------------- writing


def _definitions_md(table: Mapping[str, Any]) -> str:
    lines = ["| metric | definition | version | parameters |", "|---|---|---|---|"]
    for name, i in table["metrics"].items():
        params = json.dumps(i.get("params"), sort_keys=True, default=str)
        lines.append(f"| {name} | {i.get('definition')} | {i.get('version')} | `{params}` |")
    return "\n".join(lines)


def write_report(
    results: Sequence[EvalResult],
    out: Path,
    *,
    rows: Sequence[str] | None = None,
    threats: Mapping[str, Mapping[str, Any]] | None = None,
    title: str = "resalign report",
    all_steps: bool = False,
) -> dict[str, Any]:
    """Write table.json, report.md, report.html, ip_vs_steps.png and grids.png to ``out``."""
    if not results:
        raise UserError("no evaluation results to report", hint="add metrics to 'evaluate'")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = build_table(results, rows, threats, all_steps=all_steps)
    has_plot = plot_curves(table, out / "ip_vs_steps.png")
    has_grids = image_grids(results, table, out / "grids.png")
    seeds = sorted({r.seed for r in results if r.seed is not None})
    table["seeds"] = seeds
    _atomic_text(out / "table.json", json.dumps(table, indent=2, default=str))

    md = [
        f"# {title}",
        "",
        markdown_table(table),
        "",
        f"Cells: mean ± 95% CI over attack seeds {seeds} (Student t); pre-FT values come "
        "from one evaluation per row.",
        "",
    ]
    if has_plot:
        md += ["## Metric vs fine-tuning steps", "", "![curves](ip_vs_steps.png)", ""]
    if has_grids:
        md += ["## Samples before / after fine-tuning", "", "![grids](grids.png)", ""]
    md += ["## Metric definitions", "", _definitions_md(table), ""]
    _atomic_text(out / "report.md", "\n".join(md))
    _atomic_text(out / "report.html", _html(table, title, has_plot, has_grids))
    return table


def _html(table: Mapping[str, Any], title: str, plot: bool, grids: bool) -> str:
    e = html.escape
    cols = table["columns"]
    head = "".join(f"<th>{e(column_title(c, table['metrics']))}</th>" for c in cols)
    body = []
    for r in table["table"]:
        tds = "".join(
            f"<td>{e(fmt(r['cells'][c['id']]['mean'], r['cells'][c['id']]['ci95']) if r['cells'][c['id']]['n'] else '–')}</td>"
            for c in cols
        )
        body.append(f"<tr><th>{e(r['row'])}</th>{tds}</tr>")
    defs = "".join(
        f"<tr><td>{e(n)}</td><td>{e(str(i.get('definition')))}</td><td>{e(str(i.get('version')))}"
        f"</td><td><code>{e(json.dumps(i.get('params'), sort_keys=True, default=str))}</code></td></tr>"
        for n, i in table["metrics"].items()
    )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(title)}</title><style>body{{font-family:sans-serif;margin:2em}}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
        "</style></head><body>",
        f"<h1>{e(title)}</h1><table><tr><th>model</th>{head}</tr>{''.join(body)}</table>",
        f"<p>Cells: mean ± 95% CI over attack seeds {e(str(table.get('seeds')))} (Student t).</p>",
    ]
    if plot:
        parts.append("<h2>Metric vs fine-tuning steps</h2><img src='ip_vs_steps.png'>")
    if grids:
        parts.append("<h2>Samples before / after fine-tuning</h2><img src='grids.png'>")
    parts.append(
        f"<h2>Metric definitions</h2><table><tr><th>metric</th><th>definition</th>"
        f"<th>version</th><th>parameters</th></tr>{defs}</table></body></html>"
    )
    return "\n".join(parts)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def report_for_spec(
    spec_path: str, store_root: Path, out: Path | None = None, all_steps: bool = False
) -> Path:
    """``resalign report SPEC``: compile the spec, read its evaluate results from the store,
    write the report (default: ``<store>/reports/<spec name>/``). Returns the folder."""
    from ..graph.compile import compile_spec
    from ..spec import load_spec

    resolved = load_spec(spec_path)
    graph = compile_spec(resolved)
    results = results_from_store(graph, Path(store_root), spec_path)
    report_node = graph.of_kind("report")[0] if graph.of_kind("report") else None
    params = report_node.params if report_node is not None else {}
    out = Path(out) if out else Path(store_root) / "reports" / graph.spec_name
    write_report(
        results,
        out,
        rows=params.get("rows"),
        threats=params.get("threats"),
        title=f"resalign report: {graph.spec_name}",
        all_steps=all_steps,
    )
    return out


def is_template(path: str | Path) -> bool:
    """A grid template (``*.j2``) rather than a spec: ``resalign report`` reports its cells."""
    return str(path).endswith(".j2")


def report_for_grid(
    template_path: str, store_root: Path, out: Path | None = None, all_steps: bool = False
) -> Path:
    """``resalign report TEMPLATE.yaml.j2``: one table with a row per cell of the grid.

    Every cell is rendered and compiled as ``resalign grid --run`` did (same node keys), its
    evaluate results read from the store. A cell's row is named by the cell id (``<cell
    id>/<row>`` when the cell has several unlearned rows). The ``original`` row is shown once,
    first, when every cell shares its evaluate nodes (same keys); otherwise once per cell as
    ``<cell id>/original``. Threats are the union over cells; a cell without a threat shows
    "–" in its columns. Default folder: ``<store>/reports/<grid name>/``.
    """
    import dataclasses

    from ..graph.compile import compile_spec
    from ..spec.templates import load_template, render_grid

    tpl = load_template(template_path)
    cells = []
    for rc in render_grid(tpl):
        graph = compile_spec(rc.spec)
        try:
            found = results_from_store(graph, Path(store_root), template_path)
        except UserError as e:
            raise UserError(
                f"grid {tpl.name!r}, cell {rc.cell.id}: {e.message}",
                where=str(tpl.path),
                hint=f"run `resalign grid {template_path} --run` first (it computes only what "
                "is missing), or pass --store with the folder the grid ran in",
            ) from None
        report_node = graph.of_kind("report")[0] if graph.of_kind("report") else None
        params = report_node.params if report_node is not None else {}
        original = frozenset(
            n.key for n in graph.of_kind("evaluate") if n.name.startswith("evaluate/original/")
        )
        cells.append((rc.cell.id, found, params, original))
    shared = len({c[3] for c in cells}) == 1 and bool(cells[0][3])
    results: list[EvalResult] = []
    rows: list[str] = ["original"] if shared else []
    threats: dict[str, Any] = {}
    for i, (cid, found, params, _) in enumerate(cells):
        own = [r for r in params.get("rows") or dict.fromkeys(x.row for x in found)]
        unlearned = [r for r in own if r != "original"]
        names = {r: cid if len(unlearned) == 1 else f"{cid}/{r}" for r in unlearned}
        if not shared:
            names["original"] = f"{cid}/original"
        for r in own:
            if r in names:
                rows.append(names[r])
        for res in found:
            if res.row in names:
                results.append(dataclasses.replace(res, row=names[res.row]))
            elif shared and i == 0:
                results.append(res)
        for t, meta in (params.get("threats") or {}).items():
            threats.setdefault(t, meta)
    out = Path(out) if out else Path(store_root) / "reports" / tpl.name
    write_report(
        results,
        out,
        rows=rows,
        threats=threats or None,
        title=f"resalign report: grid {tpl.name} ({len(cells)} cells)",
        all_steps=all_steps,
    )
    return out


__all__ = [
    "EvalResult",
    "build_table",
    "is_template",
    "mean_ci",
    "parse_eval_name",
    "report_for_grid",
    "report_for_spec",
    "results_from_dirs",
    "results_from_store",
    "write_report",
]
