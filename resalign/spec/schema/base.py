"""Shared base for every spec model: unknown keys are errors, floats stay floats."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer


class StrictModel(BaseModel):
    """A spec section. ``extra="forbid"`` so a misspelt key never silently runs a default;
    ``allow_inf_nan=False``: no spec number is meaningful as ``.inf`` or ``.nan`` (a bound
    like ``gt=0`` refuses NaN but lets ``lr: .inf`` through, to fail only in the run)."""

    model_config = ConfigDict(
        extra="forbid", validate_default=True, populate_by_name=False, allow_inf_nan=False
    )


class OmitDefaults(StrictModel):
    """A section some of whose fields were added after results were cached under keys that
    hash the section's dump: a field named in ``_omit_if_default`` is left out of the dump
    while it holds that default, so specs that do not use it keep their node keys. Reading
    the dump back gives the same model (the default fills it in)."""

    _omit_if_default: ClassVar[dict[str, Any]] = {}

    @model_serializer(mode="wrap")
    def _omit(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            for name, default in self._omit_if_default.items():
                if name in data and data[name] == default:
                    del data[name]
        return data
