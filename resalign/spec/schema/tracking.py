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
    log_models: bool = Field(
        default=False,
        description="upload model folders (merged UNets, pipelines, attack checkpoints) as "
        "MLflow artifacts; default: every other file is uploaded and the run records where "
        "the models are in the local store (tag resalign.node.dir, local_models.json)",
    )
