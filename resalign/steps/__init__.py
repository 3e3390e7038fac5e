"""The registered step kinds of the execution graph.

Importing this package registers every kind (keys read each step's ``version`` from the
registry, so ``plan`` and ``run`` must see the same set). Each module is torch-free at import.
"""

from __future__ import annotations

from . import attack, evaluate, harvest, model, probe, report, unlearn  # noqa: F401  (registration)
from .base import STEPS, Step, StepContext, register

__all__ = ["STEPS", "Step", "StepContext", "register"]
