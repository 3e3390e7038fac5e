"""Engine against a real ``mlflow server`` on 127.0.0.1 (one per module: it takes ~18 s to
start): parent/child runs, metrics one value per step, params, artifacts, system metrics; the
server dying mid-run; ``sync`` filling it afterwards, idempotently."""

from __future__ import annotations

import io
import json
import threading
import time
import urllib.request

import pytest
from click.testing import CliRunner
from engine_steps import TinySpec, make_graph
from mlflow_ui import UiProcess
from rich.console import Console

from resalign.cli import cli
from resalign.engine.options import RunOptions
from resalign.engine.progress import ProgressUI
from resalign.engine.runner import run_graph
from resalign.engine.store import Store, read_metrics
from resalign.spec.schema.tracking import TrackingSpec

STEPS = 40


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("ui-store")
    ui = UiProcess(d, d / "ui.log")
    ui.start()
    yield ui
    if ui.proc is not None and ui.proc.poll() is None:
        ui.stop()


def client(srv):
    from mlflow.tracking import MlflowClient

    return MlflowClient(srv.url)


def children(c, parent_run_id):
    parent = c.get_run(parent_run_id)
    runs = c.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'"
    )
    return {r.data.tags["resalign.node.name"]: r for r in runs}


def test_runs_params_metrics_artifacts_on_a_server(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    g = make_graph(steps=STEPS, sleep=0.05)
    spec = TinySpec(tracking=TrackingSpec(experiment="engine-server", system_metrics=True))
    ui = ProgressUI(enabled=False, console=Console(file=io.StringIO()))
    s = run_graph(g, spec, RunOptions(store=tmp_path, tracking_uri=server.url, device="cpu", ui=ui))
    c = client(server)
    parent = c.get_run(s.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["resalign.spec"] == "engine-test"
    assert {a.path for a in c.list_artifacts(s.parent_run_id)} >= {
        "resolved_spec.yaml",
        "graph.mmd",
    }
    kids = children(c, s.parent_run_id)
    assert set(kids) == set(g.nodes)
    tr = kids["train"]
    assert tr.data.params["steps"] == str(STEPS)
    for key in ("loss", "grad_norm"):
        hist = c.get_metric_history(tr.info.run_id, key)
        assert sorted(m.step for m in hist) == list(range(1, STEPS + 1))
    assert any(k.startswith("system/") for k in tr.data.metrics), tr.data.metrics.keys()
    assert {"weights.safetensors", "metrics.jsonl", "node.json"} <= {
        a.path for a in c.list_artifacts(tr.info.run_id)
    }
    # the UI answers over HTTP: the page, and the REST API it draws from lists the runs
    with urllib.request.urlopen(server.url + "/", timeout=10) as r:
        assert r.status == 200 and b"<html" in r.read(2000).lower()
    req = urllib.request.Request(
        server.url + "/api/2.0/mlflow/runs/search",
        data=json.dumps({"experiment_ids": [parent.info.experiment_id]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        listed = {x["info"]["run_id"] for x in json.loads(r.read())["runs"]}
    assert {s.parent_run_id} | {k.info.run_id for k in kids.values()} <= listed


def test_server_gone_mid_run_completes_locally_then_sync_fills_it(server, tmp_path):
    g = make_graph(steps=STEPS, sleep=0.05)
    n = g["train"]
    store = Store(tmp_path)
    live = store.state_dir(n.kind, n.key) / "metrics.jsonl"
    stopped = threading.Event()

    def killer():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(read_metrics(live)) < 10:
            time.sleep(0.01)
        server.stop()
        stopped.set()

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    spec = TinySpec(tracking=TrackingSpec(experiment="engine-server"))
    ui = ProgressUI(enabled=False, console=Console(file=io.StringIO()))
    s = run_graph(g, spec, RunOptions(store=tmp_path, tracking_uri=server.url, device="cpu", ui=ui))
    t.join()
    assert stopped.is_set()
    assert sorted(s.executed) == sorted(g.nodes)
    assert all(store.is_complete(x.kind, x.key) for x in g)

    assert CliRunner().invoke(cli, ["sync", "--store", str(tmp_path)]).exit_code == 1
    server.start()  # same port, same database
    c = client(server)
    assert c.get_run(s.parent_run_id).info.status == "RUNNING"  # its end was never logged
    assert set(children(c, s.parent_run_id)) != set(g.nodes)

    res = CliRunner().invoke(cli, ["sync", "--store", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "unreachable" not in res.output and "1 invocation(s)" in res.output
    assert c.get_run(s.parent_run_id).info.status == "FINISHED"
    kids = children(c, s.parent_run_id)
    assert set(kids) == set(g.nodes)
    for name, r in kids.items():
        assert r.info.status == "FINISHED", name
    hist = c.get_metric_history(kids["train"].info.run_id, "loss")
    assert sorted(m.step for m in hist) == list(range(1, STEPS + 1))
    local = read_metrics(store.node_dir(n.kind, n.key) / "metrics.jsonl")
    assert [m.value for m in sorted(hist, key=lambda m: m.step)] == [r["loss"] for r in local]
    assert "weights.safetensors" in {a.path for a in c.list_artifacts(kids["train"].info.run_id)}

    again = CliRunner().invoke(cli, ["sync", "--store", str(tmp_path)])
    assert again.exit_code == 0
    assert "synced 0 invocation(s): 0 node run(s), 0 created, 0 metric value(s)" in again.output
    hist2 = c.get_metric_history(kids["train"].info.run_id, "loss")
    assert len(hist2) == STEPS
