"""The real graph (model with pretraining, harvest-free digits data, resalign + plain
unlearning, an attack, evaluations, the report) run by `resalign run` on tests/specs/tiny.yaml,
logged to the default SQLite store; then a second run executes nothing."""

from __future__ import annotations

import json
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
    # the report's outer-step section: the resalign row's medians are its steps' (2 steps:
    # the mean of the two), plain has no resilience term and no line
    table = json.loads((st.node_dir(report.kind, report.key) / "table.json").read_text())
    (line,) = table["dynamics"]["rows"]
    assert line["row"] == "resalign" and line["models"] == 1 and line["steps"] == 2
    for k in ("resilience_ratio", "resilience_cosine", "cosine", "hypergrad_norm"):
        assert line[k]["median"] == pytest.approx((local[0][k] + local[1][k]) / 2, rel=1e-12)
    assert (
        "## Unlearning: the outer steps per row"
        in (st.node_dir(report.kind, report.key) / "report.md").read_text()
    )

    summaries = check_mlflow_compares(c, exp.experiment_id, graph, store)

    # every node's DONE records what it cost, and its MLflow run has it as cost.* metrics
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
    # the cached re-run links each result to the run that holds it, adds no summary runs
    parent = c.search_runs(
        [exp.experiment_id],
        "tags.`resalign.command` != ''",
        order_by=["attributes.start_time DESC"],
    )[0]
    for n in graph:
        assert parent.data.tags[f"resalign.cached.{n.name}"] == runs[n.name].info.run_id
    assert [r.info.run_id for r in summary_runs(c, exp.experiment_id)] == [
        r.info.run_id for r in summaries
    ]
    note = parent.data.tags["mlflow.note.content"]
    assert all(f"runs/{r.info.run_id})" in note for r in summaries)


def summary_runs(c, exp_id, where=""):
    return c.search_runs(
        [exp_id], "tags.`resalign.kind` = 'summary'" + where, order_by=["tags.`resalign.row`"]
    )


def check_mlflow_compares(c, exp_id, graph, store):
    """MLflow's own client groups the runs by the resalign.* tags and compares the rows by
    the summary metrics, each of which is recomputed here from the evaluate runs it found
    through the tags alone (issue 21)."""
    import numpy as np

    # every node run carries the tags of its Node fields; runs group by them
    for n in graph:
        (r,) = c.search_runs([exp_id], f"tags.`resalign.node.name` = '{n.name}'")
        t = r.data.tags
        assert t["resalign.kind"] == n.kind and t.get("resalign.row") == n.row
        assert t.get("resalign.unlearning_seed") == (
            None if n.unlearn_seed is None else str(n.unlearn_seed)
        )
        if n.kind in ("attack", "evaluate"):
            assert t["resalign.attack_step"] == str(n.step)
        # system metrics on every node run, the seconds-long ones too
        assert "system/cpu_utilization_percentage" in r.data.metrics, n.name
    resalign = c.search_runs(
        [exp_id], "tags.`resalign.row` = 'resalign' and tags.`resalign.kind` != 'summary'"
    )
    assert {r.data.tags["resalign.node.name"] for r in resalign} == {
        n.name for n in graph if n.row == "resalign"
    }
    rows = {r.data.tags["resalign.row"]: r for r in summary_runs(c, exp_id)}
    assert set(rows) == {"original", "resalign", "plain"}
    assert summary_runs(c, exp_id, " and tags.`resalign.method` = 'plain'")[0].info.run_id == (
        rows["plain"].info.run_id
    )

    def evaluate(row, where):
        return c.search_runs(
            [exp_id],
            f"tags.`resalign.kind` = 'evaluate' and tags.`resalign.row` = '{row}' and {where}",
        )

    for row, r in rows.items():
        assert r.info.status == "FINISHED" and "mlflow.parentRunId" not in r.data.tags
        (pre,) = evaluate(row, "tags.`resalign.attack_step` = '0'")
        post = evaluate(
            row, "tags.`resalign.threat` = 'benign' and tags.`resalign.attack_step` = '2'"
        )
        assert len(post) == 1  # one attack seed
        m = r.data.metrics
        for k in ("concept_rate", "retain_accuracy", "classifier_fid"):
            assert m[f"{k}/pre"] == pre.data.metrics[k]
        after = float(np.mean([p.data.metrics["concept_rate"] for p in post]))
        assert m["concept_rate/benign/step2"] == pytest.approx(after)
        area = np.trapezoid([pre.data.metrics["concept_rate"], after], [0, 2]) / 2
        assert m["relearning_area/benign"] == pytest.approx(area)
        assert r.data.params["method"] == {"original": "none"}.get(row, row)
    assert rows["resalign"].data.params["unlearn.resilience.beta"] == "0.8"
    assert not [k for k in rows["plain"].data.params if "resilience" in k]

    # params and metrics of the unlearn runs: what they used, no copies
    (un,) = c.search_runs(
        [exp_id], "tags.`resalign.kind` = 'unlearn' and tags.`resalign.method` = 'resalign'"
    )
    (pl,) = c.search_runs(
        [exp_id], "tags.`resalign.kind` = 'unlearn' and tags.`resalign.method` = 'plain'"
    )
    assert not [k for k in pl.data.params if k.startswith("unlearn.resilience")]
    assert un.data.params["unlearn.resilience.beta"] == "0.8"
    assert not [k for k in un.data.metrics if k.startswith("meta0.") and k[6:] in un.data.metrics]
    assert {"retries_total", "fallbacks_total"} <= set(un.data.metrics)
    # the summary run carries the unlearn run's outer-step medians (read from steps.jsonl),
    # here recomputed from MLflow's own metric history of that run
    import statistics

    for row, run in (("resalign", un), ("plain", pl)):
        m = rows[row].data.metrics
        for key in ("resilience_ratio", "resilience_cosine", "direct_grad_norm"):
            hist = [x.value for x in c.get_metric_history(run.info.run_id, key)]
            assert (f"unlearn/{key}" in m) == bool(hist), (row, key)
            if hist:
                assert m[f"unlearn/{key}"] == pytest.approx(statistics.median(hist)), key
    assert "unlearn/resilience_ratio" in rows["resalign"].data.metrics
    assert "lr" not in un.data.metrics
    assert un.data.params["lr_used"] == un.data.params["unlearn.optimizer.lr"] == "0.001"

    # the report run: its files once, report.html self-contained, the same report as
    # `resalign report --all-steps` writes to runs/reports/
    (rep,) = c.search_runs([exp_id], "tags.`resalign.kind` = 'report'")
    arts = {a.path for a in c.list_artifacts(rep.info.run_id)}
    assert {"report.html", "table.json", "concept_rate_vs_steps.png", "grids.png"} <= arts
    assert "artifacts" not in arts
    # no report numbers on it (the summary runs carry them): only system and cost metrics
    assert not [k for k in rep.data.metrics if not k.startswith(("system/", "cost."))]
    res = CliRunner().invoke(cli, ["report", str(SPEC), "--store", str(store), "--all-steps"])
    assert res.exit_code == 0, res.output
    mine = Path(c.download_artifacts(rep.info.run_id, "report.html", str(store / "dl")))
    assert mine.read_text() == (store / "reports" / "tiny" / "report.html").read_text()
    assert "src='data:image/png;base64," in mine.read_text()
    parent = c.get_run(rep.data.tags["mlflow.parentRunId"])
    assert {"graph.mmd", "graph.svg"} <= {a.path for a in c.list_artifacts(parent.info.run_id)}
    return summary_runs(c, exp_id)
