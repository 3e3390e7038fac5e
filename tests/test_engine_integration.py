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

    # every node's DONE records what it cost, and its MLflow run has it as cost.* metrics
    import json
    import re

    printed = {m[1]: float(m[2]) for m in re.finditer(r"^done (\S+) \(([0-9.]+)s\)", res.output,
                                                      re.M)}  # fmt: skip
    for n in graph:
        cost = json.loads((st.node_dir(n.kind, n.key) / "DONE").read_text())["cost"]
        assert (
            cost["device"] == "cpu" and cost["rss_scope"] == "node" and "cuda_peak_mb" not in cost
        )
        # the step's wall time is within what the runner measured around the whole node
        assert 0 < cost["wall_s"] <= printed[n.name] + 0.05, (n.name, cost, printed[n.name])
        assert cost["cpu_s"] >= 0 and cost["peak_rss_mb"] > 50  # torch alone is > 50 MiB
        run = runs[n.name].info.run_id
        assert c.get_metric_history(run, "cost.wall_s")[0].value == cost["wall_s"]
    # plan --estimate: the nodes a longer unlearning and attack would run, from these records
    est = CliRunner().invoke(cli, ["plan", str(SPEC), "--store", str(store), "--estimate",
                                   "--set", "threats.benign.steps=4"])  # fmt: skip
    assert est.exit_code == 0, est.output
    assert re.search(r"^  attack: 3 to run, .* from 3 recorded", est.output, re.M), est.output
    assert re.search(r"^  evaluate: 3 to run, ", est.output, re.M), est.output
    assert re.search(r"^estimate for tiny: .* of node time", est.output, re.M), est.output
    assert "no estimate" not in est.output

    plan = CliRunner().invoke(cli, ["plan", str(SPEC), "--store", str(store)])
    assert plan.exit_code == 0 and plan.output.count("[cached]") == len(graph)
    again = CliRunner().invoke(cli, ["run", str(SPEC), "--store", str(store)])
    assert again.exit_code == 0, again.output
    assert f"0 node(s) to run, {len(graph)} cached" in again.output
