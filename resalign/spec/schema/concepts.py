"""The ``concepts`` section: what to unlearn and what to keep."""

from __future__ import annotations

from pydantic import Field

from .base import StrictModel


class ConceptSpec(StrictModel):
    """One unsafe concept: harmful datasets to unlearn, retain datasets to preserve."""

    description: str = ""
    harmful: list[str] = Field(min_length=1)
    retain: list[str] = Field(default_factory=list)
    label: int | None = Field(
        default=None, description="class index of the concept for classifier metrics (demo)"
    )
