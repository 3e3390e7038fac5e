"""The report from evaluate results laid out as the store lays them out."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from resalign.errors import UserError
from resalign.evaluation.report import mean_ci, results_from_store, write_report
from resalign.graph.nodes import Graph, Node

ROWS = ["original", "plain", "resalign"]
THREATS = {
    "benign": {"seeds": [1, 2], "eval_at": [2, 4], "steps": 4},
    "poisoned": {"seeds": [1, 2], "eval_at": [2, 4], "steps": 4},
}


def value(row, threat, seed, step):
    """A made-up but structured result: concept comes back with steps, less for resalign."""
    base = {"original": 0.9, "plain": 0.0, "resalign": 0.0}[row]
    if threat is None:
        return base
    speed = {"original": 0.0, "plain": 0.2, "resalign": 0.05}[row]
    return min(1.0, base + speed * step * (2 if threat == "poisoned" else 1) + 0.01 * seed)


def entry(v, role, better):
    return {
        "value": v,
        "definition": "concept_rate",
        "version": "1",
        "params": {"svc": {"C": 10}},
        "role": role,
        "better": better,
        "n": 3,
    }


def make_store(root):
    graph = Graph("demo", "h")
    k = 0
    for row in ROWS:
        todo = [(None, None, 0)] + [(t, s, st) for t in THREATS for s in (1, 2) for st in (2, 4)]
        for threat, seed, step in todo:
            name = (
                f"evaluate/{row}/pre/step0"
                if threat is None
                else f"evaluate/{row}/{threat}/seed{seed}/step{step}"
            )
            key = f"k{k:03d}"
            k += 1
            graph.nodes[name] = Node("evaluate", name, {}, {}, key, row, threat, seed, step)
            folder = root / "evaluate" / key
            folder.mkdir(parents=True)
            metrics = {
                "concept_rate": entry(value(row, threat, seed, step), "safety", "lower"),
                "retain_accuracy": entry(0.95 - 0.01 * (seed or 0), "utility", "higher"),
            }
            (folder / "metrics.json").write_text(json.dumps(metrics))
            shade = int(255 * value(row, threat, seed, step))
            Image.new("L", (16, 16), shade).save(folder / "grid.png")
            (folder / "DONE").write_text("")
    return graph


def test_report_table_curves_and_grids(tmp_path):
    graph = make_store(tmp_path / "runs")
    results = results_from_store(graph, tmp_path / "runs")
    table = write_report(results, tmp_path / "out", rows=ROWS, threats=THREATS, title="demo")
    for f in ("report.md", "report.html", "table.json", "ip_vs_steps.png", "grids.png"):
        assert (tmp_path / "out" / f).is_file(), f
    assert [r["row"] for r in table["table"]] == ROWS
    assert [c["id"] for c in table["columns"]] == [
        "concept_rate/pre",
        "concept_rate/benign",
        "concept_rate/poisoned",
        "retain_accuracy/pre",
    ]
    cell = table["table"][1]["cells"]["concept_rate/benign"]  # plain, after benign, step 4
    vals = [value("plain", "benign", s, 4) for s in (1, 2)]
    assert cell["values"] == vals and cell["n"] == 2
    sd = math.sqrt(sum((v - sum(vals) / 2) ** 2 for v in vals))  # n-1 = 1
    assert cell["ci95"] == pytest.approx(12.706204736 * sd / math.sqrt(2), rel=1e-6)
    assert table["table"][0]["cells"]["concept_rate/pre"]["values"] == [0.9]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| plain | 0.0000 | 0.8150 ± 0.0635 |" in md
    assert "concept_rate ↓ after poisoned (step 4)" in md
    curve = table["curves"]["concept_rate/benign"]["rows"]["resalign"]
    assert [p["step"] for p in curve] == [0, 2, 4]
    with Image.open(tmp_path / "out" / "ip_vs_steps.png") as im:
        assert im.size[0] > 500 and im.size[1] > 300


def test_mean_ci_against_scipy_interval():
    from scipy import stats

    vals = [0.1, 0.25, 0.2, 0.4]
    mean, half = mean_ci(vals)
    lo, hi = stats.t.interval(0.95, len(vals) - 1, loc=mean, scale=stats.sem(vals))
    assert mean == pytest.approx(0.2375) and half == pytest.approx((hi - lo) / 2)
    assert mean_ci([0.3]) == (0.3, None)


def test_missing_result_names_the_node_and_the_command(tmp_path):
    graph = make_store(tmp_path / "runs")
    (
        tmp_path
        / "runs"
        / "evaluate"
        / graph.nodes["evaluate/plain/poisoned/seed2/step4"].key
        / "DONE"
    ).unlink()
    with pytest.raises(UserError) as err:
        results_from_store(graph, tmp_path / "runs", "specs/demo.yaml")
    text = err.value.render()
    assert "evaluate/plain/poisoned/seed2/step4" in text and "resalign run specs/demo.yaml" in text


def test_all_steps_gives_a_column_per_evaluation_step(tmp_path):
    graph = make_store(tmp_path / "runs")
    results = results_from_store(graph, tmp_path / "runs")
    table = write_report(
        results, tmp_path / "out", rows=ROWS, threats=THREATS, title="demo", all_steps=True
    )
    ids = [c["id"] for c in table["columns"]]
    assert ids == [
        "concept_rate/pre",
        "concept_rate/benign@2",
        "concept_rate/benign",
        "concept_rate/poisoned@2",
        "concept_rate/poisoned",
        "retain_accuracy/pre",
    ]
    plain = next(r for r in table["table"] if r["row"] == "plain")["cells"]
    # step 2 of the benign threat, seeds 1 and 2: 0.2 * 2 + 0.01 * seed
    assert plain["concept_rate/benign@2"]["values"] == pytest.approx([0.41, 0.42])
    assert plain["concept_rate/benign"]["values"] == pytest.approx([0.81, 0.82])
    md = (tmp_path / "out" / "report.md").read_text()
    assert "after benign (step 2)" in md and "after benign (step 4)" in md
