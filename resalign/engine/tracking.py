"""MLflow tracking: one parent run per invocation, one child run per executed node.

The local store is the source of truth; MLflow is a mirror that can lag. Every node's metrics
go to ``metrics.jsonl`` first; the :class:`NodeLogger` uploads the file's tail with
``MlflowClient.log_batch`` (per-step ``log_metric`` is ~17x slower) and records how far it got
in a per-node sync record. If the server goes away mid-run the run carries on locally and
``resalign sync`` (:func:`sync`) later uploads whatever the records say is missing, skipping
(key, step) pairs the server already has, so it is idempotent.

Records (all JSON, atomic writes)::

    runs/tracking/<parent_run_id>/invocation.json   uri, experiment, parent run, cached nodes
    runs/tracking/<parent_run_id>/nodes/<kind>-<key>.json
        run_id, metrics_offset (bytes of metrics.jsonl uploaded), params/artifacts/status synced

Tracking URI precedence: ``--tracking-uri`` > ``MLFLOW_TRACKING_URI`` > the spec's
``tracking.uri`` > SQLite at ``<store>/mlflow.db`` with artifacts under ``<store>/mlartifacts``
(both absolute). MLflow is imported lazily: ``plan`` must not pay for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import random
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import UserError
from .store import Store, atomic_write_json, read_json

log = logging.getLogger(__name__)

FLUSH_SECONDS = 5.0
FLUSH_LINES = 500
MAX_PARAM_LEN = 6000
_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /:]")


def _client_env_defaults() -> None:
    # MLflow's HTTP client retries for minutes by default; a dead server must make us go
    # offline (and sync later) within seconds, not stall the GPU job.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    # set_terminated would print "View run ... at URL" per node; the driver says it once
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def default_tracking_uri(store_root: Path) -> str:
    return f"sqlite:///{Path(store_root).resolve() / 'mlflow.db'}"


def default_artifact_root(store_root: Path) -> str:
    return (Path(store_root).resolve() / "mlartifacts").as_uri()


def artifact_location(uri: str, store_root: Path) -> str | None:
    """Where a new experiment keeps its artifacts. For a SQLite URI: ``mlartifacts/`` next to
    the database (for the default URI that is ``<store>/mlartifacts``); MLflow's own default
    there is ``./mlruns`` relative to whatever the working directory is. Other URIs (servers,
    file stores): None, their own default."""
    if uri == default_tracking_uri(store_root):
        return default_artifact_root(store_root)
    if uri.startswith("sqlite:///"):
        # sqlite:////abs/x.db is absolute, sqlite:///x.db relative to the working directory
        db = Path(uri[len("sqlite:///") :]).resolve()
        return (db.parent / "mlartifacts").as_uri()
    return None


def resolve_tracking_uri(cli_uri: str | None, spec_uri: str | None, store_root: Path) -> str:
    """CLI flag, then ``MLFLOW_TRACKING_URI``, then the spec, then the project's SQLite."""
    for uri in (cli_uri, os.environ.get("MLFLOW_TRACKING_URI"), spec_uri):
        if uri:
            return uri
    return default_tracking_uri(store_root)


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise UserError if an HTTP tracking server does not answer its health check."""
    if not _is_http(uri):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            if r.status != 200:
                raise OSError(f"HTTP {r.status}")
    except (OSError, urllib.error.URLError) as e:
        raise UserError(
            f"the MLflow tracking server at {uri} is not reachable ({e}); nothing was run",
            where="tracking uri",
            hint="start the server, or point --tracking-uri / MLFLOW_TRACKING_URI / "
            "tracking.uri elsewhere, or run with --no-tracking (sync later with `resalign sync`)",
        ) from None


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :]).resolve()


@contextlib.contextmanager
def setup_lock(uri: str) -> Iterator[None]:
    """Serialize first use of a SQLite tracking database across processes. Two ``resalign
    run`` started together on a new database both ran MLflow's schema migration and one died
    with ``duplicate column name: step``; two creating the experiment race the same way."""
    db = _sqlite_path(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# SQLite lets one writer at a time; others wait out its busy timeout (5 s in pysqlite) and
# then raise "database is locked". Seen with two drivers and their workers writing one
# database on 2 loaded cores; retried with backoff instead of going offline (which would
# leave the points to `resalign sync`).
LOCKED_RETRIES = 8


def _locked(e: BaseException) -> bool:
    return "database is locked" in str(e) or "database table is locked" in str(e)


class _RetryingClient:
    """An ``MlflowClient`` whose calls are retried while SQLite says it is locked."""

    def __init__(self, client: Any):
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            for attempt in range(LOCKED_RETRIES + 1):
                try:
                    return attr(*args, **kwargs)
                except Exception as e:
                    if not _locked(e) or attempt == LOCKED_RETRIES:
                        raise
                    time.sleep(min(0.2 * 2**attempt, 5.0) * (0.5 + random.random()))
            raise AssertionError("unreachable")

        return call


def _client(uri: str) -> Any:
    _client_env_defaults()
    from mlflow.tracking import MlflowClient

    if _sqlite_path(uri) is None:
        return MlflowClient(tracking_uri=uri)
    with setup_lock(uri):
        client = _RetryingClient(MlflowClient(tracking_uri=uri))
        # the first query creates (or migrates) the database: under the lock
        client.search_experiments(max_results=1)
    return client


def git_commit() -> str | None:
    """The commit of the checkout the package runs from, when it is a git checkout."""
    try:
        r = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings to dotted keys; lists become JSON strings."""
    out: dict[str, str] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif prefix:
        out[prefix] = obj if isinstance(obj, str) else json.dumps(obj, sort_keys=True)
    return out


def _clean_key(k: str) -> str:
    return _KEY_BAD.sub("_", k)[:250]


# The key parameters of a resolved spec that a researcher compares runs by.
CURATED = [
    "name",
    "seed",
    "model.family",
    "model.pretrained",
    "model.dtype",
    "model.trainable.kind",
    "model.trainable.rank",
    "unlearn.method",
    "unlearn.steps",
    "unlearn.optimizer.name",
    "unlearn.optimizer.lr",
    "unlearn.harmful_loss.kind",
    "unlearn.regularizers",
    "unlearn.resilience.beta",
    "unlearn.resilience.hypergradient.kind",
    "unlearn.resilience.hypergradient.gamma",
    "unlearn.resilience.hypergradient.iterations",
    "unlearn.resilience.hypergradient.damping",
    "unlearn.resilience.hypergradient.max_norm",
    "unlearn.resilience.hypergradient.retries",
    "unlearn.resilience.hypergradient.fallback",
    "unlearn.resilience.hypergradient.hvp_backend",
    "unlearn.resilience.meta.samples_per_step",
    "unlearn.resilience.meta.meta_rate",
    "unlearn.resilience.meta.over",
    "unlearn.resilience.meta.data",
    "unlearn.resilience.meta.distribution",
    "evaluate.metrics",
]
_THREAT_KEYS = ["algorithm", "data", "optimizer", "lr", "steps", "batch_size", "seeds", "eval_at"]


def _spec_dict(spec: Any) -> dict[str, Any]:
    """The spec as plain data; accepts a ResolvedSpec (its ``.spec``), a Spec or a mapping."""
    if not hasattr(spec, "model_dump") and hasattr(spec, "spec"):
        spec = spec.spec
    if hasattr(spec, "model_dump"):
        return spec.model_dump(mode="json")
    if isinstance(spec, Mapping):
        return dict(spec)
    return {}


def curated_params(spec: Any) -> dict[str, str]:
    """A flat view of the parameters that matter when comparing runs (parent run params)."""
    d = _spec_dict(spec)
    out: dict[str, str] = {}
    for path in CURATED:
        cur: Any = d
        for part in path.split("."):
            cur = cur.get(part) if isinstance(cur, Mapping) else None
        if cur is None:
            continue
        out[path] = cur if isinstance(cur, str) else json.dumps(cur, sort_keys=True)
    configs = (((d.get("unlearn") or {}).get("resilience") or {}).get("meta") or {}).get("configs")
    if configs:
        out["unlearn.resilience.meta.configs"] = json.dumps(sorted(configs))
        for name, cfg in configs.items():
            for k in ("algorithm", "optimizer", "lr", "steps"):
                if k in cfg:
                    out[f"meta.{name}.{k}"] = json.dumps(cfg[k])
    for tname, t in (d.get("threats") or {}).items():
        for k in _THREAT_KEYS:
            if k in t:
                v = t[k]
                out[f"threat.{tname}.{k}"] = v if isinstance(v, str) else json.dumps(v)
    if d.get("baselines"):
        out["baselines"] = json.dumps(sorted(d["baselines"]))
    # `--set PATH=VALUE` items the spec was loaded with (ResolvedSpec.overrides), as written.
    for path, value in (getattr(spec, "overrides", None) or {}).items():
        out[f"set.{path}"] = value
    return out


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


# -- records -------------------------------------------------------------------------------


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


# -- the worker side -----------------------------------------------------------------------


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
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # its per-node start/stop INFO lines would drown the progress output
            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)

            self._monitor = SystemMetricsMonitor(self.rec.run_id, tracking_uri=self.handle.uri)
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
                metrics = records_to_metrics(records, int(time.time() * 1000))
                _log_batch_chunked(self._client, self.rec.run_id, metrics=metrics)
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
    file (LoRA weights, metrics, images, stats). Returns the skipped folders."""
    if log_models:
        client.log_artifacts(run_id, str(root))
        return []
    skipped: list[dict] = []

    def holds_model(d: Path) -> bool:
        return any(is_model_folder(Path(dp)) for dp, _, _ in os.walk(d))

    def visit(d: Path, rel: str) -> None:
        for p in sorted(d.iterdir()):
            r = f"{rel}/{p.name}" if rel else p.name
            if p.is_dir():
                if is_model_folder(p):
                    skipped.append({"artifact": r, "local": str(p), "bytes": _tree_size(p)})
                elif holds_model(p):
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


def _sync_node_static(client: Any, rec: NodeRecord, node_dir: Path | None) -> None:
    """Params, tags, artifacts and status of a node's run (all idempotent in MLflow)."""
    if not rec.params_synced:
        _log_batch_chunked(
            client, rec.run_id, params=_params_entities(rec.params), tags=_tags(rec.tags)
        )
        rec.params_synced = True
    if not rec.artifacts_synced and node_dir is not None and Path(node_dir).is_dir():
        log_node_artifacts(client, rec.run_id, Path(node_dir), log_models=rec.log_models)
        rec.artifacts_synced = True
    elif node_dir is None and rec.status in ("FAILED", "KILLED"):
        rec.artifacts_synced = True  # a failed node has no complete outputs to upload
    if rec.status and not rec.status_synced:
        client.set_terminated(rec.run_id, status=rec.status)
        rec.status_synced = True


# -- the driver side -----------------------------------------------------------------------


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
    ):
        """``nest_under``: an existing run (e.g. a grid's) the invocation's run is a child
        of; ``extra_tags`` / ``extra_params`` are added to the invocation's run only."""
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
        self.inv_dir = self.store_root / "tracking" / self.parent_run_id
        (self.inv_dir / "nodes").mkdir(parents=True, exist_ok=True)
        self._write_parent_artifacts(spec, graph)
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

        from .store import atomic_write_text

        art = self.inv_dir / "artifacts"
        atomic_write_text(
            art / "resolved_spec.yaml", yaml.safe_dump(_spec_dict(spec), sort_keys=False)
        )
        atomic_write_text(art / "graph.mmd", mermaid(graph))
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
                "mlflow.runName": node.name,
                "resalign.node.name": node.name,
                "resalign.node.kind": node.kind,
                "resalign.node.key": node.key,
                # where the results (models included) are in the local store
                "resalign.node.dir": str(self.store_root / node.kind / node.key),
            },
        )
        tags = {k: v for k, v in tags.items() if v is not None}
        rec = NodeRecord(
            name=node.name,
            kind=node.kind,
            key=node.key,
            params=flatten(node.params),
            tags=tags,
            log_models=self.log_models,
        )
        path = _node_record_path(self.inv_dir, node.kind, node.key)

        def create() -> None:
            run = self._client.create_run(self.experiment_id, run_name=node.name, tags=tags)
            rec.run_id = run.info.run_id
            _log_batch_chunked(self._client, rec.run_id, params=_params_entities(rec.params))
            rec.params_synced = True

        self._try(create, f"creating the run of {node.name}")
        save_node_record(path, rec)
        return TrackingHandle(self.uri, self.parent_run_id, str(path), self.system_metrics)

    def cached(self, node: Any) -> None:
        """A cached node is linked to this invocation by a tag, not re-logged."""
        self._inv["cached"][node.name] = node.key
        self._inv["synced"]["cached"] = False
        self._save_inv()

    def finish(self, status: str) -> None:
        self._inv["status"] = status
        self._save_inv()

        def fin() -> None:
            _sync_invocation(self._client, self.inv_dir, self._inv, final=True)
            self._save_inv()

        self._try(fin, "ending the parent run")


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
    if final and inv.get("status") and not s["status"]:
        client.set_terminated(run_id, status=inv["status"])
        s["status"] = True


def mermaid(graph: Any) -> str:
    """The graph as a Mermaid flowchart (the plan's rendering)."""
    from ..graph.plan import render_mermaid

    return render_mermaid(graph) + "\n"


# -- resalign sync -------------------------------------------------------------------------


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

    ``uri`` restricts the sync to invocations logged to that tracking URI.
    """
    store_root = Path(store_root).resolve()
    report = SyncReport()
    for inv_path in sorted((store_root / "tracking").glob("*/invocation.json")):
        inv_dir = inv_path.parent
        inv = read_json(inv_path)
        if not inv or (uri and inv["uri"] != uri):
            continue
        store = Store(store_root)
        if inv.get("status") is None and _driver_dead(inv):
            inv["status"] = "KILLED"  # the invocation was killed before it could say so
        recs = [(p, load_node_record(p)) for p in sorted((inv_dir / "nodes").glob("*.json"))]
        pending = []
        for p, r in recs:
            if r is None:
                continue
            if r.status is None:
                if store.is_locked(r.kind, r.key):
                    continue  # being executed right now: its own logger is in charge
                r.status = "KILLED"  # an attempt killed mid-node; a later one has the rest
            behind = r.status == "FINISHED" and r.metrics_offset < _size(
                _node_source(store_root, r)[0]
            )
            if not r.synced or behind:
                pending.append((p, r))
        s = inv["synced"]
        parent_done = s["params"] and s["artifacts"] and (s["cached"] or not inv["cached"])
        parent_done = parent_done and (s["status"] or not inv.get("status"))
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
            if rec.status == "KILLED":
                # Byte offsets into a file that a later attempt truncated and continued mean
                # nothing: a killed attempt keeps what it had uploaded, and gets no artifacts.
                metrics_path, node_dir = Path(os.devnull), None
            if rec.run_id is None:
                run = client.create_run(inv["experiment_id"], run_name=rec.name, tags=rec.tags)
                rec.run_id = run.info.run_id
                rec.params_synced = False
                report.runs_created += 1
                save_node_record(path, rec)
            records, new_offset = _read_tail(metrics_path, rec.metrics_offset)
            if records:
                metrics = records_to_metrics(records, int(time.time() * 1000))
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


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
