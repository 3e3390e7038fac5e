"""The contract between the engine and the steps it runs.

A step is a small class registered by ``kind``. Its module imports no torch at import time
(the registry is read by ``plan``); heavy imports happen inside ``run``. The engine builds a
``StepContext`` for every executed node: the step reads ``ctx.params`` and ``ctx.inputs``,
writes its results under ``ctx.out`` (a staging folder the engine renames atomically into
``runs/<kind>/<key>/`` once ``run`` returns), keeps resumable state under ``ctx.state``, and
reports through ``ctx.log_metrics``. A step never talks to MLflow or the store directly.

Resume (engine: resalign/engine/context.py). A long step checkpoints every
``ctx.checkpoint_every or <its spec interval>`` steps, either with
``ctx.save_checkpoint(state, step)`` / ``ctx.load_checkpoint() -> (state, step) | None``
(atomic torch.save / torch.load(weights_only=True) under ``ctx.state``; loading declares the
resume point), or with its own files under ``ctx.state`` and then ``ctx.resumed_from(step)``
before its first ``log_metrics`` (``None``: starting afresh). A checkpoint at ``step`` means
steps 1..step are done and logged. On resume the engine drops metric records with a larger
step so the history has no duplicates; a step that declares nothing gets the resume point
inferred from its first logged step (records at or after it are dropped), so log in
increasing step order. ``log_metrics(..., step=None)`` records step 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar, Protocol

from ..graph.nodes import Node


class Progress(Protocol):
    def advance(self, n: int = 1) -> None: ...


class StepContext(Protocol):
    node: Node
    params: Mapping[str, Any]
    spec: Any  # resalign.spec.schema.Spec, resolved
    inputs: Mapping[str, Path]  # role -> completed upstream output folder
    out: Path  # staging folder; becomes runs/<kind>/<key>/ when run() returns
    state: Path  # durable folder for resume checkpoints; survives a crash
    device: str
    checkpoint_every: int | None  # engine override of the spec's checkpoint interval

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def progress(self, total: int, description: str) -> AbstractContextManager[Progress]: ...

    def resumed_from(self, step: int | None) -> None: ...

    def save_checkpoint(self, state: Mapping[str, Any], step: int) -> None: ...

    def load_checkpoint(self) -> tuple[dict[str, Any], int] | None: ...


class Step:
    """Base class. Subclasses set ``kind``, ``version`` and implement ``run``.

    ``version`` enters every node key of this kind: bump it when the step's results change.
    """

    kind: ClassVar[str]
    version: ClassVar[str] = "1"

    def run(self, ctx: StepContext) -> None:
        raise NotImplementedError


STEPS: dict[str, type[Step]] = {}


def register(cls: type[Step]) -> type[Step]:
    """Class decorator: make ``cls`` the implementation of ``cls.kind``."""
    if cls.kind in STEPS and STEPS[cls.kind] is not cls:
        raise ValueError(f"step kind {cls.kind!r} registered twice")
    STEPS[cls.kind] = cls
    return cls
