"""``resalign sync``: upload whatever the records say MLflow missed (idempotent)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..store import Store, atomic_write_json, read_json, writable
from .artifacts import _sync_node_static
from .records import (
    NodeRecord,
    _log_batch_chunked,
    _read_tail,
    _size,
    load_node_record,
    records_to_metrics,
    save_node_record,
    used_params,
)
from .tracker import END_REASON, _sync_invocation
from .uris import _client, check_reachable


@dataclass
class SyncReport:
    invocations: int = 0
    runs_created: int = 0
    metrics_uploaded: int = 0
    nodes_synced: int = 0
    unreachable: list[str] = field(default_factory=list)

    def summary(self) -> str:
        s = (
            f"synced {self.invocations} invocation(s): {self.nodes_synced} node run(s), "
            f"{self.runs_created} created, {self.metrics_uploaded} metric value(s) uploaded"
        )
        if self.unreachable:
            s += "; unreachable: " + ", ".join(sorted(set(self.unreachable)))
        return s


def _existing_points(client: Any, run_id: str, keys: Iterable[str]) -> set[tuple[str, int]]:
    have: set[tuple[str, int]] = set()
    for k in keys:
        for m in client.get_metric_history(run_id, k):
            have.add((m.key, m.step))
    return have


def _node_source(store_root: Path, rec: NodeRecord) -> tuple[Path, Path | None]:
    done = store_root / rec.kind / rec.key
    if (done / "DONE").is_file():
        return done / "metrics.jsonl", done
    return store_root / "state" / rec.kind / rec.key / "metrics.jsonl", None


def sync(store_root: Path, *, uri: str | None = None) -> SyncReport:
    """Upload to MLflow whatever the local records say the server missed (idempotent).

    ``uri`` restricts the sync to invocations logged to that tracking URI. Runs left RUNNING
    by a driver that died (kill -9, out of memory) are ended FAILED, tagged why
    (:data:`.tracker.END_REASON`)."""
    return _sync(Path(store_root), uri=uri, dead_only=False)


def close_dead_runs(store_root: Path, uri: str) -> int:
    """End the runs at ``uri`` that a driver which died left RUNNING (FAILED, tagged why),
    uploading what their records say is missing; the number of invocations closed. Called
    by each ``run`` that logs to ``uri``; a read-only store is left alone."""
    if not writable(Path(store_root) / "tracking"):
        return 0
    return _sync(Path(store_root), uri=uri, dead_only=True).invocations


def _sync(store_root: Path, *, uri: str | None, dead_only: bool) -> SyncReport:
    store_root = Path(store_root).resolve()
    report = SyncReport()
    for inv_path in sorted((store_root / "tracking").glob("*/invocation.json")):
        inv_dir = inv_path.parent
        try:
            inv = read_json(inv_path)
        except ValueError:
            continue  # a damaged record: nothing to go on
        if not isinstance(inv, dict) or (uri and inv.get("uri") != uri):
            continue
        store = Store(store_root)
        dead = inv.get("status") is None and _driver_dead(inv)
        if dead_only and not dead:
            continue
        reason = None
        if dead:
            # the invocation was killed before it could say so
            reason = (
                f"its driver (pid {inv.get('pid')} on {inv.get('host')}) died without ending "
                "it (SIGKILL, out of memory, a crash); closed by a later resalign process"
            )
            inv["status"], inv["end_reason"] = "FAILED", reason
        recs = [(p, load_node_record(p)) for p in sorted((inv_dir / "nodes").glob("*.json"))]
        pending = []
        for p, r in recs:
            if r is None:
                continue
            if r.status is None:
                if store.is_locked(r.kind, r.key):
                    continue  # being executed right now: its own logger is in charge
                if reason is not None:
                    r.status = "FAILED"
                    r.tags[END_REASON] = reason
                    r.params_synced = False  # to send the tag
                else:
                    r.status = "KILLED"  # an attempt killed mid-node; a later one has the rest
            behind = r.status == "FINISHED" and r.metrics_offset < _size(
                _node_source(store_root, r)[0]
            )
            if not r.synced or behind:
                pending.append((p, r))
        s = inv["synced"]
        parent_done = s["params"] and s["artifacts"] and (s["cached"] or not inv["cached"])
        parent_done = parent_done and (s["status"] or not inv.get("status"))
        summaries = (inv.get("summaries") or {}).get("runs", [])
        parent_done = parent_done and all(x.get("logged") for x in summaries)
        if not pending and parent_done:
            continue
        try:
            check_reachable(inv["uri"])
            client = _client(inv["uri"])
            client.get_run(inv["parent_run_id"])
        except Exception:
            report.unreachable.append(inv["uri"])
            continue
        report.invocations += 1
        for path, rec in pending:
            metrics_path, node_dir = _node_source(store_root, rec)
            if rec.status == "KILLED" or END_REASON in rec.tags:
                # Byte offsets into a file that a later attempt truncated and continued mean
                # nothing: a killed attempt keeps what it had uploaded, and gets no artifacts.
                metrics_path, node_dir = Path(os.devnull), None
            if rec.run_id is None:
                run = client.create_run(
                    inv["experiment_id"],
                    run_name=rec.tags.get("mlflow.runName", rec.name),
                    tags=rec.tags,
                )
                rec.run_id = run.info.run_id
                rec.params_synced = False
                report.runs_created += 1
                save_node_record(path, rec)
            records, new_offset = _read_tail(metrics_path, rec.metrics_offset)
            if records:
                used = used_params(records, rec.params)
                if used:  # logged with the other params by _sync_node_static below
                    rec.params.update(used)
                    rec.params_synced = False
                metrics = records_to_metrics(records, int(time.time() * 1000), rec.params)
                # A crash between log_batch and the record update may have sent some already.
                have = _existing_points(client, rec.run_id, {m.key for m in metrics})
                metrics = [m for m in metrics if (m.key, m.step) not in have]
                _log_batch_chunked(client, rec.run_id, metrics=metrics)
                report.metrics_uploaded += len(metrics)
            rec.metrics_offset = new_offset
            save_node_record(path, rec)
            _sync_node_static(client, rec, node_dir)
            save_node_record(path, rec)
            report.nodes_synced += 1
        _sync_invocation(client, inv_dir, inv, final=True)
        atomic_write_json(inv_path, inv)
    return report


def _driver_dead(inv: Mapping[str, Any]) -> bool:
    """The invocation's driver process is gone (only knowable on the same host)."""
    if inv.get("host") != socket.gethostname() or not inv.get("pid"):
        return False
    try:
        os.kill(int(inv["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
