"""The report pipeline: results → table → figures → pages, written into one folder.

:func:`write_report` is the one place the stages meet: :mod:`.table` builds the numbers,
:mod:`.plots` (and the resurgence and predictor modules) draw the figures, :mod:`.render`
writes report.md and report.html. :func:`report_from_inputs` is the report step's whole
job; ``resalign report`` reads its results from the store (``resalign.reporting``) and
calls :func:`write_report` too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...atomic import atomic_write_text as atomic_text
from ...errors import UserError
from ..dynamics import ModelDynamics, dynamics_from_dirs, dynamics_table
from ..predictors import (
    perturb_predictors,
    predictor_section,
    predictors_from_probes,
    probe_results_from_dirs,
)
from ..resurgence import plot_areas
from ..transfer import transfer_view
from .plots import curve_file, image_grids, plot_best_so_far, plot_curves
from .render import Figures, html_page, markdown_page
from .results import EvalResult, results_from_dirs
from .rows import CONTROL_ROWS, REFERENCE_ROW
from .table import add_worst_case, build_table, metric_roles


def write_report(
    results: Sequence[EvalResult],
    out: Path,
    *,
    rows: Sequence[str] | None = None,
    threats: Mapping[str, Mapping[str, Any]] | None = None,
    title: str = "resalign report",
    all_steps: bool = False,
    searches: Sequence[Mapping[str, Any]] = (),
    resurgence: Mapping[str, Any] | None = None,
    predictors: Sequence[Any] = (),
    reference: str | None = None,
    transfer_matched: Mapping[str, Any] | None = None,
    dynamics: Sequence[ModelDynamics] = (),
) -> dict[str, Any]:
    """Write table.json, report.md, report.html, ``<metric>_vs_steps.png`` (one per safety
    metric, :func:`curve_file`) and grids.png to ``out``. report.html is self-contained (its
    images inline as data: URIs), so it renders wherever it is opened, MLflow's artifact
    viewer included (which shows an HTML artifact from a blob: URL, where relative image paths
    resolve to nothing). ``searches``: attacker searches
    (``resalign.engine.search.StudyRecord.as_dict``), shown as worst-case columns
    (:func:`.table.add_worst_case`), a section per study and ``search_best_so_far.png``.
    ``resurgence``: the spec's ``report.resurgence`` (:mod:`..resurgence`, a section and
    ``resurgence_areas.png``). ``predictors``: properties per model
    (:class:`resalign.evaluation.predictors.Predictor`) tested against resurgence, a section
    and ``predictors.png`` (:func:`resalign.evaluation.predictors.predictor_section`).
    ``reference``: the spec's ``report.reference`` (None: its default); a
    perturbation threat's values at each radius are added to them. ``transfer_matched``: a
    grid's utility-matched transfer entries
    (:func:`resalign.evaluation.frontier.matched_transfer`), shown in the transfer section.
    ``dynamics``: the unlearned models' outer-step statistics
    (:mod:`resalign.evaluation.dynamics`), a section for the rows with a resilience term."""
    if not results:
        raise UserError("no evaluation results to report", hint="add metrics to 'evaluate'")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = build_table(results, rows, threats, all_steps=all_steps, resurgence=resurgence,
                        reference=reference or REFERENCE_ROW)  # fmt: skip
    search_plot = False
    if searches:
        add_worst_case(table, searches)
        search_plot = plot_best_so_far(searches, out / "search_best_so_far.png")
    metrics = list(dict.fromkeys(c["metric"] for c in table["curves"].values()))
    curves = [(m, curve_file(m)) for m in metrics if plot_curves(table, out / curve_file(m), m)]
    grids = image_grids(results, table, out / "grids.png")
    resurgence_plot = plot_areas(table["resurgence"], out / "resurgence_areas.png")
    section = ("", "")
    safety, _ = metric_roles(table["metrics"])
    predictors = [*predictors, *perturb_predictors(results, table["threats"], safety)]
    if predictors:
        section = predictor_section(table, predictors, out, CONTROL_ROWS)
    # after the sections above, which add their own keys: table.json's order stays
    table["seeds"] = sorted({r.seed for r in results if r.seed is not None})
    table["unlearn_seeds"] = sorted({r.unlearn_seed for r in results if r.unlearn_seed is not None})
    transfer = transfer_view(table, transfer_matched)
    if transfer:
        table["transfer"] = transfer
    steps = dynamics_table(dynamics, table["rows"])
    if steps:
        table["dynamics"] = steps
    atomic_text(out / "table.json", json.dumps(table, indent=2, default=str))
    figs = Figures(curves, grids, resurgence_plot, search_plot, section)
    atomic_text(out / "report.md", markdown_page(table, title, figs))
    atomic_text(out / "report.html", html_page(table, title, out, figs))
    return table


def report_from_inputs(
    inputs: Mapping[str, Path], out: Path, params: Mapping[str, Any], title: str
) -> dict[str, Any]:
    """The report step's report (``resalign.steps.report``): ``inputs`` its upstream folders
    by role (the node names: ``evaluate/...`` and ``probe/...``), ``params`` the report node's
    (``rows``, ``threats``, ``resurgence``); ``unlearn/...`` roles: the unlearned models,
    whose outer steps the report summarises; every evaluated step shown, as ``resalign
    report --all-steps`` (what ``make demo`` prints and writes to runs/reports/) shows it,
    so the report run's page is that same report."""
    evals = {role: Path(p) for role, p in inputs.items() if role.startswith("evaluate/")}
    probes = {role: Path(p) for role, p in inputs.items() if role.startswith("probe/")}
    unlearned = {role: Path(p) for role, p in inputs.items() if role.startswith("unlearn/")}
    return write_report(
        results_from_dirs(evals),
        Path(out),
        rows=params.get("rows"),
        threats=params.get("threats"),
        resurgence=params.get("resurgence"),
        reference=params.get("reference"),
        predictors=predictors_from_probes(probe_results_from_dirs(probes)),
        dynamics=dynamics_from_dirs(unlearned),
        title=title,
        all_steps=True,
    )


__all__ = ["report_from_inputs", "write_report"]
