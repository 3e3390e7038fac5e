"""`resalign ui` as a subprocess for the tests that need a real MLflow server (the real
command, its printed addresses and its Ctrl-C)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from resalign.engine.ui import STOP_LINE, free_port


class UiProcess:
    """`resalign ui --store S --port P` as a subprocess: the real command, with its Ctrl-C."""

    def __init__(self, store: Path, log: Path):
        self.store, self.log, self.port = store, log, free_port()
        self.proc: subprocess.Popen[str] | None = None
        self.tree: list[int] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "resalign", "ui", "--store", str(self.store)]
            + ["--port", str(self.port)],
            stdout=subprocess.PIPE,
            stderr=open(self.log, "a"),  # noqa: SIM115
            text=True,
        )
        self.printed: list[str] = []
        for line in self.proc.stdout:  # the URL lines come once the server is healthy
            self.printed.append(line.rstrip("\n"))
            if line.startswith("MLflow UI at "):
                assert line.split()[3] == self.url
            if line.strip() == STOP_LINE:
                break
        else:
            raise AssertionError(f"resalign ui exited: {self.log.read_text()[-2000:]}")
        self.tree = [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]
        assert self.tree, "the UI runs mlflow server as a child process"

    def stop(self) -> None:
        """Ctrl-C: the command must stop the server with all its children."""
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.wait(timeout=60) == 0
        self.proc.stdout.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in self.tree):
            time.sleep(0.1)
        assert not [p for p in self.tree if _alive(p)], "children left behind"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
