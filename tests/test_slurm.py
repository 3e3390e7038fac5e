"""The slurm executor through submitit's local executor (the same job path as on a cluster):
a node task runs to completion in a job, and a job preempted mid-run is requeued and resumes
from the checkpoint its step wrote under ``ctx.state``.

The step used here (``ticker``) is defined in this module: it counts to ``n``, checkpointing
after every tick, so the test can see exactly where the requeued attempt resumed.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from resalign.engine.executors.base import NodeTask
from resalign.engine.store import Store, atomic_write_json
from resalign.graph.nodes import Node
from resalign.steps.base import STEPS, Step, register


class Ticker(Step):
    kind = "ticker"
    version = "1"

    def run(self, ctx) -> None:
        ckpt = ctx.state / "tick.json"
        start = json.loads(ckpt.read_text())["done"] if ckpt.exists() else 0
        attempts_file = ctx.state / "attempts.json"
        attempts = json.loads(attempts_file.read_text()) if attempts_file.exists() else []
        attempts.append({"pid": os.getpid(), "start": start})
        atomic_write_json(attempts_file, attempts)
        for i in range(start, ctx.params["n"]):
            time.sleep(ctx.params["sleep"])
            atomic_write_json(ckpt, {"done": i + 1})
        atomic_write_json(ctx.out / "result.json", {"count": ctx.params["n"], "runs": attempts})


if "ticker" not in STEPS:
    register(Ticker)


def _task(tmp_path: Path, n: int, sleep: float, key: str) -> NodeTask:
    node = Node(kind="ticker", name="ticker", params={"n": n, "sleep": sleep}, deps={}, key=key)
    return NodeTask(
        node=node,
        store_root=str(tmp_path / "store"),
        inputs={},
        step_module="test_slurm",
        device="cpu",
    )


@pytest.fixture
def importable(monkeypatch):
    # submitit's local jobs are fresh interpreters: they must import this module by name.
    here = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", here + os.pathsep + os.environ.get("PYTHONPATH", ""))


def test_local_cluster_runs_a_node_task(tmp_path, importable):
    from resalign.engine.executors.slurm import SlurmExecutor

    ex = SlurmExecutor(folder=tmp_path / "sub", cluster="local", gpus=0, cpus=1, time=5)
    res = ex.submit(_task(tmp_path, 3, 0.0, "k1")).result(timeout=120)
    assert res.ok, res.details
    store = Store(tmp_path / "store")
    assert store.is_complete("ticker", "k1")
    out = json.loads((store.node_dir("ticker", "k1") / "result.json").read_text())
    assert out["count"] == 3 and len(out["runs"]) == 1
    assert out["runs"][0]["pid"] != os.getpid()  # it ran in a job, not here


def test_preempted_job_is_requeued_and_resumes_from_checkpoint(tmp_path, importable):
    from resalign.engine.executors.slurm import SlurmExecutor

    ex = SlurmExecutor(folder=tmp_path / "sub", cluster="local", gpus=0, cpus=1, time=5)
    fut = ex.submit(_task(tmp_path, 60, 0.05, "k2"))
    ckpt = Store(tmp_path / "store").state_dir("ticker", "k2") / "tick.json"
    deadline = time.time() + 60
    while time.time() < deadline:
        if ckpt.exists() and json.loads(ckpt.read_text())["done"] >= 5:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the job never started ticking")
    # What slurm does on preemption: USR2 to the job's process (submitit's handler then
    # checkpoints and requeues it).
    attempts = Store(tmp_path / "store").state_dir("ticker", "k2") / "attempts.json"
    os.kill(json.loads(attempts.read_text())[0]["pid"], signal.SIGUSR2)
    res = fut.result(timeout=120)
    assert res.ok, res.details
    store = Store(tmp_path / "store")
    out = json.loads((store.node_dir("ticker", "k2") / "result.json").read_text())
    runs = out["runs"]
    assert len(runs) == 2, runs  # preempted once, requeued once
    assert runs[0]["start"] == 0 and 5 <= runs[1]["start"] < 60
    assert runs[0]["pid"] != runs[1]["pid"]
    assert out["count"] == 60
