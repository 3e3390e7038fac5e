"""Unlearning methods, registered by the name ``unlearn.method`` uses."""

from __future__ import annotations

from typing import Any

from ...errors import UserError
from ..callbacks import PhaseHook, StepCallback
from .base import Method, UnlearnProblem, original_overrides
from .esd import ESD
from .gradient_ascent import GradientAscent
from .plain import Plain
from .resalign import InnerConfig, ResAlign, candidate_configs

METHODS: dict[str, type[Method]] = {m.name: m for m in (ResAlign, Plain, ESD, GradientAscent)}


def build_method(
    name: str,
    problem: UnlearnProblem,
    spec: Any,
    seed: int = 0,
    callback: StepCallback | None = None,
    phases: PhaseHook | None = None,
) -> Method:
    """The registered method ``name`` on ``problem`` with the ``unlearn`` spec ``spec``
    (``phases``: see :class:`Method`)."""
    if name not in METHODS:
        raise UserError(
            f"unknown unlearning method {name!r}",
            where="unlearn.method",
            hint=f"use one of: {', '.join(sorted(METHODS))}",
        )
    return METHODS[name](problem, spec, seed, callback, phases)


__all__ = [
    "METHODS",
    "Method",
    "UnlearnProblem",
    "InnerConfig",
    "build_method",
    "candidate_configs",
    "original_overrides",
]
