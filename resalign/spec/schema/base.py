"""Shared base for every spec model: unknown keys are errors, floats stay floats."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A spec section. ``extra="forbid"`` so a misspelt key never silently runs a default;
    ``allow_inf_nan=False``: no spec number is meaningful as ``.inf`` or ``.nan`` (a bound
    like ``gt=0`` refuses NaN but lets ``lr: .inf`` through, to fail only in the run)."""

    model_config = ConfigDict(
        extra="forbid", validate_default=True, populate_by_name=False, allow_inf_nan=False
    )
