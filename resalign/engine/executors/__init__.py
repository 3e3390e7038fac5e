"""Executors: where the engine's node tasks run (see :mod:`.base`)."""

from __future__ import annotations

from .base import Executor, NodeResult, NodeTask
from .local import LocalExecutor

__all__ = ["Executor", "LocalExecutor", "NodeResult", "NodeTask", "make_executor"]


def make_executor(name: str = "local", **options: object) -> Executor:
    """The executor registered as ``name`` (``local``; ``slurm`` when installed)."""
    if name == "local":
        return LocalExecutor(**options)  # type: ignore[arg-type]
    if name == "slurm":
        from .slurm import SlurmExecutor

        return SlurmExecutor(**options)  # type: ignore[arg-type]
    from ...errors import UserError

    raise UserError(f"unknown executor {name!r}", hint="use --executor local")
