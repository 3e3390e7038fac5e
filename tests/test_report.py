"""The report from evaluate results laid out as the store lays them out: cells over
(unlearning seed, attack seed) units, paired differences to plain, relearning summaries.
Every number is checked against an independent computation (scipy / numpy / by hand)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from resalign.errors import UserError
from resalign.evaluation.report import (
    parse_eval_name,
    results_from_dirs,
    results_from_store,
    table_metrics,
    write_report,
)
from resalign.evaluation.stats import (
    area_under,
    first_exceeding,
    lower_median,
    mean_ci,
    summary,
)
from resalign.graph.nodes import Graph, Node

ROWS = ["original", "plain", "resalign"]
THREATS = {
    "benign": {"seeds": [1, 2], "eval_at": [2, 4], "steps": 4},
    "poisoned": {"seeds": [1, 2], "eval_at": [2, 4], "steps": 4},
}
USEEDS = {"original": [None], "plain": [0, 1], "resalign": [0, 1]}
N_IMAGES = 20


def value(row, useed, threat, seed, step):
    """A made-up but structured result: concept comes back with steps, less for resalign."""
    u = useed or 0
    base = {"original": 0.9, "plain": 0.02 * u, "resalign": 0.01 * u}[row]
    if threat is None:
        return base
    speed = {"original": 0.0, "plain": 0.2, "resalign": 0.05}[row]
    return min(
        1.0, base + speed * step * (2 if threat == "poisoned" else 1) + 0.01 * seed + 0.03 * u
    )


def retain(row, useed):
    return 0.9 - 0.05 * (useed or 0) - (0.1 if row == "plain" else 0.0)


def entry(v, role, better):
    return {
        "value": v,
        "definition": "concept_rate",
        "version": "1",
        "params": {"svc": {"C": 10}},
        "role": role,
        "better": better,
        "n": N_IMAGES,
    }


def eval_name(row, useed, threat, seed, step):
    prefix = row if useed is None else f"{row}/seed{useed}"
    if threat is None:
        return f"evaluate/{prefix}/pre/step0"
    return f"evaluate/{prefix}/{threat}/seed{seed}/step{step}"


def make_store(root):
    graph = Graph("demo", "h")
    k = 0
    for row in ROWS:
        for u in USEEDS[row]:
            todo = [(None, None, 0)] + [
                (t, s, st) for t in THREATS for s in (1, 2) for st in (2, 4)
            ]
            for threat, seed, step in todo:
                name = eval_name(row, u, threat, seed, step)
                key = f"k{k:03d}"
                k += 1
                graph.nodes[name] = Node(
                    "evaluate", name, {}, {}, key, row, threat, seed, step, unlearn_seed=u
                )
                folder = root / "evaluate" / key
                folder.mkdir(parents=True)
                v = value(row, u, threat, seed, step)
                metrics = {
                    "concept_rate": entry(v, "safety", "lower"),
                    "retain_accuracy": entry(retain(row, u), "utility", "higher"),
                }
                (folder / "metrics.json").write_text(json.dumps(metrics))
                Image.new("L", (16, 16), int(255 * v)).save(folder / "grid.png")
                (folder / "DONE").write_text("")
    return graph


UNITS = [(0, 1), (0, 2), (1, 1), (1, 2)]  # (unlearning seed, attack seed), graph order


@pytest.fixture()
def report(tmp_path):
    graph = make_store(tmp_path / "runs")
    results = results_from_store(graph, tmp_path / "runs")
    table = write_report(results, tmp_path / "out", rows=ROWS, threats=THREATS, title="demo")
    return table, tmp_path / "out"


def row_of(table, name):
    return next(r for r in table["table"] if r["row"] == name)


def t_interval(vals):
    mean = float(np.mean(vals))
    lo, hi = stats.t.interval(0.95, len(vals) - 1, loc=mean, scale=stats.sem(vals))
    return mean, lo, hi


def test_parse_eval_name_both_forms():
    assert tuple(parse_eval_name("evaluate/original/pre/step0")) == (
        "original",
        None,
        None,
        None,
        0,
    )
    assert tuple(parse_eval_name("evaluate/original/poison/seed2/step50")) == (
        "original", None, "poison", 2, 50)  # fmt: skip
    assert tuple(parse_eval_name("evaluate/plain/seed3/pre/step0")) == ("plain", 3, None, None, 0)
    assert tuple(parse_eval_name("evaluate/plain/seed3/poison/seed1/step25")) == (
        "plain", 3, "poison", 1, 25)  # fmt: skip
    with pytest.raises(ValueError):
        parse_eval_name("attack/plain/seed3/poison/seed1/step25")


def test_cells_aggregate_over_unlearning_and_attack_seeds(report):
    table, out = report
    for f in ("report.md", "report.html", "table.json", "concept_rate_vs_steps.png", "grids.png"):
        assert (out / f).is_file(), f
    assert [r["row"] for r in table["table"]] == ROWS
    assert [c["id"] for c in table["columns"]] == [
        "concept_rate/pre",
        "concept_rate/benign",
        "concept_rate/poisoned",
        "concept_rate/benign/area",
        "concept_rate/benign/first",
        "concept_rate/poisoned/area",
        "concept_rate/poisoned/first",
        "retain_accuracy/pre",
    ]
    cell = row_of(table, "plain")["cells"]["concept_rate/benign"]  # step 4
    vals = [value("plain", u, "benign", a, 4) for u, a in UNITS]
    assert cell["values"] == pytest.approx(vals) and cell["n"] == 4
    assert cell["units"] == [list(u) for u in UNITS]
    mean, lo, hi = t_interval(vals)
    assert cell["mean"] == pytest.approx(mean)
    assert (cell["lo"], cell["hi"]) == pytest.approx((lo, hi))
    assert cell["ci95"] == pytest.approx((hi - lo) / 2)
    # pre-FT: one value per unlearning seed; original: one evaluation, no interval
    pre = row_of(table, "plain")["cells"]["concept_rate/pre"]
    assert pre["values"] == pytest.approx([0.0, 0.02]) and pre["units"] == [[0, None], [1, None]]
    orig = row_of(table, "original")["cells"]
    assert orig["concept_rate/pre"]["values"] == [0.9] and orig["concept_rate/pre"]["lo"] is None
    assert orig["concept_rate/benign"]["units"] == [[None, 1], [None, 2]]
    md = (out / "report.md").read_text()
    assert f"| plain | 0.010 [0.000, 0.137] n=2 | {mean:.3f} [{lo:.3f}, {hi:.3f}] n=4 |" in md
    assert "concept_rate ↓ after poisoned (step 4)" in md


def test_rate_intervals_stay_in_the_unit_interval(report):
    table, _ = report
    # plain's pre-FT concept rate: values 0.0, 0.02; the t-interval reaches below 0
    pre = row_of(table, "plain")["cells"]["concept_rate/pre"]
    assert pre["mean"] - pre["ci95"] < 0 and pre["lo"] == 0.0
    for r in table["table"]:
        for cid, cell in r["cells"].items():
            if "lo" in cell and cell["lo"] is not None:
                assert 0.0 <= cell["lo"] <= cell["mean"] <= cell["hi"] <= 1.0, (r["row"], cid)
        for d in (r.get("diff") or {}).values():
            if d.get("lo") is not None:
                assert -1.0 <= d["lo"] <= d["hi"] <= 1.0
    # a difference of rates is clipped to [-1, 1], an unbounded metric not at all
    s = summary([0.99, 1.0, 0.5], (0.0, 1.0))
    assert s["hi"] == 1.0 and s["mean"] + s["ci95"] > 1.0
    assert summary([-5.0, 3.0], None)["lo"] < -5.0


def test_paired_difference_to_plain(report):
    table, out = report
    res = row_of(table, "resalign")
    assert res["reference"] == "plain" and "diff" not in row_of(table, "plain")
    assert "diff" not in row_of(table, "original")
    d = res["diff"]["concept_rate/benign"]
    diffs = [
        value("resalign", u, "benign", a, 4) - value("plain", u, "benign", a, 4) for u, a in UNITS
    ]
    mean, lo, hi = t_interval(diffs)
    assert d["values"] == pytest.approx(diffs) and d["n"] == 4
    assert (d["mean"], d["lo"], d["hi"]) == pytest.approx((mean, lo, hi))
    # pre-FT pairs by unlearning seed only
    dp = res["diff"]["concept_rate/pre"]
    assert dp["values"] == pytest.approx([0.0, 0.01 - 0.02]) and dp["n"] == 2
    md = (out / "report.md").read_text()
    assert f"| Δ resalign − plain (paired) | {dp['mean']:+.3f}" in md
    assert f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}] n=4" in md
    # the conservative interval: each unlearning seed's two attack seeds averaged, t over k = 2
    per_seed = [np.mean([diffs[i] for i, (u, _) in enumerate(UNITS) if u == s]) for s in (0, 1)]
    k = d["by_unlearn_seed"]
    kmean, klo, khi = t_interval(per_seed)
    assert k["n"] == 2 and k["seeds"] == [0, 1] and k["values"] == pytest.approx(per_seed)
    assert (k["mean"], k["lo"], k["hi"]) == pytest.approx((kmean, klo, khi))
    assert f"; by seed [{klo:+.3f}, {khi:+.3f}] k=2" in md
    assert dp["by_unlearn_seed"] is None or dp["by_unlearn_seed"]["n"] == 2


def test_relearning_area_and_first_step(report):
    table, out = report
    cells = row_of(table, "resalign")["cells"]
    # area: trapezoid over steps 0, 2, 4 (step 0 = the same unlearning seed's pre value) / 4
    want = [
        np.trapezoid(
            [value("resalign", u, None, None, 0)] + [value("resalign", u, "poisoned", a, s) for s in (2, 4)],
            [0, 2, 4],
        ) / 4
        for u, a in UNITS
    ]  # fmt: skip
    area = cells["concept_rate/poisoned/area"]
    assert area["values"] == pytest.approx(want) and area["n"] == 4
    assert area["mean"] == pytest.approx(np.mean(want))
    # first step: threshold 0.45 = half of the original's pre value 0.9
    assert cells["concept_rate/poisoned/first"]["threshold"] == pytest.approx(0.45)
    firsts = [
        next((s for s in (0, 2, 4) if (value("resalign", u, None, None, 0) if s == 0 else
              value("resalign", u, "poisoned", a, s)) > 0.45), None)
        for u, a in UNITS
    ]  # fmt: skip
    first = cells["concept_rate/poisoned/first"]
    assert first["values"] == firsts and first["relearned"] == sum(f is not None for f in firsts)
    benign = cells["concept_rate/benign/first"]
    assert benign["values"] == [None] * 4 and benign["median"] is None  # never within 4 steps
    plain = row_of(table, "plain")["cells"]["concept_rate/benign/first"]
    assert plain["values"] == [4, 4, 2, 2]  # step 2: 0.41, 0.42 | 0.46, 0.47 > 0.45
    # paired: resalign relearns later than plain on every pair (censored counts as later)
    d = row_of(table, "resalign")["diff"]["concept_rate/benign/first"]
    assert (d["later"], d["earlier"], d["tied"]) == (4, 0, 0)
    assert d["sign_test_p"] == pytest.approx(2 * 0.5**4)
    md = (out / "report.md").read_text()
    assert "> 4 (0/4 relearned)" in md and "later 4 / earlier 0 / tied 0, p=0.12" in md


def test_mlflow_summary_and_evaluation_n(report):
    table, out = report
    flat = table_metrics(table)
    area = row_of(table, "resalign")["cells"]["concept_rate/poisoned/area"]
    key = "relearn_area.concept_rate.poisoned.resalign"
    assert flat[key] == area["mean"] and flat[key + ".n"] == 4.0
    assert flat[key + ".lo"] == area["lo"]
    diff = row_of(table, "resalign")["diff"]["concept_rate/poisoned/area"]
    assert flat["relearn_area_diff.concept_rate.poisoned.resalign"] == diff["mean"]
    assert flat["first_relearn_step.concept_rate.poisoned.plain.relearned"] == 1.0
    assert "first_relearn_step.concept_rate.benign.resalign" not in flat  # censored median
    assert table["evaluation_n"]["concept_rate"]["n"] == [N_IMAGES]
    se = 0.5 / math.sqrt(N_IMAGES)
    assert table["evaluation_n"]["concept_rate"]["max_binomial_se"] == pytest.approx(se)
    md = (out / "report.md").read_text()
    assert f"concept_rate from n = {N_IMAGES} images (binomial SE ≤ {se:.3f})" in md
    assert "Unlearning seeds [0, 1], attack seeds [1, 2]" in md


def test_stats_helpers_by_hand():
    assert area_under([(0, 0.0), (10, 1.0)]) == pytest.approx(0.5)
    assert area_under([(0, 0.2), (25, 0.2), (100, 1.0)]) == pytest.approx(
        (25 * 0.2 + 75 * 0.6) / 100
    )
    assert first_exceeding([(0, 0.1), (5, 0.5), (10, 0.9)], 0.4) == 5
    assert first_exceeding([(0, 0.1), (5, 0.2)], 0.4) is None
    assert lower_median([10, None, 5]) == 10 and lower_median([None, None, 5]) is None
    assert lower_median([5, 10, None, None]) == 10


def test_mean_ci_against_scipy_interval():
    vals = [0.1, 0.25, 0.2, 0.4]
    mean, half = mean_ci(vals)
    lo, hi = stats.t.interval(0.95, len(vals) - 1, loc=mean, scale=stats.sem(vals))
    assert mean == pytest.approx(0.2375) and half == pytest.approx((hi - lo) / 2)
    assert mean_ci([0.3]) == (0.3, None)


def test_missing_result_names_the_node_and_the_command(tmp_path):
    graph = make_store(tmp_path / "runs")
    name = "evaluate/plain/seed1/poisoned/seed2/step4"
    (tmp_path / "runs" / "evaluate" / graph.nodes[name].key / "DONE").unlink()
    with pytest.raises(UserError) as err:
        results_from_store(graph, tmp_path / "runs", "specs/demo.yaml")
    text = err.value.render()
    assert name in text and "resalign run specs/demo.yaml" in text


def test_a_damaged_result_is_missing_never_read(tmp_path):
    """With the store's own completeness test (what `resalign report` passes), an evaluation
    whose metrics.json no longer matches its DONE manifest is reported missing."""
    from resalign.engine.store import Store, build_manifest

    graph = make_store(tmp_path / "runs")
    store = Store(tmp_path / "runs")
    name = "evaluate/resalign/seed0/poisoned/seed1/step2"
    for node in graph.of_kind("evaluate"):  # manifests, as the engine's commit writes them
        d = tmp_path / "runs" / "evaluate" / node.key
        (d / "DONE").unlink()
        (d / "DONE").write_text(json.dumps(build_manifest(d)))
    folder = tmp_path / "runs" / "evaluate" / graph.nodes[name].key
    assert len(results_from_store(graph, tmp_path / "runs", complete=store.is_complete)) > 1
    metrics = folder / "metrics.json"
    metrics.write_text(metrics.read_text().replace("}", " }", 1))  # edited after DONE
    with pytest.raises(UserError) as err:
        results_from_store(graph, tmp_path / "runs", "s.yaml", complete=store.is_complete)
    assert name in err.value.render() and "1 of" in err.value.render()


def test_all_steps_gives_a_column_per_evaluation_step(tmp_path):
    graph = make_store(tmp_path / "runs")
    results = results_from_store(graph, tmp_path / "runs")
    table = write_report(
        results, tmp_path / "out", rows=ROWS, threats=THREATS, title="demo", all_steps=True
    )
    ids = [c["id"] for c in table["columns"] if c["kind"] == "value"]
    assert ids == [
        "concept_rate/pre",
        "concept_rate/benign@2",
        "concept_rate/benign",
        "concept_rate/poisoned@2",
        "concept_rate/poisoned",
        "retain_accuracy/pre",
    ]
    plain = row_of(table, "plain")["cells"]
    # step 2 of the benign threat: 0.02u + 0.2 * 2 + 0.01 * a + 0.03u
    assert plain["concept_rate/benign@2"]["values"] == pytest.approx([0.41, 0.42, 0.46, 0.47])
    assert plain["concept_rate/benign"]["values"] == pytest.approx([0.81, 0.82, 0.86, 0.87])
    md = (tmp_path / "out" / "report.md").read_text()
    assert "after benign (step 2)" in md and "after benign (step 4)" in md


def test_report_compiles_with_the_runs_set_items(tmp_path):
    from click.testing import CliRunner

    from resalign.cli import cli

    args = ["report", "tests/specs/tiny.yaml", "--store", str(tmp_path / "empty")]
    res = CliRunner().invoke(cli, [*args, "--set", "unlearn.seeds=[4, 5]"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "evaluate/resalign/seed4/pre/step0" in res.output


def test_row_summaries_per_unlearning_seed_by_hand(tmp_path):
    """The MLflow summary runs' numbers (one per row and unlearning seed), recomputed from
    value() and retain(): means over the attack seeds, the trapezoid area, first steps."""
    from resalign.evaluation.summary import row_summaries

    graph = make_store(tmp_path / "runs")
    results = results_from_store(graph, tmp_path / "runs")
    got = {(s.row, s.unlearn_seed): s.metrics for s in row_summaries(results, ROWS, THREATS)}
    assert list(got) == [("original", None), ("plain", 0), ("plain", 1), ("resalign", 0),
                         ("resalign", 1)]  # fmt: skip
    for (row, u), m in got.items():
        seeds = (1, 2)
        want = {"concept_rate/pre": value(row, u, None, None, 0)}
        for t in THREATS:
            for s in (2, 4):
                want[f"concept_rate/{t}/step{s}"] = np.mean([value(row, u, t, a, s) for a in seeds])
            curves = [[value(row, u, None, None, 0)] + [value(row, u, t, a, s) for s in (2, 4)]
                      for a in seeds]  # fmt: skip
            want[f"relearning_area/{t}"] = np.mean([np.trapezoid(c, [0, 2, 4]) / 4 for c in curves])
            firsts = [next((s for s, v in zip((0, 2, 4), c) if v > 0.45), None) for c in curves]
            want[f"relearned/{t}"] = sum(f is not None for f in firsts) / 2
            if lower_median(firsts) is not None:
                want[f"first_relearn_step/{t}"] = lower_median(firsts)
        want["retain_accuracy/pre"] = retain(row, u)
        assert list(m) == list(want), (row, u)  # the table's order: safety, then utility
        assert m == pytest.approx(want), (row, u)
    assert got[("plain", 1)]["first_relearn_step/benign"] == 2  # 0.46, 0.47 > 0.45 at step 2


def test_row_summaries_carry_each_models_outer_step_medians(tmp_path):
    """The ``unlearn/`` keys are the model's own outer-step values, on its own row and seed
    only, after the report's numbers (rows without a model's steps get none)."""
    from resalign.evaluation.dynamics import ModelDynamics
    from resalign.evaluation.summary import row_summaries

    graph = make_store(tmp_path / "runs")
    results = results_from_store(graph, tmp_path / "runs")
    models = [ModelDynamics("resalign", 1, 2, {"resilience_ratio": 0.4, "fallbacks": 3.0}),
              ModelDynamics("resalign", 7, 2, {"resilience_ratio": 9.0})]  # fmt: skip
    plain = {(s.row, s.unlearn_seed): s.metrics for s in row_summaries(results, ROWS, THREATS)}
    got = {(s.row, s.unlearn_seed): s.metrics
           for s in row_summaries(results, ROWS, THREATS, models)}  # fmt: skip
    assert list(got) == list(plain)  # no row for a seed the report has no results of
    want = dict(plain[("resalign", 1)], **{"unlearn/resilience_ratio": 0.4,
                                          "unlearn/fallbacks": 3.0})  # fmt: skip
    assert list(got[("resalign", 1)].items()) == list(want.items())
    assert {k: v for k, v in got.items() if k != ("resalign", 1)} == {
        k: v for k, v in plain.items() if k != ("resalign", 1)
    }


def test_html_is_self_contained_split_by_threat_with_correct_definitions(report):
    import base64
    import io
    import re
    import stat

    table, out = report
    page = (out / "report.html").read_text()
    srcs = re.findall(r"src='([^']*)'", page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in srcs:  # each inline image is the PNG written beside it
        Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))).verify()
    assert "alt='concept_rate_vs_steps.png'" in page and "alt='grids.png'" in page
    # one table per column group: before fine-tuning, then each threat
    assert re.findall(r"<h3>([^<]*)</h3>", page) == [
        "before fine-tuning", "after benign", "after poisoned"]  # fmt: skip
    # definitions: each metric says what it measures; parameters once per definition
    md = (out / "report.md").read_text()
    defs = md.split("## Metric definitions")[1]
    assert "| concept_rate | fraction of the generations of the concept's prompt" in defs
    assert "| retain_accuracy | fraction of the generations of the other digits' prompts" in defs
    assert "| utility, higher is better | concept_rate v1 | 20 |" in defs
    assert defs.count('{"svc": {"C": 10}}') == 1
    assert "| concept_rate v1 | concept_rate, retain_accuracy |" in defs
    for f in out.iterdir():  # readable by others, as open() would create them
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~_umask(), f


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_grid_caption_names_rows_seeds_steps_and_images(tmp_path):
    import json as json_

    graph = make_store(tmp_path / "runs")
    for node in graph:  # what the evaluate step writes: the first group's image index
        index = tmp_path / "runs" / "evaluate" / node.key / "images" / "g0" / "images"
        index.mkdir(parents=True)
        lines = [{"prompt": "a handwritten digit zero", "prompt_index": 0, "image_index": i}
                 for i in range(20)]  # fmt: skip
        (index / "index.jsonl").write_text("\n".join(json_.dumps(x) for x in lines))
    results = results_from_store(graph, tmp_path / "runs")
    write_report(results, tmp_path / "out", rows=ROWS, threats=THREATS, title="demo")
    md = (tmp_path / "out" / "report.md").read_text()
    caption = md.split("![grids](grids.png)")[1].strip().split("\n")[0]
    assert caption == (
        "Samples: rows original, plain, resalign; columns pre-FT (step 0), after benign "
        "(attack step 4), after poisoned (attack step 4); each tile shows 16 generated images "
        "('a handwritten digit zero' ×16), the first of that evaluation's images in generation "
        "order; one unit per row (original: attack seed 1; plain: unlearning seed 0, attack "
        "seed 1; resalign: unlearning seed 0, attack seed 1)."
    )
    assert "<figcaption>Samples: rows original" in (tmp_path / "out" / "report.html").read_text()


def test_results_are_located_by_node_fields_not_names(tmp_path):
    """``results_from_store`` reads where each evaluate node sits from its ``Node``; names are
    opaque to it (names no parser could read give the same table)."""
    graph = make_store(tmp_path / "runs")
    renamed = Graph("demo", "h")
    for i, n in enumerate(graph.of_kind("evaluate")):
        renamed.nodes[f"e{i}"] = dataclasses.replace(n, name=f"e{i}")
    by_node = results_from_store(renamed, tmp_path / "runs")
    by_name = results_from_store(graph, tmp_path / "runs")
    assert [dataclasses.astuple(r) for r in by_node] == [dataclasses.astuple(r) for r in by_name]
    assert {(r.row, r.unlearn_seed) for r in by_node} == {
        ("original", None), ("plain", 0), ("plain", 1), ("resalign", 0), ("resalign", 1)}  # fmt: skip


def test_the_report_steps_inputs_are_located_by_node_json_then_name(tmp_path):
    """The report step sees only folders: a ``node.json`` recording the Node's location gives
    it (over what the name says); one without those fields (every node stored so far) or no
    ``node.json`` at all falls back to the name."""
    graph = make_store(tmp_path / "runs")
    nodes = graph.of_kind("evaluate")
    a, b = nodes[1], nodes[2]  # original after an attack; a second original evaluation
    folder = tmp_path / "runs" / "evaluate"
    recorded = {"row": "plain", "unlearn_seed": 7, "threat": "benign", "seed": 9, "step": 4}
    (folder / a.key / "node.json").write_text(json.dumps({"name": a.name, **recorded}))
    (folder / b.key / "node.json").write_text(json.dumps({"name": b.name, "params": {"step": 2}}))
    got = results_from_dirs({n.name: folder / n.key for n in (a, b, nodes[0])})
    assert (got[0].row, got[0].unlearn_seed, got[0].threat, got[0].seed, got[0].step) == (
        "plain", 7, "benign", 9, 4)  # fmt: skip
    assert (got[1].row, got[1].unlearn_seed, got[1].threat, got[1].seed, got[1].step) == (
        b.row, b.unlearn_seed, b.threat, b.seed, b.step)  # fmt: skip
    assert (got[2].row, got[2].threat, got[2].step) == ("original", None, 0)
