"""Data types of ``resalign.data`` and the dataset lookup every loader shares: a leaf module
(the loaders import it; it imports none of them)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UserError


@dataclass
class PairSet:
    """Images ``[N, C, H, W]`` float in [-1, 1] at the model resolution, one caption each,
    and class labels where the data has them (the digits). ``prior`` is a DreamBooth set's
    class-prior pairs (None elsewhere)."""

    images: torch.Tensor
    captions: list[str]
    labels: list[int] | None = None
    prior: PairSet | None = None

    def __len__(self) -> int:
        return len(self.captions)

    def subset(self, indices: list[int]) -> PairSet:
        """The items at ``indices`` (in that order)."""
        return PairSet(
            images=self.images[list(indices)],
            captions=[self.captions[i] for i in indices],
            labels=None if self.labels is None else [self.labels[i] for i in indices],
            prior=self.prior,
        )


def datasets_of(spec: Any) -> Mapping[str, Any]:
    """The ``datasets`` mapping of a ``Spec``, a ``ResolvedSpec`` or a plain mapping."""
    if hasattr(spec, "spec") and hasattr(spec.spec, "datasets"):
        return spec.spec.datasets
    if hasattr(spec, "datasets"):
        return spec.datasets
    return spec


def dataset_spec(name: str, spec: Any) -> Any:
    """The spec of dataset ``name``; a :class:`UserError` naming the known ones if absent."""
    datasets = datasets_of(spec)
    if name not in datasets:
        raise UserError(
            f"unknown dataset {name!r}",
            hint=f"datasets defined: {', '.join(sorted(datasets)) or '(none)'}",
        )
    return datasets[name]
