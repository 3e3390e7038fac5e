"""Sync records: what was uploaded of each node (``runs/tracking/<parent>/nodes/<kind>-<key>.json``), the handle a worker logs through, and the batch helpers that turn metrics.jsonl records into MLflow entities."""

from __future__ import annotations

import json
import re
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


_META_KEY = re.compile(r"^meta(\d+)\.(.+)$")
# Per-config values that are a property of the sampled configuration (its name is logged as
# a string, its settings are params: unlearn.resilience.meta.configs.<name>.*), constant
# unless the configurations are drawn from a distribution.
_CONFIG_SETTINGS = ("lr", "steps", "batch_size")


def _is_aggregate(x: str) -> bool:
    """A per-config value the method also reports aggregated over the step's configs (mean
    or sum, resalign.algorithms.methods.resalign): the top-level ``lr`` is the outer
    optimizer's, not an aggregate of the configs' ``lr``."""
    return x in ("hypergrad_norm", "retries", "fallback", "cosine", "inner_loss") or bool(
        re.fullmatch(r"residual_\d+", x)
    )


def mirrored(record: Mapping[str, Any], params: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What of one metrics.jsonl record goes to MLflow (the record itself stays as is).

    Left out: with one simulated fine-tune per outer step (only ``meta0.*`` keys), each
    ``meta0.<x>`` whose aggregate ``<x>`` (or ``<x>s``: ``fallback`` → ``fallbacks``) is in the
    record too (:func:`_is_aggregate`): the mean over one config is that config's value, the
    same number twice. And
    constants, which are params of the node: a config's ``lr``/``steps``/``batch_size``
    unless ``params`` say a ``distribution`` draws them, the Moreau ``gamma`` unless it is
    ``auto``, the Richardson ``damping`` (the configured one halved ``retries`` times), and a
    learning rate that cannot change (:func:`used_params` logs it as a param)."""
    params = params or {}
    constant = _constant_lrs(params)
    configs = {m.group(1) for k in record if (m := _META_KEY.match(k))}
    sampled = params.get("unlearn.resilience.meta.distribution", "null") != "null"
    auto_gamma = params.get("unlearn.resilience.hypergradient.gamma") == "auto"
    out: dict[str, Any] = {}
    for k, v in record.items():
        if k in constant:
            continue  # a param (used_params)
        m = _META_KEY.match(k)
        if m is not None:
            x = m.group(2)
            if len(configs) == 1 and _is_aggregate(x) and (x in record or f"{x}s" in record):
                continue
            if (x in _CONFIG_SETTINGS and not sampled) or x == "damping":
                continue
            if x == "gamma" and not auto_gamma:
                continue
        out[k] = v
    return out


def _constant_lrs(params: Mapping[str, str]) -> tuple[str, ...]:
    """The learning-rate metrics of a node whose lr cannot change (no schedule): the outer
    optimizer of unlearning has none, an attack has one unless ``constant`` without warmup."""
    if "unlearn.optimizer.lr" in params:
        return ("lr",)
    if params.get("threat.schedule") == "constant" and params.get("threat.warmup_steps") in (
        "0",
        None,
    ):
        return ("attack/lr",)
    return ()


def used_params(
    records: Iterable[Mapping[str, Any]], params: Mapping[str, str] | None
) -> dict[str, str]:
    """Params read off the records: the lr the optimizer actually used, where it cannot
    change (:func:`_constant_lrs`), as ``<metric>_used`` (``lr_used``, ``attack/lr_used``)
    from the first record that has it. A constant series is no chart: MLflow draws it on an
    axis from value − 1 to value + 1, where a constant lr of 1e-4 reads as a flat 0."""
    out: dict[str, str] = {}
    keys = _constant_lrs(params or {})
    for r in records:
        for k in keys:
            if k in r and f"{k}_used" not in out and f"{k}_used" not in (params or {}):
                out[f"{k}_used"] = repr(float(r[k]))
    return out


def records_to_metrics(
    records: Iterable[Mapping[str, Any]],
    timestamp_ms: int,
    params: Mapping[str, str] | None = None,
) -> list[Any]:
    """metrics.jsonl records -> mlflow Metric entities (one per name and step), as
    :func:`mirrored` selects them given the node's flat ``params``."""
    from mlflow.entities import Metric

    out = []
    for r in records:
        step = int(r.get("step") or 0)
        for k, v in mirrored(r, params).items():
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
