"""``resalign ui``: the MLflow UI for the project's store, on 127.0.0.1 only.

Runs ``mlflow server`` (UI + REST) on the project's SQLite store with its artifact root, one
worker and job execution off (otherwise MLflow leaves job workers behind), in its own process
group so that Ctrl-C stops it with all its children. :class:`MlflowServer` is also what the
tests use to run a real tracking server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from ..errors import UserError
from .tracking import default_artifact_root, default_tracking_uri


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MlflowServer:
    """A real ``mlflow server`` bound to 127.0.0.1, stopped by process group."""

    def __init__(
        self,
        backend_uri: str,
        *,
        port: int | None = None,
        artifact_root: str | None = None,
        serve_artifacts_dir: Path | None = None,
        log_path: Path | None = None,
    ):
        self.backend_uri = backend_uri
        self.port = port or free_port()
        self.artifact_root = artifact_root
        self.serve_artifacts_dir = serve_artifacts_dir
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            self.backend_uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        if self.serve_artifacts_dir is not None:
            cmd += ["--artifacts-destination", Path(self.serve_artifacts_dir).resolve().as_uri()]
        elif self.artifact_root:
            cmd += ["--default-artifact-root", self.artifact_root]
        return cmd

    def start(self, timeout: float = 120.0) -> MlflowServer:
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.command(), env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UserError(
                    f"mlflow server exited with code {self.proc.returncode} at startup",
                    where=self.url,
                    hint=f"see {self.log_path}" if self.log_path else "is the port in use?",
                )
            if self.healthy():
                return self
            time.sleep(0.5)
        self.stop()
        raise UserError(f"mlflow server did not answer {self.url}/health in {timeout:.0f}s")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the server's process group (uvicorn and its workers), then SIGKILL."""
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        pgid = os.getpgid(p.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        try:  # children that outlived the leader
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


# mlflow server answers /health ~18 s after start on an idle 2-core machine; with the load
# average at 16-20 (other jobs) it took over 120 s, MlflowServer.start's default.
START_TIMEOUT = 600.0

# The last line `resalign ui` prints once the server answers (after the addresses).
STOP_LINE = "Ctrl-C stops it."


def runs_table_url(base: str, experiment_id: str, view: str | None = None) -> str:
    """The runs table of an experiment in MLflow's model-training view. MLflow 3.17 opens an
    experiment on its GenAI overview (traces, token usage) unless ``workflowType`` says
    ``machine_learning``; ``#/experiments/<id>`` alone showed no runs. ``view``: a shared
    view's key (``tracking.summaries.VIEW_KEY``: the summary metrics as columns)."""
    url = f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    return url + (f"&viewStateShareKey={view}" if view else "")


def compare_url(base: str, experiment_id: str, run_ids: list[str]) -> str:
    """MLflow's compare view of ``run_ids`` (params and metrics side by side)."""
    runs = urllib.parse.quote(json.dumps(run_ids, separators=(",", ":")))
    exps = urllib.parse.quote(json.dumps([experiment_id], separators=(",", ":")))
    return f"{base}/#/compare-runs?runs={runs}&experiments={exps}&workflowType=machine_learning"


def landing_urls(base: str) -> list[str]:
    """What ``resalign ui`` prints, most recently active experiment first: per experiment
    with runs, its runs table (model-training view; the summary runs, one per report row and
    unlearning seed, are its top-level rows), and the compare view of the last report's
    summary runs. Falls back to the experiment list when the store has no runs yet."""
    from .tracking import _client
    from .tracking.summaries import VIEW_KEY, VIEW_TAG

    client = _client(base)
    lines = []
    exps = [
        e
        for e in client.search_experiments(order_by=["last_update_time DESC"])
        if client.search_runs([e.experiment_id], max_results=1)
    ]
    for e in exps:
        view = VIEW_KEY if VIEW_TAG in e.tags else None
        lines.append(f"{e.name}: {runs_table_url(base, e.experiment_id, view)}")
        last = client.search_runs(
            [e.experiment_id],
            "tags.`resalign.kind` = 'summary'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if last:
            inv = last[0].data.tags.get("resalign.invocation")
            rows = client.search_runs(
                [e.experiment_id],
                f"tags.`resalign.kind` = 'summary' and tags.`resalign.invocation` = '{inv}'",
                order_by=["attributes.start_time ASC"],
            )
            ids = [r.info.run_id for r in rows]
            lines.append(f"  compare its rows: {compare_url(base, e.experiment_id, ids)}")
    return lines or [f"{base}/#/experiments?workflowType=machine_learning"]


def serve_ui(store_root: Path | str = "runs", *, port: int = 5000) -> None:
    """Serve the project's MLflow store until Ctrl-C; prints the runs-table URL of each
    experiment (:func:`landing_urls`)."""
    root = Path(store_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as the server will: a port whose old connections linger in TIME_WAIT is free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise UserError(
                f"port {port} on 127.0.0.1 is not free ({e.strerror})",
                where="--port",
                hint="pass another port, e.g. --port 5001",
            ) from None
    server = MlflowServer(
        default_tracking_uri(root),
        port=port,
        artifact_root=default_artifact_root(root),
        log_path=root / "mlflow-ui.log",
    )
    print(f"starting the MLflow UI for {root / 'mlflow.db'} ...", flush=True)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Ctrl-C, and SIGTERM too, must reach the cleanup below even where SIGINT was inherited
    # ignored (a background job of a non-interactive shell): the server runs in its own
    # process group, so nobody else would stop it.
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        server.start(timeout=START_TIMEOUT)
        print(f"MLflow UI at {server.url}", flush=True)
        try:
            urls = landing_urls(server.url)
        except Exception as e:  # the UI serves anyway; only the addresses are missing
            urls = [f"{server.url}/#/experiments?workflowType=machine_learning  ({e})"]
        for line in urls:
            print(f"  {line}", flush=True)
        print(STOP_LINE, flush=True)
        while server.proc is not None and server.proc.poll() is None:
            time.sleep(0.5)
        if server.proc is not None:
            raise UserError(
                f"mlflow server stopped unexpectedly (code {server.proc.returncode})",
                hint=f"see {root / 'mlflow-ui.log'}",
            )
    except KeyboardInterrupt:
        print("stopping the MLflow UI", flush=True)
    finally:
        server.stop()
