"""``esd``: Erased Stable Diffusion. The ESD loss against the frozen original's guidance
target (``harmful_loss.variant`` esd_u / esd_x; which layers train is the trainable
selection's business), without retain regularizers as in ESD."""

from __future__ import annotations

from torch import Tensor

from ..callbacks import Stats
from .base import Method


class ESD(Method):
    name = "esd"
    uses_regularizers = False
    harmful_kind = "esd"

    def outer_gradient(self) -> tuple[list[Tensor], Stats]:
        return self.direct_terms(harm_coef=1.0)
