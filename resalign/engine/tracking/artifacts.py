"""Artifact policy: a node's folder is uploaded to its run, model folders only with ``tracking.log_models`` (else ``local_models.json`` points at the store)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..context import RESUME
from .records import NodeRecord, _log_batch_chunked, _params_entities, _tags

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def is_model_folder(d: Path) -> bool:
    """A diffusers/transformers folder (``save_pretrained``): a pipeline (``model_index.json``)
    or a ``config.json`` next to weight files."""
    if (d / "model_index.json").is_file():
        return True
    return (d / "config.json").is_file() and any(
        p.suffix in WEIGHT_SUFFIXES for p in d.iterdir() if p.is_file()
    )


def _tree_size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def log_node_artifacts(client: Any, run_id: str, root: Path, *, log_models: bool) -> list[dict]:
    """Upload a completed node's folder to its run. Without ``log_models`` model folders
    (:func:`is_model_folder`: a merged UNet is 3.4 GB for SD) are not uploaded; the run gets
    ``local_models.json`` (artifact path, local path, bytes of each) instead, and every other
    file (LoRA weights, metrics, images, stats). The training state a later node continues
    from (``resume/``: for a full fine-tune the UNet and two Adam moments) is never uploaded,
    only listed there. Returns the folders not uploaded."""
    skipped: list[dict] = []

    def holds_model(d: Path) -> bool:
        return any(is_model_folder(Path(dp)) for dp, _, _ in os.walk(d))

    def visit(d: Path, rel: str) -> None:
        for p in sorted(d.iterdir()):
            r = f"{rel}/{p.name}" if rel else p.name
            if p.is_dir():
                if (not rel and p.name == RESUME) or (not log_models and is_model_folder(p)):
                    skipped.append({"artifact": r, "local": str(p), "bytes": _tree_size(p)})
                elif not log_models and holds_model(p):
                    visit(p, r)
                else:  # one call per plain folder (images/), not per file
                    client.log_artifacts(run_id, str(p), artifact_path=r)
            elif p.is_file():
                client.log_artifact(run_id, str(p), artifact_path=rel or None)

    visit(root, "")
    if skipped:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            index = Path(tmp) / "local_models.json"
            index.write_text(json.dumps(skipped, indent=2) + "\n", encoding="utf-8")
            client.log_artifact(run_id, str(index))
    return skipped


def log_node_cost(client: Any, run_id: str, node_dir: Path) -> None:
    """The node's cost from its ``DONE`` manifest (resalign.engine.cost) as ``cost.<field>``
    metrics of its run, once, with the artifacts (so ``resalign sync`` logs it too)."""
    import time

    from mlflow.entities import Metric

    from ..store import DONE, read_manifest

    cost = (read_manifest(node_dir / DONE) or {}).get("cost")
    if not isinstance(cost, dict):
        return
    now = int(time.time() * 1000)
    metrics = [Metric(f"cost.{k}", float(v), now, 0) for k, v in sorted(cost.items())
               if isinstance(v, int | float) and not isinstance(v, bool)]  # fmt: skip
    if metrics:
        _log_batch_chunked(client, run_id, metrics=metrics)


def _sync_node_static(client: Any, rec: NodeRecord, node_dir: Path | None) -> None:
    """Params, tags, artifacts and status of a node's run (all idempotent in MLflow)."""
    if not rec.params_synced:
        _log_batch_chunked(
            client, rec.run_id, params=_params_entities(rec.params), tags=_tags(rec.tags)
        )
        rec.params_synced = True
    if not rec.artifacts_synced and node_dir is not None and Path(node_dir).is_dir():
        log_node_artifacts(client, rec.run_id, Path(node_dir), log_models=rec.log_models)
        log_node_cost(client, rec.run_id, Path(node_dir))
        rec.artifacts_synced = True
    elif node_dir is None and rec.status in ("FAILED", "KILLED"):
        rec.artifacts_synced = True  # a failed node has no complete outputs to upload
    if rec.status and not rec.status_synced:
        client.set_terminated(rec.run_id, status=rec.status)
        rec.status_synced = True
