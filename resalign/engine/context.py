"""The engine's implementation of :class:`resalign.steps.base.StepContext`.

Metrics go to ``runs/state/<kind>/<key>/metrics.jsonl`` while the node runs (it survives a
kill) and are copied into the result folder on success. Resume semantics, which every step
that checkpoints relies on:

* ``ctx.load_checkpoint()`` returns ``(state, step)`` of the last :meth:`save_checkpoint` (or
  None) and declares the resume point itself; steps that manage their own files under
  ``ctx.state`` call ``ctx.resumed_from(step)`` instead, before their first ``log_metrics``.
* On a resume from ``step`` the metric records with ``step > step`` (logged after the last
  checkpoint by the killed attempt, about to be logged again) are dropped, so the history has
  no duplicates.
* A step that never declares a resume point gets it inferred from its first ``log_metrics``:
  the records with ``step >=`` that first step are dropped (a fresh start logs step 1 or 0
  first and drops everything; a silent resume after step 10 logs 11 first and keeps 1..10).
  This assumes steps log in increasing step order, which every step here does.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..atomic import atomic_open, atomic_write_json
from ..graph.nodes import Node
from .progress import ProgressUI
from .store import read_json, truncate_metrics

CHECKPOINT = "checkpoint.pt"
RESUME = "resume"  # where a result keeps the state a later node continues from


class NodeContext:
    """What a step sees while it runs (see resalign/steps/base.py)."""

    def __init__(
        self,
        *,
        node: Node,
        inputs: Mapping[str, Path],
        out: Path,
        state: Path,
        device: str = "cpu",
        checkpoint_every: int | None = None,
        logger: Any = None,
        ui: ProgressUI | None = None,
    ):
        self.node = node
        self.params = node.params
        self.inputs = dict(inputs)
        self.out = Path(out)
        self.state = Path(state)
        self.device = device
        self.checkpoint_every = checkpoint_every
        self.state.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.state / "metrics.jsonl"
        self._logger = logger
        self._ui = ui or ProgressUI(enabled=False)
        self._resume_declared = False
        self._resumed_step: int | None = None
        self._metrics_file: Any = None

    # -- metrics ---------------------------------------------------------------------------
    def _declare(self, keep_through: int | None, *, infer: bool = False) -> None:
        self._resume_declared = True
        self._resumed_step = None if infer else keep_through
        self._close_metrics()
        truncate_metrics(self.metrics_path, keep_through)
        if self._logger is not None:
            self._logger.reset_offset()

    def resumed_from(self, step: int | None) -> None:
        """Declare that the step continues after ``step`` (None: starts from scratch)."""
        self._declare(step)

    @property
    def resumed_step(self) -> int | None:
        return self._resumed_step

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self._resume_declared:
            first = int(step) if step is not None else 0
            self._declare(first - 1, infer=True)
        rec: dict[str, Any] = {"step": int(step) if step is not None else 0}
        for k, v in metrics.items():
            fv = float(v)
            rec[k] = fv if math.isfinite(fv) else str(fv)
        if self._metrics_file is None:
            self._metrics_file = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115
        # One write per record then flush: a kill loses at most the line being written
        # (which readers skip), never a record before it.
        self._metrics_file.write(json.dumps(rec, sort_keys=True) + "\n")
        self._metrics_file.flush()
        self._ui.step_line(self.node.name, step, metrics)
        if self._logger is not None:
            self._logger.notify()

    def _close_metrics(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.flush()
            os.fsync(self._metrics_file.fileno())
            self._metrics_file.close()
            self._metrics_file = None

    def sync_metrics(self) -> None:
        """fsync the metrics written so far (called before every checkpoint). The MLflow
        mirror is not flushed here: it follows on its own clock and the sync record says
        how far it got, so checkpoints stay cheap."""
        if self._metrics_file is not None:
            self._metrics_file.flush()
            os.fsync(self._metrics_file.fileno())

    # -- params and artifacts --------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        path = self.out / "params.json"
        merged = read_json(path, {}) or {}
        merged.update({k: v for k, v in params.items()})
        atomic_write_json(path, merged)
        if self._logger is not None:
            self._logger.log_params(params)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Copy ``path`` into the result folder (``artifacts/<artifact_path>/``); the whole
        result folder is uploaded to the node's run when it completes."""
        src = Path(path)
        dst = self.out / "artifacts" / (artifact_path or "")
        dst.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst / src.name, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst / src.name)

    def progress(self, total: int, description: str) -> contextlib.AbstractContextManager[Any]:
        return self._ui.bar(total, f"{self.node.name}: {description}")

    # -- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, state: Mapping[str, Any], step: int) -> None:
        """Atomically save ``state`` (tensors, numbers, strings, nested dicts/lists) as of
        ``step`` (the metrics logged so far are fsynced first)."""
        import torch

        self.sync_metrics()
        with atomic_open(self.state / CHECKPOINT) as f:
            torch.save({"step": int(step), "state": dict(state)}, f)

    def load_checkpoint(self, map_location: str = "cpu") -> tuple[dict[str, Any], int] | None:
        """The last saved ``(state, step)``, declaring the resume point; None if none.
        Read with ``torch.load(weights_only=True)``: no code runs from the state folder."""
        import torch

        path = self.state / CHECKPOINT
        if not path.is_file():
            self.resumed_from(None)
            return None
        ck = torch.load(path, map_location=map_location, weights_only=True)
        self.resumed_from(int(ck["step"]))
        return ck["state"], int(ck["step"])

    def export_checkpoint(self) -> None:
        """Copy the last checkpoint and the metric history into ``out/resume/`` (see
        :meth:`adopt_checkpoint`)."""
        src = self.state / CHECKPOINT
        if not src.is_file():
            raise RuntimeError(f"{self.node.name}: no checkpoint to export in {self.state}")
        self.sync_metrics()
        dst = self.out / RESUME
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst / CHECKPOINT)
        if self.metrics_path.is_file():
            shutil.copy2(self.metrics_path, dst / "metrics.jsonl")

    def adopt_checkpoint(self, node_out: Path) -> bool:
        """Make the checkpoint another node exported (``node_out/resume/``) this node's own,
        with its metric history, unless this node already has a checkpoint (an interrupted
        attempt got further). Call before :meth:`load_checkpoint`. False when there is
        nothing to adopt (the resume folder was deleted): the step starts from scratch."""
        src = Path(node_out) / RESUME
        if (self.state / CHECKPOINT).is_file() or not (src / CHECKPOINT).is_file():
            return False
        self._close_metrics()
        shutil.copy2(src / CHECKPOINT, self.state / CHECKPOINT)
        if (src / "metrics.jsonl").is_file():
            shutil.copy2(src / "metrics.jsonl", self.metrics_path)
        else:
            self.metrics_path.unlink(missing_ok=True)
        return True

    def close(self) -> None:
        self._close_metrics()
