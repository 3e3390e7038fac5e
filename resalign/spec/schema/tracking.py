"""The ``tracking`` section: where runs are logged."""

from __future__ import annotations

from pydantic import Field

from .base import StrictModel


class TrackingSpec(StrictModel):
    """MLflow tracking. ``uri`` None: SQLite at ``runs/mlflow.db`` (absolute paths)."""

    uri: str | None = None
    experiment: str = "resalign"
    system_metrics: bool = True
    enabled: bool = True
    run_name: str | None = Field(default=None, description="parent run name; default: spec name")
