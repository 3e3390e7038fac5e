"""The spec schema, one module per domain. ``Spec`` is the top level."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from .base import StrictModel
from .concepts import ConceptSpec
from .controls import ControlsSpec
from .data import DatasetSpec
from .evaluate import EvaluateSpec
from .execution import ExecutionSpec
from .model import ModelSpec
from .probes import ProbesSpec
from .report import ReportSpec
from .threats import ThreatSpec
from .tracking import TrackingSpec
from .unlearn import UnlearnSpec

SPEC_VERSION = 1


class Spec(StrictModel):
    """A resalign experiment."""

    version: Literal[1] = SPEC_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    seed: int = 0
    model: ModelSpec
    datasets: dict[str, DatasetSpec] = Field(default_factory=dict)
    concepts: dict[str, ConceptSpec] = Field(min_length=1)
    unlearn: UnlearnSpec = Field(default_factory=UnlearnSpec)
    baselines: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="extra model rows: name → overrides of 'unlearn' (deep-merged)",
    )
    threats: dict[str, ThreatSpec] = Field(default_factory=dict)
    controls: ControlsSpec = Field(default_factory=ControlsSpec)
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    report: ReportSpec = Field(default_factory=ReportSpec)
    probes: ProbesSpec | None = Field(
        default=None,
        description="diagnostics per model row that might predict resurgence (probe nodes "
        "and the report's predictor table); absent: none",
    )
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec)


__all__ = ["Spec", "SPEC_VERSION"]
