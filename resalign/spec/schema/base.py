"""Shared base for every spec model: unknown keys are errors, floats stay floats."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A spec section. ``extra="forbid"`` so a misspelt key never silently runs a default."""

    model_config = ConfigDict(extra="forbid", validate_default=True, populate_by_name=False)
