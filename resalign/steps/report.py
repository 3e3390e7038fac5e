"""The ``report`` step: the paper-shaped table, curves and grids from every evaluate node.

Params (graph): ``rows``, ``threats`` (``{name: {seeds, eval_at, steps}}``, plus ``radii``
for an ``algorithm: perturb`` threat, whose step k is its k-th radius), ``resurgence`` (the
spec's ``report.resurgence``). Inputs: one role
per evaluate node and one per probe node (role = node name; probes: the predictor table,
:mod:`resalign.evaluation.predictors`). Outputs: ``report.md``, ``report.html``,
``ip_vs_steps.png``, ``grids.png``, ``table.json``; each is also logged as an artifact. The
relearning summaries (area under the safety metric over each attack, first relearn step, and
their paired differences to ``plain``) are logged as MLflow metrics
(:func:`resalign.evaluation.report.table_metrics`).
"""

from __future__ import annotations

from pathlib import Path

from .base import Step, StepContext, register


@register
class ReportStep(Step):
    kind = "report"
    version = "2"

    def run(self, ctx: StepContext) -> None:
        from ..evaluation.predictors import predictors_from_probes, probe_results_from_dirs
        from ..evaluation.report import results_from_dirs, table_metrics, write_report

        evals = {role: Path(p) for role, p in ctx.inputs.items() if role.startswith("evaluate/")}
        results = results_from_dirs(evals)
        probes = {role: Path(p) for role, p in ctx.inputs.items() if role.startswith("probe/")}
        spec = getattr(ctx.spec, "spec", ctx.spec)
        table = write_report(
            results,
            Path(ctx.out),
            rows=ctx.params.get("rows"),
            threats=ctx.params.get("threats"),
            resurgence=ctx.params.get("resurgence"),
            predictors=predictors_from_probes(probe_results_from_dirs(probes)),
            title=f"resalign report: {getattr(spec, 'name', 'spec')}",
        )
        summary = table_metrics(table)
        if summary:
            ctx.log_metrics(summary)
        for name in (
            "report.md",
            "report.html",
            "table.json",
            "ip_vs_steps.png",
            "grids.png",
            "resurgence_areas.png",
            "predictors.png",
        ):
            path = Path(ctx.out) / name
            if path.is_file():
                ctx.log_artifact(path, "report")
