"""Which rows of a report are controls and which row a method row is paired with.

Rows are ``original`` (the loaded model), ``oracle`` (``controls.oracle``: the same attacks on
a model that never learned the concept), then the unlearning rows; in a grid report each
cell's rows are ``<cell>/<row>`` (``resalign.reporting.grid_results``). The two controls are
never an unlearning method: no paired difference to the reference row (``report.reference``,
default ``plain``) and no place on a frontier.
"""

from __future__ import annotations

from collections.abc import Sequence

from ...spec.resolve import ORIGINAL_ROW
from ...spec.schema.controls import ORACLE_ROW
from ...spec.schema.report import ReportSpec

# the default reference row (``report.reference``)
REFERENCE_ROW: str = ReportSpec.model_fields["reference"].default
CONTROL_ROWS = (ORIGINAL_ROW, ORACLE_ROW)


def sibling(row: str, name: str, rows: Sequence[str]) -> str | None:
    """The row ``name`` of the same grid cell (``<cell>/<name>`` for ``<cell>/<row>``), else
    the top-level row ``name``; None when neither exists or it is ``row`` itself."""
    if "/" in row:
        cand = row.rsplit("/", 1)[0] + "/" + name
        if cand in rows:
            return cand if cand != row else None
    return name if name in rows and name != row else None


def is_control(row: str) -> bool:
    """Whether ``row`` (or a grid's ``<cell>/<row>``) is a control row (``original``,
    ``oracle``) rather than an unlearning method."""
    return row.rsplit("/", 1)[-1] in CONTROL_ROWS


def reference_row(row: str, rows: Sequence[str], reference: str = REFERENCE_ROW) -> str | None:
    """The row a method row is paired with: ``reference`` (``report.reference``) of its
    cell, else the top-level row of that name. None for the reference itself and for the
    control rows (``original``, ``oracle``)."""
    if is_control(row):
        return None
    return sibling(row, reference, rows)


__all__ = [
    "CONTROL_ROWS",
    "ORACLE_ROW",
    "ORIGINAL_ROW",
    "REFERENCE_ROW",
    "is_control",
    "reference_row",
    "sibling",
]
