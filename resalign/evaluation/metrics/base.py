"""The metric registry: every metric is a registered, versioned definition.

A metric class has an ``id`` (the spec's ``kind``), a ``version`` (bumped whenever the numbers
it produces could change) and is constructed from its spec block; ``params()`` returns every
parameter that determines its value. ``compute`` returns one or more :class:`MetricValue`
entries; each carries the definition id, version and parameters into ``metrics.json``, MLflow
and the report, so a number is never separated from how it was computed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ...errors import UserError
from ...spec.schema.evaluate import METRIC_OUTPUTS


@dataclass
class MetricValue:
    """One reported number and how it was obtained.

    ``role`` is ``safety`` (reported before and after each attack) or ``utility``;
    ``better`` is ``lower`` or ``higher``.
    """

    name: str
    value: float
    definition: str
    version: str
    params: dict[str, Any]
    role: str = "safety"
    better: str = "lower"
    n: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "definition": self.definition,
            "version": self.version,
            "params": self.params,
            "role": self.role,
            "better": self.better,
            "n": self.n,
            **({"extra": self.extra} if self.extra else {}),
        }


@dataclass(frozen=True)
class EvalImage:
    """A generated image handed to metrics: its file, prompt and indices."""

    path: Path
    prompt: str
    prompt_index: int
    image_index: int


class Metric:
    """Base class of a registered metric."""

    id: ClassVar[str]
    version: ClassVar[str]

    def __init__(self, spec: Mapping[str, Any], context: Mapping[str, Any] | None = None):
        self.spec = dict(spec)
        self.context = dict(context or {})

    def params(self) -> dict[str, Any]:
        """Every parameter that determines the value (logged with it)."""
        return {k: v for k, v in self.spec.items() if k not in ("kind", "generation")}

    def check(self) -> None:
        """Validation-time checks (local files exist); raise ``UserError``. Default: none."""

    def prompts(self) -> list[str] | None:
        """The prompts this metric generates from, when it chooses them itself."""
        return None

    def compute(self, images: Sequence[EvalImage]) -> list[MetricValue]:
        raise NotImplementedError

    def value(self, name: str, value: float, **kw: Any) -> MetricValue:
        declared = METRIC_OUTPUTS.get(self.id)
        if declared is not None and name not in declared:
            # the schema's list is what validation checks search metrics against
            raise ValueError(f"metric {self.id!r} reports {name!r}, not declared in the "
                             f"schema's METRIC_OUTPUTS ({', '.join(declared)})")  # fmt: skip
        return MetricValue(name, float(value), self.id, self.version, self.params(), **kw)


METRICS: dict[str, type[Metric]] = {}


def register_metric(cls: type[Metric]) -> type[Metric]:
    """Class decorator: register ``cls`` under ``cls.id``."""
    if cls.id in METRICS and METRICS[cls.id] is not cls:
        raise ValueError(f"metric {cls.id!r} registered twice")
    METRICS[cls.id] = cls
    return cls


def get_metric(kind: str) -> type[Metric]:
    from . import _load_all

    _load_all()
    if kind not in METRICS:
        raise UserError(
            f"unknown metric {kind!r}", hint=f"registered metrics: {', '.join(sorted(METRICS))}"
        )
    return METRICS[kind]


def require_files(paths: Mapping[str, str | Path], metric: str, what: str) -> None:
    """Raise a ``UserError`` naming every missing local weight file of ``metric``."""
    missing = [f"{field_name}: {p}" for field_name, p in paths.items() if not Path(p).exists()]
    if missing:
        raise UserError(
            f"metric {metric} needs local weights that are missing: " + "; ".join(missing),
            hint=what,
        )
