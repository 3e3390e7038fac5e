"""The ``report`` step: the paper-shaped table, curves and grids from every evaluate node.

Params (graph): ``title`` (the spec's name), ``rows``, ``threats`` (``{name: {seeds, eval_at, steps}}``, plus ``radii``
for an ``algorithm: perturb`` threat, whose step k is its k-th radius), ``resurgence`` (the
spec's ``report.resurgence``). Inputs: one role per evaluate node and one per probe node (role
= node name; probes: the predictor table, :mod:`resalign.evaluation.predictors`). Outputs:
``report.md``, ``report.html`` (self-contained), ``<metric>_vs_steps.png``, ``grids.png``,
``resurgence_areas.png``, ``predictors.png``, ``table.json``, with a column for every
evaluated attack step (as ``resalign report --all-steps``); the node's run holds them once.
The whole report is :func:`resalign.evaluation.report.report_from_inputs`.
The numbers go to MLflow as the driver's summary runs (``resalign.engine.tracking.summaries``).
"""

from __future__ import annotations

from pathlib import Path

from .base import Step, StepContext, register


@register
class ReportStep(Step):
    kind = "report"
    version = "3"  # 3: the unlearned models are inputs (the outer-step section)

    def run(self, ctx: StepContext) -> None:
        from ..evaluation.report import report_from_inputs

        report_from_inputs(
            ctx.inputs,
            Path(ctx.out),
            ctx.params,
            f"resalign report: {ctx.params['title']}",
        )
        # No metrics on this run: the numbers are on the summary runs, one per row and
        # unlearning seed under short keys (resalign.engine.tracking.summaries); 22 long
        # keys here (relearn_area_diff.concept_rate.<threat>.resalign.hi) drew one bar each.
        # The files are in the node's folder, which is uploaded to its run as it is: no
        # ctx.log_artifact copies (they were stored twice, under artifacts/report/ too).
