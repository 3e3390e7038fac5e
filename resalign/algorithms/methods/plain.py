"""``plain``: the ablation's standard unlearning, L_harm(θ) + Σᵢ wᵢ·Rᵢ(θ) (no resilience)."""

from __future__ import annotations

from torch import Tensor

from ..callbacks import Stats
from .base import Method


class Plain(Method):
    name = "plain"

    def outer_gradient(self) -> tuple[list[Tensor], Stats]:
        return self.direct_terms(harm_coef=1.0)
