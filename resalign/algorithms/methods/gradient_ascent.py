"""``gradient_ascent``: maximise the denoising loss on harmful pairs, nothing else (the
classic unlearning baseline; no retain regularizer)."""

from __future__ import annotations

from torch import Tensor

from ..callbacks import Stats
from .base import Method


class GradientAscent(Method):
    name = "gradient_ascent"
    uses_regularizers = False
    harmful_kind = "neg_denoise"

    def outer_gradient(self) -> tuple[list[Tensor], Stats]:
        return self.direct_terms(harm_coef=1.0)
