"""The real graph (model with pretraining, harvest-free digits data, resalign + plain
unlearning, an attack, evaluations, the report) run by `resalign run` on tests/specs/tiny.yaml,
logged to the default SQLite store; then a second run executes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from resalign.cli import cli

SPEC = Path(__file__).resolve().parent / "specs" / "tiny.yaml"


@pytest.mark.slow
def test_tiny_spec_runs_end_to_end_then_is_cached(tmp_path):
    from mlflow.tracking import MlflowClient

    from resalign.engine.store import Store, read_metrics
    from resalign.graph.compile import compile_spec
    from resalign.spec import load_spec

    store = tmp_path / "runs"
    res = CliRunner().invoke(cli, ["run", str(SPEC), "--store", str(store)])
    assert res.exit_code == 0, res.output
    graph = compile_spec(load_spec(SPEC))
    st = Store(store)
    assert all(st.is_complete(n.kind, n.key) for n in graph)
    report = graph["report"]
    assert (st.node_dir(report.kind, report.key) / "report.md").is_file()

    un = graph["unlearn/resalign/seed0"]
    local = read_metrics(st.node_dir(un.kind, un.key) / "metrics.jsonl")
    assert [r["step"] for r in local] == [1, 2]
    c = MlflowClient(f"sqlite:///{store.resolve() / 'mlflow.db'}")
    exp = c.get_experiment_by_name("tiny")
    runs = {r.data.tags.get("resalign.node.name"): r for r in c.search_runs([exp.experiment_id])}
    assert set(graph.nodes) <= set(runs)
    hist = c.get_metric_history(runs["unlearn/resalign/seed0"].info.run_id, "hypergrad_norm")
    assert [m.step for m in hist] == [1, 2]
    assert [m.value for m in hist] == [r["hypergrad_norm"] for r in local]

    plan = CliRunner().invoke(cli, ["plan", str(SPEC), "--store", str(store)])
    assert plan.exit_code == 0 and plan.output.count("[cached]") == len(graph)
    again = CliRunner().invoke(cli, ["run", str(SPEC), "--store", str(store)])
    assert again.exit_code == 0, again.output
    assert f"0 node(s) to run, {len(graph)} cached" in again.output
