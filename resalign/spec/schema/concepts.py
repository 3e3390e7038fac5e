"""The ``concepts`` section: what to unlearn and what to keep."""

from __future__ import annotations

from pydantic import Field, model_validator

from .base import StrictModel


class ConceptSpec(StrictModel):
    """One unsafe concept: harmful datasets to unlearn, retain datasets to preserve."""

    description: str = ""
    harmful: list[str] = Field(min_length=1)
    retain: list[str] = Field(default_factory=list)
    label: int | list[int] | None = Field(
        default=None,
        description="class index of the concept for classifier metrics (demo), or a list of "
        "them: a category of classes (e.g. a pair of digits)",
    )

    @property
    def labels(self) -> list[int]:
        """The concept's class indices (one, several for a category, none)."""
        if self.label is None:
            return []
        return [self.label] if isinstance(self.label, int) else list(self.label)

    @model_validator(mode="after")
    def _check(self) -> ConceptSpec:
        if isinstance(self.label, list) and (
            not self.label or len(set(self.label)) != len(self.label)
        ):
            raise ValueError("label: a list of distinct class indices, at least one")
        return self
