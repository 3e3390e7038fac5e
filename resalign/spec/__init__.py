"""The spec language: schema, YAML loader with positions, errors, resolve pass."""

from __future__ import annotations

from .errors import Issue, SpecError
from .loader import load_spec, load_spec_text, load_yaml_text
from .resolve import ResolvedSpec

__all__ = ["Issue", "SpecError", "ResolvedSpec", "load_spec", "load_spec_text", "load_yaml_text"]
