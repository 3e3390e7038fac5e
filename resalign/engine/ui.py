"""``resalign ui``: the MLflow UI for the project's store, on 127.0.0.1 only.

Runs ``mlflow server`` (UI + REST) on the project's SQLite store with its artifact root, one
worker and job execution off (otherwise MLflow leaves job workers behind), in its own process
group so that Ctrl-C stops it with all its children. :class:`MlflowServer` is also what the
tests use to run a real tracking server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
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


def serve_ui(store_root: Path | str = "runs", *, port: int = 5000) -> None:
    """Serve the project's MLflow store until Ctrl-C; prints the URL."""
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
        server.start()
        print(f"MLflow UI: {server.url}  (Ctrl-C to stop)", flush=True)
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
