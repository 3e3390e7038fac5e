"""Concurrent runs on one store and one SQLite MLflow database.

* Two invocations started together on overlapping graphs: each shared node executes once
  (the other waits for its lock, then reuses it), neither prints a lock error, and MLflow
  holds every metric point of the store's metrics files, counted with MLflow's own client.
* A graph with twenty attack/evaluation cells run with two worker processes (three processes
  writing one SQLite database): no metric point lost, no lock error.
Failures found on the way: a new database migrated by both drivers at once
(``duplicate column name: step``; ``Online migration expected to match one row``), fixed by
a lock around first use (``tracking.setup_lock``); a child run left RUNNING by the invocation
that waited (now closed FINISHED and tagged ``resalign.node.done_by``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from resalign.engine.store import DONE, Store, read_manifest, read_metrics

HERE = Path(__file__).resolve().parent
BAD = re.compile(r"database is locked|Traceback|continuing locally|resalign sync")


def mlflow_vs_store(store: Path) -> list[str]:
    """Problems between the store's nodes and MLflow: every committed node has exactly one
    FINISHED run (tagged with its key) holding exactly its metrics.jsonl points; the runs of
    invocations that waited for it hold none."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    runs = []
    for exp in client.search_experiments():
        token = None
        while True:
            page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                break
    problems = []
    by_key: dict[str, list] = {}
    for r in runs:
        key = r.data.tags.get("resalign.node.key")
        if key is None:
            continue
        if r.info.status != "FINISHED":
            problems.append(f"run {r.info.run_name} is {r.info.status}")
        if r.data.tags.get("resalign.node.done_by"):
            if r.data.metrics:
                problems.append(f"{r.info.run_name}: a waiting invocation's run has metrics")
            continue
        by_key.setdefault(key, []).append(r)
    points = 0
    for kind, key, d in Store(store).node_dirs():
        want = {
            (k, int(rec["step"]), float(v))
            for rec in read_metrics(d / "metrics.jsonl")
            for k, v in rec.items()
            if k != "step"
        }
        # and what the node cost, from its DONE manifest, as the tracker logs it (step 0)
        cost = (read_manifest(d / DONE) or {}).get("cost") or {}
        want |= {(f"cost.{k}", 0, float(v)) for k, v in cost.items()
                 if isinstance(v, int | float) and not isinstance(v, bool)}  # fmt: skip
        points += len(want)
        mine = by_key.get(key, [])
        if len(mine) != 1:
            problems.append(f"{kind}/{key[:8]}: {len(mine)} runs")
            continue
        have = {
            (m.key, m.step, m.value)
            for k in mine[0].data.metrics
            for m in client.get_metric_history(mine[0].info.run_id, k)
        }
        if have != want:
            problems.append(f"{kind}/{key[:8]}: MLflow {len(have)} points, store {len(want)}")
    assert points > 0
    return problems


def start(root: Path, *args: str) -> subprocess.Popen[str]:
    # this checkout's code (an installed resalign may be another checkout)
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)])
    )
    return subprocess.Popen(
        [sys.executable, str(HERE / "engine_steps.py"), "--root", str(root), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def test_two_invocations_share_nodes_and_lose_no_metric_point(tmp_path):
    root = tmp_path / "runs"
    # shared: data, train, evaluate/pre, attack/a, evaluate/a; own: attack/b (its lr)
    common = ["--steps", "30", "--sleep", "0.05", "--attack-steps", "10"]
    procs = [start(root, *common, "--attacks", f"a=0.01,b={lr}") for lr in (0.02, 0.03)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
        assert not BAD.search(out), out
    both = "\n".join(outs)
    for name in ("data", "train", "evaluate/pre", "attack/a", "evaluate/a"):
        ran = re.findall(rf"^done {re.escape(name)} \(\d", both, re.MULTILINE)
        assert len(ran) == 1, (name, both)  # executed once; the other waited or found it cached
    assert len(re.findall(r"^done attack/b \(\d", both, re.MULTILINE)) == 2  # two lrs: two nodes
    assert "(by another invocation)" in both  # they did overlap
    assert len(list(Store(root).node_dirs())) == 9
    assert mlflow_vs_store(root) == []


@pytest.mark.slow
def test_twenty_cells_on_two_workers_lose_no_metric_point(tmp_path):
    root = tmp_path / "runs"
    cells = ",".join(f"c{i}={0.001 * (i + 1)}" for i in range(20))
    p = start(root, "--steps", "10", "--attack-steps", "5", "--attacks", cells, "--workers", "2")
    out = p.communicate(timeout=600)[0]
    assert p.returncode == 0, out
    assert not BAD.search(out), out
    assert len(list(Store(root).node_dirs())) == 3 + 2 * 20
    assert mlflow_vs_store(root) == []
