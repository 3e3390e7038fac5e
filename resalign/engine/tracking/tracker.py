"""The driver side: :class:`Tracker` owns the invocation's parent run and creates a child run per executed node."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ... import __version__
from ...errors import UserError
from ...graph.svg import render_svg
from ..store import atomic_write_json, writable
from .curation import _spec_dict, curated_params, git_commit, mermaid
from .describe import node_params, node_tags, row_methods, run_name, threat_labels, varying_fields
from .records import (
    NodeRecord,
    TrackingHandle,
    _log_batch_chunked,
    _node_record_path,
    _params_entities,
    _tags,
    load_node_record,
    save_node_record,
)
from .summaries import NOT_TRACKED, describe_summaries, finished_runs, sync_summaries
from .uris import _client, _is_http, artifact_location, check_reachable, setup_lock

log = logging.getLogger(__name__)

# The tag a run closed by another process gets: why it was closed (see sync.close_dead_runs).
END_REASON = "resalign.end_reason"


class Tracker:
    """Creates the parent run and one child run per executed node; links cached nodes."""

    def __init__(
        self,
        uri: str,
        store_root: Path,
        *,
        experiment: str = "resalign",
        run_name: str | None = None,
        system_metrics: bool = True,
        log_models: bool = False,
        nest_under: str | None = None,
        extra_tags: Mapping[str, str] | None = None,
        extra_params: Mapping[str, str] | None = None,
        local_records: bool = True,
    ):
        """``nest_under``: an existing run (e.g. a grid's) the invocation's run is a child
        of; ``extra_tags`` / ``extra_params`` are added to the invocation's run only.
        ``local_records=False`` (a run that executes nothing): the invocation's records go
        to a temporary folder, not ``STORE/tracking/<id>``, so a read-only store is never
        written; they are copied into the store only if MLflow failed mid-way (for
        ``resalign sync``) and the store is writable."""
        self.uri = uri
        self.store_root = Path(store_root).resolve()
        self.log_models = log_models
        self.experiment = experiment
        self.run_name = run_name
        self.system_metrics = system_metrics
        self.offline = False
        self.parent_run_id: str | None = None
        self.inv_dir: Path | None = None
        self._client: Any = None
        self._base_tags: dict[str, str] = {}
        self.nest_under = nest_under
        self.extra_tags = dict(extra_tags or {})
        self.extra_params = dict(extra_params or {})
        self._finished: dict[tuple[str, str], str] | None = None
        self.local_records = local_records

    # called before any compute: every problem with the server surfaces here as a UserError
    def start(self, spec: Any, graph: Any, *, command: str | None = None) -> None:
        check_reachable(self.uri)
        if not _is_http(self.uri):
            self.store_root.mkdir(parents=True, exist_ok=True)
        try:
            self._client = _client(self.uri)
            with setup_lock(self.uri):
                exp = self._client.get_experiment_by_name(self.experiment)
                if exp is None:
                    loc = artifact_location(self.uri, self.store_root)
                    exp_id = self._client.create_experiment(self.experiment, artifact_location=loc)
                else:
                    exp_id = exp.experiment_id
            self._base_tags = {
                "resalign.spec": graph.spec_name,
                "resalign.spec_hash": graph.spec_hash,
                "resalign.version": __version__,
                "resalign.git_commit": git_commit(),
            }
            tags = dict(self._base_tags, **{"resalign.command": command}, **self.extra_tags)
            if self.nest_under:
                tags["mlflow.parentRunId"] = self.nest_under
            run = self._client.create_run(
                exp_id,
                run_name=self.run_name or graph.spec_name,
                tags={k: v for k, v in tags.items() if v is not None},
            )
        except UserError:
            raise
        except Exception as e:
            raise UserError(
                f"cannot start an MLflow run at {self.uri}: {e}; nothing was run",
                where="tracking uri",
                hint="check the tracking URI and that the server/database is usable, or run "
                "with --no-tracking",
            ) from None
        self.parent_run_id = run.info.run_id
        self.experiment_id = exp_id
        self._graph = graph
        self._methods = row_methods(graph)
        self._varying = varying_fields(graph)
        self._threats = threat_labels(graph)
        records = self.store_root / "tracking"
        if not self.local_records:
            records = Path(tempfile.mkdtemp(prefix="resalign-tracking-"))
        self.inv_dir = records / self.parent_run_id
        try:
            (self.inv_dir / "nodes").mkdir(parents=True, exist_ok=True)
            self._write_parent_artifacts(spec, graph)
        except OSError as e:  # a read-only or full store: the run just created must not stay open
            with contextlib.suppress(Exception):
                self._client.set_terminated(self.parent_run_id, status="FAILED")
            raise UserError(
                f"cannot write {e.filename or self.inv_dir}: {e.strerror or e}; nothing was run",
                where="--store",
                hint="make the store writable, or pass --store with a writable folder",
            ) from None
        self._inv = {
            "uri": self.uri,
            "experiment_id": exp_id,
            "parent_run_id": self.parent_run_id,
            "spec_name": graph.spec_name,
            "params": {**curated_params(spec), **self.extra_params},
            "cached": {},
            "status": None,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "synced": {"params": False, "artifacts": False, "cached": False, "status": False},
        }
        self._save_inv()
        self._try(self._sync_parent_static, "logging the parent run")

    def _write_parent_artifacts(self, spec: Any, graph: Any) -> None:
        import yaml

        from ...atomic import atomic_write_text

        art = self.inv_dir / "artifacts"
        atomic_write_text(
            art / "resolved_spec.yaml", yaml.safe_dump(_spec_dict(spec), sort_keys=False)
        )
        atomic_write_text(art / "graph.mmd", mermaid(graph))
        # the same graph drawn, for MLflow's artifact viewer (it renders no Mermaid)
        atomic_write_text(art / "graph.svg", render_svg(graph))
        rows = getattr(spec, "rows", None)
        if isinstance(rows, Mapping) and rows:
            dumped = {k: v.model_dump(mode="json") if hasattr(v, "model_dump") else v
                      for k, v in rows.items()}  # fmt: skip
            atomic_write_text(art / "rows.yaml", yaml.safe_dump(dumped, sort_keys=False))

    def _save_inv(self) -> None:
        atomic_write_json(self.inv_dir / "invocation.json", self._inv)

    def _try(self, fn: Any, what: str) -> Any:
        if self.offline:
            return None
        try:
            return fn()
        except Exception as e:
            log.warning(
                "MLflow at %s failed while %s (%s); continuing locally, "
                "run `resalign sync` later to upload what it missed",
                self.uri,
                what,
                e,
            )
            self.offline = True
            return None

    def _sync_parent_static(self) -> None:
        _sync_invocation(self._client, self.inv_dir, self._inv, final=False)
        self._save_inv()

    def child(self, node: Any) -> TrackingHandle:
        """Create the child run of an executed node (or, offline, only its record)."""
        tags = dict(
            self._base_tags,
            **{
                "mlflow.parentRunId": self.parent_run_id,
                "mlflow.runName": run_name(node, self._varying, self._threats),
                "resalign.node.name": node.name,
                "resalign.node.key": node.key,
                # where the results (models included) are in the local store
                "resalign.node.dir": str(self.store_root / node.kind / node.key),
                **node_tags(node, self._methods),
            },
        )
        tags = {k: v for k, v in tags.items() if v is not None}
        rec = NodeRecord(
            name=node.name,
            kind=node.kind,
            key=node.key,
            params=node_params(node),
            tags=tags,
            log_models=self.log_models,
        )
        path = _node_record_path(self.inv_dir, node.kind, node.key)

        def create() -> None:
            run = self._client.create_run(
                self.experiment_id, run_name=tags["mlflow.runName"], tags=tags
            )
            rec.run_id = run.info.run_id
            _log_batch_chunked(self._client, rec.run_id, params=_params_entities(rec.params))
            rec.params_synced = True

        self._try(create, f"creating the run of {node.name}")
        save_node_record(path, rec)
        return TrackingHandle(self.uri, self.parent_run_id, str(path), self.system_metrics)

    @property
    def methods(self) -> dict[str, str]:
        return self._methods

    def finished_runs(self) -> dict[tuple[str, str], str]:
        """(kind, key) → the run holding that result (:func:`.summaries.finished_runs`),
        read once per invocation."""
        if self._finished is None:
            self._finished = finished_runs(self.store_root, self.uri)
        return self._finished

    def cached(self, node: Any) -> None:
        """A cached node is linked to this invocation by a tag naming the run that holds its
        result (:mod:`.summaries`), not re-logged."""
        self._inv["cached"][node.name] = self.finished_runs().get(
            (node.kind, node.key), NOT_TRACKED
        )
        self._inv["synced"]["cached"] = False
        self._save_inv()

    def finish(self, status: str) -> None:
        if self._inv.get("status") is not None:
            return  # ended already (a crash handler, then the normal path)
        self._inv["status"] = status
        try:  # local work only: what sync creates later if the server is away now
            summ = describe_summaries(self, self._graph)
        except Exception as e:  # a report that cannot be summarised must not fail the run
            log.warning("no MLflow summary runs: %s", e)
            summ = None
        if summ is not None:
            self._inv["summaries"] = summ
        self._save_inv()

        def fin() -> None:
            if status != "FINISHED":
                self._end_open_children(status)
            _sync_invocation(self._client, self.inv_dir, self._inv, final=True)
            self._save_inv()

        self._try(fin, "ending the parent run")
        if not self.local_records and self.inv_dir is not None:
            tmp = self.inv_dir.parent
            if self.offline and writable(self.store_root):
                shutil.copytree(self.inv_dir, self.store_root / "tracking" / self.inv_dir.name)
            shutil.rmtree(tmp, ignore_errors=True)

    def _end_open_children(self, status: str) -> None:
        """End as ``status`` the node runs still open: nodes stopped before their own
        logger could end them (an interrupt while a node was starting)."""
        for path in sorted((self.inv_dir / "nodes").glob("*.json")):
            rec = load_node_record(path)
            if rec is None or rec.status is not None or rec.run_id is None:
                continue
            rec.status = status
            self._client.set_terminated(rec.run_id, status=status)
            rec.status_synced = True
            save_node_record(path, rec)


def _sync_invocation(client: Any, inv_dir: Path, inv: dict[str, Any], *, final: bool) -> None:
    s = inv["synced"]
    run_id = inv["parent_run_id"]
    if not s["params"]:
        _log_batch_chunked(client, run_id, params=_params_entities(inv["params"]))
        s["params"] = True
    if not s["artifacts"]:
        client.log_artifacts(run_id, str(inv_dir / "artifacts"))
        s["artifacts"] = True
    if not s["cached"] and inv["cached"]:
        _log_batch_chunked(
            client,
            run_id,
            tags=_tags({f"resalign.cached.{k}": v for k, v in inv["cached"].items()}),
        )
        s["cached"] = True
    if final:
        sync_summaries(client, inv_dir, inv)
    if final and inv.get("status") and not s["status"]:
        if inv.get("end_reason"):  # closed by another process (sync.close_dead_runs)
            client.set_tag(run_id, END_REASON, inv["end_reason"])
        client.set_terminated(run_id, status=inv["status"])
        s["status"] = True
