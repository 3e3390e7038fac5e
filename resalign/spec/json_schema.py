"""JSON Schema of the spec, for editors (``# yaml-language-server: $schema=...``) and tools."""

from __future__ import annotations

from typing import Any

from .schema import Spec

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def spec_json_schema() -> dict[str, Any]:
    """The pydantic model's JSON Schema (validation mode) with dialect and title set."""
    schema = Spec.model_json_schema(mode="validation")
    return {"$schema": SCHEMA_DIALECT, **schema, "title": "resalign spec"}
