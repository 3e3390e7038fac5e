"""The paper-shaped report: results → table → render → plots, one module per stage.

- :mod:`.results`: one :class:`EvalResult` per evaluate node (its ``metrics.json``, located
  by the node's ``row``/``threat``/``seed``/``step``/``unlearn_seed``), from the compiled
  graph and the store or from the report step's input folders;
- :mod:`.rows`: the control rows and which row a method is paired with;
- :mod:`.table`: the numbers (cells over units, paired differences, relearning area and first
  step, curves, worst-case search columns) as ``table.json``'s data;
- :mod:`.render`: cell texts, notes, report.md and report.html;
- :mod:`.plots`: ``<metric>_vs_steps.png``, ``grids.png``, ``search_best_so_far.png``;
- :mod:`.pipeline`: :func:`write_report`, the stages in order, and the report step's
  :func:`report_from_inputs`.

Statistics (:mod:`resalign.evaluation.stats`), resurgence, transfer and predictors are the
sibling modules of this package; ``resalign report`` (compiling a spec or a grid, above the
graph and the store) is :mod:`resalign.reporting`. The names below are this package's API.
"""

from __future__ import annotations

from .pipeline import report_from_inputs, write_report
from .plots import band_limits, curve_file, image_grids, plot_best_so_far, plot_curves
from .render import column_groups, column_title, fmt, fmt_diff, markdown_table, notes
from .results import EvalResult, parse_eval_name, results_from_dirs, results_from_store
from .rows import CONTROL_ROWS, REFERENCE_ROW, is_control, reference_row
from .table import add_worst_case, build_table, relearning, table_metrics

__all__ = [
    "CONTROL_ROWS",
    "REFERENCE_ROW",
    "EvalResult",
    "add_worst_case",
    "band_limits",
    "build_table",
    "column_groups",
    "column_title",
    "curve_file",
    "fmt",
    "fmt_diff",
    "image_grids",
    "is_control",
    "markdown_table",
    "notes",
    "parse_eval_name",
    "plot_best_so_far",
    "plot_curves",
    "reference_row",
    "relearning",
    "report_from_inputs",
    "results_from_dirs",
    "results_from_store",
    "table_metrics",
    "write_report",
]
