"""The worker side: :class:`NodeLogger` mirrors one node's metrics.jsonl to its MLflow child run."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .artifacts import _sync_node_static
from .curation import flatten
from .records import (
    TrackingHandle,
    _log_batch_chunked,
    _params_entities,
    _read_tail,
    _size,
    load_node_record,
    records_to_metrics,
    save_node_record,
    used_params,
)
from .uris import _client

log = logging.getLogger(__name__)


FLUSH_SECONDS = 5.0


FLUSH_LINES = 500


def _node_system_metrics_class() -> type:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class NodeSystemMetrics(SystemMetricsMonitor):
        """MLflow's monitor logs a sample every ``sampling_interval`` (10 s) and drops what it
        collected when stopped earlier, so nodes shorter than 10 s (most evaluations, the
        report) had no system metrics at all. Stopped before it logged anything, this one
        logs one sample at step 0 taken at the stop (CPU utilisation: the mean since the
        node started, psutil's cpu_percent since its previous call): every node run has
        system metrics."""

        def finish(self) -> None:
            if self._process is None:
                return
            self._shutdown_event.set()
            self._process.join()
            self._process = None
            try:
                if self._logging_step == 0:
                    for monitor in self.monitors:
                        monitor.clear_metrics()  # the sample taken at the start
                    self.collect_metrics()
                    self.publish_metrics(self.aggregate_metrics())
                self.mlflow_logger.flush()
            except Exception as e:  # the run ended meanwhile, the server went away
                log.warning("logging system metrics: %s", e)

    return NodeSystemMetrics


def _NodeSystemMetrics(run_id: str, tracking_uri: str) -> Any:  # noqa: N802
    return _node_system_metrics_class()(run_id, tracking_uri=tracking_uri)


class NodeLogger:
    """Mirrors one node's ``metrics.jsonl`` to its MLflow child run, in batches.

    Never raises because of the server: the first failure switches it offline, with one
    warning, and the sync record tells ``resalign sync`` where to continue.
    """

    def __init__(self, handle: TrackingHandle, metrics_path: Path):
        self.handle = handle
        self.metrics_path = Path(metrics_path)
        self.record_path = Path(handle.record_path)
        self.rec = load_node_record(self.record_path)
        self.offline = self.rec is None or self.rec.run_id is None
        self._client = None if self.offline else _client(handle.uri)
        self._last_flush = time.monotonic()
        self._pending = 0
        self._monitor: Any = None
        self.log_seconds = 0.0  # time spent talking to MLflow (the logging overhead)

    def _fail(self, what: str, e: Exception) -> None:
        if not self.offline:
            log.warning(
                "MLflow at %s failed while %s (%s); continuing locally, "
                "run `resalign sync` later to upload what it missed",
                self.handle.uri,
                what,
                e,
            )
        self.offline = True
        self.stop_system_metrics()

    def start_system_metrics(self) -> None:
        if self.offline or not self.handle.system_metrics:
            return
        try:
            # its per-node start/stop INFO lines would drown the progress output
            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)

            self._monitor = _NodeSystemMetrics(self.rec.run_id, tracking_uri=self.handle.uri)
            self._monitor.start()
        except Exception as e:  # psutil missing and the like: not worth failing a run
            log.warning("system metrics unavailable: %s", e)
            self._monitor = None

    def stop_system_metrics(self) -> None:
        mon, self._monitor = self._monitor, None
        if mon is not None:
            try:
                mon.finish()
            except Exception as e:
                log.warning("stopping system metrics: %s", e)

    def reset_offset(self) -> None:
        """The metrics file was truncated (resume) before anything was uploaded."""
        if self.rec is not None and self.rec.metrics_offset:
            log.warning(
                "metrics of %s were uploaded before the step declared its resume point; "
                "MLflow may show the re-done steps twice",
                self.rec.name,
            )
        if self.rec is not None:
            self.rec.metrics_offset = 0

    def notify(self, n_lines: int = 1) -> None:
        self._pending += n_lines
        if self._pending >= FLUSH_LINES or time.monotonic() - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        self._pending = 0
        if self.offline:
            return
        t0 = time.perf_counter()
        try:
            records, new_offset = _read_tail(self.metrics_path, self.rec.metrics_offset)
            if records:
                metrics = records_to_metrics(records, int(time.time() * 1000), self.rec.params)
                used = used_params(records, self.rec.params)  # the lr used, where constant
                self.rec.params.update(used)
                _log_batch_chunked(
                    self._client, self.rec.run_id, metrics=metrics, params=_params_entities(used)
                )
                self.rec.metrics_offset = new_offset
                save_node_record(self.record_path, self.rec)
        except Exception as e:
            self._fail("logging metrics", e)
        finally:
            self.log_seconds += time.perf_counter() - t0

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = flatten(dict(params))
        if self.rec is None:
            return
        self.rec.params.update(flat)
        self.rec.params_synced = False
        save_node_record(self.record_path, self.rec)
        if self.offline:
            return
        try:
            _log_batch_chunked(self._client, self.rec.run_id, params=_params_entities(flat))
            self.rec.params_synced = True
            save_node_record(self.record_path, self.rec)
        except Exception as e:
            self._fail("logging params", e)

    def finish_elsewhere(self, node_dir: Path) -> None:
        """Another invocation executed the node while this one waited for its lock: its run
        holds the metrics and artifacts. This run is closed FINISHED with a tag saying so
        and nothing else, and its record says there is nothing for ``sync`` to upload."""
        if self.rec is None:
            return
        self.rec.tags["resalign.node.done_by"] = "another invocation"
        self.rec.params_synced = False  # carries the tag
        self.rec.artifacts_synced = True
        self.rec.metrics_offset = _size(Path(node_dir) / "metrics.jsonl")
        self.rec.status = "FINISHED"
        save_node_record(self.record_path, self.rec)
        if self.offline:
            return
        try:
            _sync_node_static(self._client, self.rec, None)
            save_node_record(self.record_path, self.rec)
        except Exception as e:
            self._fail("finishing the run", e)

    def finish(self, status: str, metrics_path: Path, node_dir: Path | None) -> None:
        """Final flush, artifacts, terminal status; all recorded for sync."""
        self.stop_system_metrics()
        self.metrics_path = Path(metrics_path)
        self.flush()
        if self.rec is None:
            return
        self.rec.status = status
        save_node_record(self.record_path, self.rec)
        if self.offline:
            return
        t0 = time.perf_counter()
        try:
            _sync_node_static(self._client, self.rec, node_dir)
            save_node_record(self.record_path, self.rec)
        except Exception as e:
            self._fail("finishing the run", e)
        finally:
            self.log_seconds += time.perf_counter() - t0
