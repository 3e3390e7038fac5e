"""Sync records: what was uploaded of each node (``runs/tracking/<parent>/nodes/<kind>-<key>.json``), the handle a worker logs through, and the batch helpers that turn metrics.jsonl records into MLflow entities."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..store import atomic_write_json, read_json
from .curation import MAX_PARAM_LEN, _clean_key


def _params_entities(params: Mapping[str, str]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(_clean_key(k), str(v)[:MAX_PARAM_LEN]) for k, v in params.items()]


def _log_batch_chunked(client: Any, run_id: str, *, metrics=(), params=(), tags=()) -> None:
    metrics, params, tags = list(metrics), list(params), list(tags)
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])
    for i in range(0, len(tags), 100):
        client.log_batch(run_id, tags=tags[i : i + 100])
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])


def _tags(d: Mapping[str, Any]) -> list[Any]:
    from mlflow.entities import RunTag

    return [RunTag(k, str(v)[:5000]) for k, v in d.items() if v is not None]


def records_to_metrics(records: Iterable[Mapping[str, Any]], timestamp_ms: int) -> list[Any]:
    """metrics.jsonl records -> mlflow Metric entities (one per name and step)."""
    from mlflow.entities import Metric

    out = []
    for r in records:
        step = int(r.get("step") or 0)
        for k, v in r.items():
            if k == "step" or isinstance(v, bool) or not isinstance(v, int | float):
                continue
            out.append(Metric(_clean_key(k), float(v), timestamp_ms, step))
    return out


def _read_tail(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """Complete JSON lines of ``path`` after byte ``offset``, and the new offset."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    records = [json.loads(line) for line in data[: end + 1].split(b"\n") if line.strip()]
    return records, offset + end + 1


@dataclass
class NodeRecord:
    """What of one executed node has reached the tracking server."""

    name: str
    kind: str
    key: str
    run_id: str | None = None
    metrics_offset: int = 0
    params_synced: bool = False
    artifacts_synced: bool = False
    status: str | None = None  # FINISHED / FAILED / KILLED once the node ended
    status_synced: bool = False
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    log_models: bool = False  # upload model folders too (tracking.log_models)

    @property
    def synced(self) -> bool:
        return bool(
            self.run_id
            and self.params_synced
            and self.artifacts_synced
            and self.status
            and self.status_synced
        )


def _node_record_path(inv_dir: Path, kind: str, key: str) -> Path:
    return inv_dir / "nodes" / f"{kind}-{key}.json"


def load_node_record(path: Path) -> NodeRecord | None:
    d = read_json(path)
    return NodeRecord(**d) if d else None


def save_node_record(path: Path, rec: NodeRecord) -> None:
    atomic_write_json(path, asdict(rec))


@dataclass
class TrackingHandle:
    """Everything a worker needs to log one node (picklable; created by the driver)."""

    uri: str
    parent_run_id: str
    record_path: str
    system_metrics: bool = True


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
