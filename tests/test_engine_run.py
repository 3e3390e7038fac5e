"""Engine: caching, plan reasons, exact resume after kill -9 / failure, crash-safe commits,
and tracking to the default SQLite store (real MLflow)."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from engine_steps import TinySpec, expected_payload, key_of, make_graph
from rich.console import Console

from resalign.engine.options import RunOptions
from resalign.engine.progress import ProgressUI
from resalign.engine.runner import RunFailed, plan_status, run_graph
from resalign.engine.store import Store, read_metrics
from resalign.errors import UserError

HERE = Path(__file__).resolve().parent
STEPS = 40


def quiet() -> ProgressUI:
    return ProgressUI(enabled=False, console=Console(file=io.StringIO(), width=80))


def run(root: Path, graph=None, **kw):
    return run_graph(
        graph or make_graph(steps=STEPS),
        TinySpec(),
        RunOptions(
            store=root,
            tracking=kw.pop("tracking", False),
            device="cpu",
            ui=kw.pop("ui", None) or quiet(),
            **kw,
        ),
    )


def node_files(root: Path, graph, name: str) -> Path:
    n = graph[name]
    return Store(root).node_dir(n.kind, n.key)


def history(path: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(path)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: the bitwise reference for the resume tests."""
    root = tmp_path_factory.mktemp("ref")
    g = make_graph(steps=STEPS)
    run(root, g)
    d = node_files(root, g, "train")
    return {
        "weights": (d / "weights.safetensors").read_bytes(),
        "metrics": history(d / "metrics.jsonl"),
        "attack": (node_files(root, g, "attack/a") / "weights.safetensors").read_bytes(),
    }


def test_cache_second_run_executes_nothing_and_param_change_reruns_dependants(tmp_path, reference):
    from resalign.engine.executors.local import LocalExecutor

    g = make_graph(steps=STEPS)
    # the first run on 2 worker processes: same bits as the sequential reference
    first = run(tmp_path, g, executor=lambda: LocalExecutor(workers=2))
    assert sorted(first.executed) == sorted(g.nodes)
    for name, ref in (("train", "weights"), ("attack/a", "attack")):
        got = (node_files(tmp_path, g, name) / "weights.safetensors").read_bytes()
        assert got == reference[ref], name
    st = plan_status(g, tmp_path)
    assert {s.describe() for s in st.values()} == {"cached"}
    assert run(tmp_path, g).executed == []

    g2 = make_graph(steps=STEPS, attack_lrs={"a": 0.05, "b": 0.02})
    st2 = plan_status(g2, tmp_path)
    to_run = {n: s for n, s in st2.items() if s.state == "run"}
    assert set(to_run) == {"attack/a", "evaluate/a"}
    assert to_run["attack/a"].reason == "parameter changed"
    assert to_run["evaluate/a"].reason == "upstream changed"
    second = run(tmp_path, g2)
    assert sorted(second.executed) == ["attack/a", "evaluate/a"]

    # A brand-new node name is "new"; a spec sharing nodes with this one reuses them.
    g3 = make_graph("other-spec", steps=STEPS, attack_lrs={"a": 0.05, "c": 0.03})
    st3 = plan_status(g3, tmp_path)
    assert {n for n, s in st3.items() if s.state == "run"} == {"attack/c", "evaluate/c"}
    assert st3["attack/c"].reason == "new"

    # --force: a node by name re-runs alone (its dependants' keys are unchanged)
    st4 = plan_status(g2, tmp_path, force=["train"])
    assert st4["train"].describe() == "to run (forced)"
    assert run(tmp_path, g2, force=["train"]).executed == ["train"]
    assert sorted(run(tmp_path, g2, force=["all"]).executed) == sorted(g2.nodes)
    with pytest.raises(UserError, match="matches no node"):
        plan_status(g2, tmp_path, force=["nonexistent"])


def test_kill9_at_random_step_then_rerun_is_bitwise_identical(tmp_path, reference):
    # sleep slows the subprocess down enough to hit any step; it enters the key but not the
    # computation, so the result must still equal the reference bit for bit.
    g = make_graph(steps=STEPS, sleep=0.05)
    store = Store(tmp_path)
    kill_at = random.Random().randint(3, STEPS - 3)
    print("killing at step", kill_at)
    proc = subprocess.Popen(  # tracking to the default SQLite store under tmp_path
        [sys.executable, str(HERE / "engine_steps.py"), "--root", str(tmp_path)]
        + ["--steps", str(STEPS), "--sleep", "0.05"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    n = g["train"]
    live = store.state_dir(n.kind, n.key) / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(read_metrics(live)) < kill_at:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not store.is_complete(n.kind, n.key)
    assert plan_status(g, tmp_path)["train"].describe().startswith("to run (new")

    # the same command again continues from the last checkpoint
    res = run(tmp_path, g, tracking=True)
    assert "train" in res.executed
    d = store.node_dir(n.kind, n.key)
    assert (d / "weights.safetensors").read_bytes() == reference["weights"]
    hist = history(d / "metrics.jsonl")
    assert [h[0] for h in hist] == list(range(1, STEPS + 1))
    assert hist == reference["metrics"]

    # MLflow: the resumed attempt's run has the whole history once; the run closed the
    # killed one (FAILED, tagged why: its driver died without ending it), sync has no more
    from mlflow.tracking import MlflowClient

    from resalign.engine.tracking import sync

    c = MlflowClient(res.tracking_uri)
    exp = c.get_experiment_by_name("resalign")
    runs = c.search_runs([exp.experiment_id], "tags.`resalign.node.name` = 'train'")
    assert len(runs) == 2
    new = next(r for r in runs if r.data.tags["mlflow.parentRunId"] == res.parent_run_id)
    got = sorted((m.step, m.value) for m in c.get_metric_history(new.info.run_id, "loss"))
    assert got == [(h[0], h[1]) for h in reference["metrics"]]
    rep = sync(tmp_path)
    assert rep.unreachable == []
    old = next(r for r in runs if r.info.run_id != new.info.run_id)
    for run_id in (old.info.run_id, old.data.tags["mlflow.parentRunId"]):
        closed = c.get_run(run_id)
        assert closed.info.status == "FAILED"
        assert "died without ending it" in closed.data.tags["resalign.end_reason"]


def test_failure_prints_resume_command_last_and_resume_is_exact(tmp_path, reference, monkeypatch):
    g = make_graph(steps=STEPS)
    buf = io.StringIO()
    ui = ProgressUI(enabled=False, console=Console(file=buf, width=60))
    monkeypatch.setenv("ENGINE_TEST_FAIL", "train:13")
    cmd = ["resalign", "run", "specs/my spec.yaml", "--tracking-uri", "x"]
    with pytest.raises(RunFailed) as ei:
        run(tmp_path, g, ui=ui, command=cmd, force=["data"])
    out = buf.getvalue().rstrip("\n").splitlines()
    # data was forced and ran: re-forcing it would not resume; so the command drops --force
    assert out[-1] == "resalign run 'specs/my spec.yaml' --tracking-uri x"
    assert ei.value.resume_command == out[-1]
    assert any("injected failure at step 13" in line for line in out)
    n = g["train"]
    store = Store(tmp_path)
    assert not store.is_complete(n.kind, n.key)
    assert plan_status(g, tmp_path)["train"].resumes
    monkeypatch.delenv("ENGINE_TEST_FAIL")
    res = run(tmp_path, g)
    assert sorted(res.executed) == sorted(set(g.nodes) - {"data"})
    d = store.node_dir(n.kind, n.key)
    assert (d / "weights.safetensors").read_bytes() == reference["weights"]
    assert history(d / "metrics.jsonl") == reference["metrics"]
    assert not store.state_dir(n.kind, n.key).exists()  # checkpoints dropped once complete


def test_node_killed_while_writing_never_looks_complete(tmp_path):
    chunks = 40
    g = make_graph(writer_chunks=chunks, writer_sleep=0.02)
    n = g["writer"]
    store = Store(tmp_path)
    rng = random.Random()
    for _ in range(4):
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "engine_steps.py"), "--root", str(tmp_path)]
            + ["--no-tracking", "--writer-chunks", str(chunks), "--writer-sleep", "0.02"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # wait until the step is writing, then kill at a random moment of the write
        staging = tmp_path / n.kind
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list(staging.glob(".tmp-*/payload.bin")):
            time.sleep(0.005)
        time.sleep(rng.uniform(0, chunks * 0.02 * 0.9))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        final = store.node_dir(n.kind, n.key)
        assert not store.is_complete(n.kind, n.key)
        assert not final.exists()
        assert plan_status(g, tmp_path)["writer"].state == "run"
    res = run(tmp_path, g)
    assert res.executed == ["writer"]
    final = store.node_dir(n.kind, n.key)
    assert (final / "payload.bin").read_bytes() == expected_payload(chunks)
    assert not list((tmp_path / n.kind).glob(".tmp-*"))  # stale staging cleaned


def test_unreachable_server_is_a_user_error_before_compute(tmp_path):
    from resalign.engine.ui import free_port

    g = make_graph(steps=STEPS)
    with pytest.raises(UserError, match="not reachable") as ei:
        run(tmp_path, g, tracking=True, tracking_uri=f"http://127.0.0.1:{free_port()}")
    assert "nothing was run" in ei.value.render()
    assert not any(Store(tmp_path).is_complete(n.kind, n.key) for n in g)


def test_default_sqlite_store_has_parent_child_metrics_params_artifacts(tmp_path):
    from mlflow.tracking import MlflowClient

    g = make_graph(steps=STEPS)
    s1 = run(tmp_path, g, tracking=True)
    uri = f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert s1.tracking_uri == uri
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("resalign")
    assert exp.artifact_location == (tmp_path.resolve() / "mlartifacts").as_uri()
    parent = c.get_run(s1.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["resalign.spec"] == "engine-test"
    assert parent.data.tags["resalign.spec_hash"] == g.spec_hash
    assert "resalign.version" in parent.data.tags
    assert {a.path for a in c.list_artifacts(s1.parent_run_id)} >= {
        "resolved_spec.yaml",
        "graph.mmd",
    }
    kids = c.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{s1.parent_run_id}'", max_results=100
    )
    by_name = {r.data.tags["resalign.node.name"]: r for r in kids}
    assert set(by_name) == set(g.nodes)
    tr = by_name["train"]
    assert tr.info.status == "FINISHED"
    assert tr.data.tags["resalign.node.key"] == g["train"].key
    assert tr.data.tags["resalign.kind"] == "t_train"
    assert tr.data.params["lr"] == "0.01" and tr.data.params["n_params"] == "97"
    hist = c.get_metric_history(tr.info.run_id, "loss")
    assert sorted(m.step for m in hist) == list(range(1, STEPS + 1))
    local = read_metrics(node_files(tmp_path, g, "train") / "metrics.jsonl")
    assert [m.value for m in sorted(hist, key=lambda m: m.step)] == [r["loss"] for r in local]
    arts = {a.path for a in c.list_artifacts(tr.info.run_id)}
    assert {"weights.safetensors", "node.json", "metrics.jsonl"} <= arts
    ev = by_name["evaluate/a"]
    mse = json.loads((node_files(tmp_path, g, "evaluate/a") / "metrics.json").read_text())
    assert ev.data.metrics["mse"] == mse["mse"]["value"]

    # second invocation: everything cached, linked by tags to the runs that hold the
    # results (run ids, not node keys), nothing re-logged
    s2 = run(tmp_path, g, tracking=True)
    assert s2.executed == []
    p2 = c.get_run(s2.parent_run_id)
    assert p2.data.tags["resalign.cached.train"] == tr.info.run_id
    assert {p2.data.tags[f"resalign.cached.{n}"] for n in g.nodes} == {r.info.run_id for r in kids}
    note = p2.data.tags["mlflow.note.content"]  # the run's description: links to them
    assert f"[train](#/experiments/{exp.experiment_id}/runs/{tr.info.run_id})" in note
    assert not c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{s2.parent_run_id}'")


def test_resume_point_is_inferred_when_a_step_does_not_declare_it(tmp_path):
    from resalign.engine.context import NodeContext
    from resalign.graph.nodes import Node

    node = Node(kind="t_x", name="x", params={}, deps={}, key="k")
    state = tmp_path / "state"
    state.mkdir()
    lines = "".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in range(1, 16))
    (state / "metrics.jsonl").write_text(lines + '{"step": 16, "lo')  # torn last line
    ctx = NodeContext(node=node, inputs={}, out=tmp_path / "out", state=state)
    ctx.log_metrics({"loss": -11.0}, step=11)  # a silent resume after checkpoint 10
    ctx.close()
    got = [(r["step"], r["loss"]) for r in read_metrics(state / "metrics.jsonl")]
    assert got == [(s, float(s)) for s in range(1, 11)] + [(11, -11.0)]

    ctx = NodeContext(node=node, inputs={}, out=tmp_path / "out", state=state)
    ctx.resumed_from(4)  # declared explicitly
    ctx.log_metrics({"loss": -5.0}, step=5)
    ctx.close()
    got = [(r["step"], r["loss"]) for r in read_metrics(state / "metrics.jsonl")]
    assert got == [(s, float(s)) for s in range(1, 5)] + [(5, -5.0)]

    ctx = NodeContext(node=node, inputs={}, out=tmp_path / "out", state=state)
    ctx.log_metrics({"loss": 1.5}, step=1)  # a fresh start drops everything
    ctx.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(state / "metrics.jsonl")] == [(1, 1.5)]


def test_failure_summary_separates_upstream_failed_from_not_started(tmp_path, monkeypatch):
    """After a failure, nodes whose upstream failed are "not run (upstream failed)"; nodes
    that only waited their turn are "not started (run stopped after a failure)" (issue 24:
    both were called "upstream failed")."""
    from resalign.graph.nodes import Node

    g = make_graph(steps=4, ckpt=2, attack_lrs={"a": 0.01}, attack_steps=2)
    params = {"n": 16, "dim": 4, "seed": 9}  # an independent branch, ordered after train
    g.nodes["data2"] = Node(kind="t_data", name="data2", params=params, deps={},
                            key=key_of("t_data", params, []))  # fmt: skip
    buf = io.StringIO()
    monkeypatch.setenv("ENGINE_TEST_FAIL", "train:2")
    with pytest.raises(RunFailed):
        run(tmp_path, g, ui=ProgressUI(enabled=False, console=Console(file=buf, width=300)))
    out = buf.getvalue()
    assert "FAILED train: RuntimeError: injected failure at step 2" in out
    up = next(x for x in out.splitlines() if x.startswith("not run (upstream failed): "))
    assert sorted(up.split(": ", 1)[1].split(", ")) == [
        "attack/a", "evaluate/a", "evaluate/pre"]  # fmt: skip
    assert "not started (run stopped after a failure): data2" in out
