"""JSON Schema of the spec, for editors (``# yaml-language-server: $schema=...``) and tools."""

from __future__ import annotations

from typing import Any

from .schema import Spec

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


# A `vars` reference (`$digit`, `${expr}`) may stand for any value (resalign.spec.compose).
_VAR_REF = {"type": "string", "pattern": "^\\$", "description": "a vars reference"}
_COMPOSE = {
    "extends": {"type": "string", "description": "path of a base spec this one overrides"},
    "vars": {"type": "object", "description": "named values, used as $name or ${expr}"},
}


def _allow_var_refs(node: Any) -> Any:
    """Every property, list item and mapping value may also be a ``$`` reference."""
    if isinstance(node, list):
        return [_allow_var_refs(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _allow_var_refs(v) for k, v in node.items()}
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: {"anyOf": [v, _VAR_REF]} for k, v in out["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = {"anyOf": [out[key], _VAR_REF]}
    return out


def spec_json_schema() -> dict[str, Any]:
    """The pydantic model's JSON Schema (validation mode) with dialect and title set, the
    composition keys (``extends``, ``vars``) and ``$`` references allowed for any value."""
    schema = _allow_var_refs(Spec.model_json_schema(mode="validation"))
    schema["properties"] = {**schema.get("properties", {}), **_COMPOSE}
    return {"$schema": SCHEMA_DIALECT, **schema, "title": "resalign spec"}
