"""Tracking URIs: precedence, the default SQLite database and artifact root, reachability, and the MLflow client (SQLite: first use under a lock, calls retried while locked)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...errors import UserError
from ..signals import deferred


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
    """An ``MlflowClient`` whose calls are retried while SQLite says it is locked, and that
    a stop signal does not interrupt mid-call (:func:`..signals.deferred`)."""

    def __init__(self, client: Any):
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            for attempt in range(LOCKED_RETRIES + 1):
                try:
                    with deferred():  # a stop signal waits for the call (engine/signals.py)
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
        return _RetryingClient(MlflowClient(tracking_uri=uri))  # retries only SQLite's locks
    with setup_lock(uri):
        client = _RetryingClient(MlflowClient(tracking_uri=uri))
        # the first query creates (or migrates) the database: under the lock
        client.search_experiments(max_results=1)
    return client
