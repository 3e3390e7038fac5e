"""Public entry point for the hypergradient solvers (``import resalign.hypergrad``)."""

from __future__ import annotations

from .algorithms.hypergrad import (
    SolveStats,
    make_hvp,
    moreau_hypergradient,
    power_iteration,
    richardson_solve,
    unrolled_hypergradient,
)

__all__ = [
    "SolveStats",
    "make_hvp",
    "moreau_hypergradient",
    "power_iteration",
    "richardson_solve",
    "unrolled_hypergradient",
]
