"""Data types of ``resalign.data`` and the dataset lookup every loader shares: a leaf module
(the loaders import it; it imports none of them)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
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


@lru_cache(maxsize=1)
def _dataset_adapter() -> Any:
    """The schema's dataset union as one pydantic adapter (building one per read rebuilt its
    validator each time)."""
    from pydantic import TypeAdapter

    from ..spec.schema.data import DatasetSpec

    return TypeAdapter(DatasetSpec)


class _TypedDatasets(Mapping):
    """A node's ``datasets`` param (name → the dataset's spec as JSON, plus the
    ``fingerprint`` of a local path) seen as validated dataset specs, so a step reads its
    data from its own inputs exactly as it would from the spec's models."""

    def __init__(self, raw: Mapping[str, Any]):
        self._raw = raw

    def __getitem__(self, name: str) -> Any:
        value = self._raw[name]
        if not isinstance(value, Mapping):
            return value
        data = {k: v for k, v in value.items() if k != "fingerprint"}
        return _dataset_adapter().validate_python(data)

    def __iter__(self):
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)


def datasets_of(spec: Any) -> Mapping[str, Any]:
    """The ``datasets`` mapping of a ``Spec``, a ``ResolvedSpec``, or a plain mapping (a
    node's ``datasets`` param: its values are validated into dataset specs as read)."""
    if hasattr(spec, "spec") and hasattr(spec.spec, "datasets"):
        return spec.spec.datasets
    if hasattr(spec, "datasets"):
        return spec.datasets
    return _TypedDatasets(spec)


def dataset_spec(name: str, spec: Any) -> Any:
    """The spec of dataset ``name`` (from a spec, or from a node's ``datasets`` param: what
    the step's key holds); a :class:`UserError` naming the known ones if absent."""
    datasets = datasets_of(spec)
    if name not in datasets:
        raise UserError(
            f"unknown dataset {name!r}",
            hint=f"datasets defined: {', '.join(sorted(datasets)) or '(none)'}",
        )
    return datasets[name]
