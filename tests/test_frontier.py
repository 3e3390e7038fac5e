"""The utility-matched frontier: relearning area against retain accuracy per method, and the
paired, interpolated difference over the common range, checked against an independent dense
numpy computation; then `resalign report TEMPLATE --frontier` on a tiny grid run for real."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

from resalign.evaluation.frontier import build_frontier, write_frontier
from resalign.evaluation.report import EvalResult
from resalign.evaluation.stats import interpolate, mean_gap_over_common_range

STRENGTHS = [1, 2, 3]
UNITS = [(0, 1), (0, 2), (1, 1), (1, 2)]
LAST = 10


def retain(method, s, u, shift=0.0):
    return (0.95 if method == "plain" else 0.97) - 0.1 * s - 0.01 * u + shift


def final_rate(method, s, u, a):
    return (0.8 if method == "plain" else 0.7) - 0.2 * s + 0.01 * a + 0.005 * u * s


def results(shift=0.0):
    """Rows '<method>/s<s>': concept_rate 0 before the attack, final_rate at step 10."""
    out, groups = [], {}
    for m in ("plain", "resalign"):
        for s in STRENGTHS:
            row = f"{m}/s{s}"
            groups.setdefault(m, []).append((row, f"s{s}"))
            for u in (0, 1):
                pre = {
                    "concept_rate": {"value": 0.0, "role": "safety"},
                    "retain_accuracy": {"value": retain(m, s, u, shift * (m == "resalign"))},
                }
                out.append(EvalResult(row, None, None, 0, pre, Path("."), u))
                for a in (1, 2):
                    post = {"concept_rate": {"value": final_rate(m, s, u, a), "role": "safety"}}
                    out.append(EvalResult(row, "poison", a, LAST, post, Path("."), u))
    return out, groups


def dense_gap(a, b):
    """Independent check: mean of the interpolated difference on a dense grid (numpy)."""
    lo, hi = max(min(a[0]), min(b[0])), min(max(a[0]), max(b[0]))
    xs = np.linspace(lo, hi, 200001)
    oa, ob = np.argsort(a[0]), np.argsort(b[0])
    ya = np.interp(xs, np.asarray(a[0])[oa], np.asarray(a[1])[oa])
    yb = np.interp(xs, np.asarray(b[0])[ob], np.asarray(b[1])[ob])
    return float(np.mean(ya - yb))


def test_frontier_difference_matches_dense_interpolation(tmp_path):
    res, groups = results()
    front = build_frontier(res, groups, "poison", "concept_rate", ["retain_accuracy"])
    pts = front["methods"]["resalign"]
    assert [p["strength"] for p in pts] == ["s1", "s2", "s3"]
    # y: area of a straight line from 0 to the final rate over [0, 10] = half the final rate
    want = [final_rate("resalign", 2, u, a) / 2 for u, a in UNITS]
    assert pts[1]["y"]["values"] == pytest.approx(want)
    assert pts[1]["x"]["retain_accuracy"]["values"] == pytest.approx(
        [retain("resalign", 2, u) for u in (0, 1)]
    )
    (cmp,) = front["comparisons"]
    assert (cmp["method"], cmp["reference"], cmp["x_metric"]) == (
        "resalign",
        "plain",
        "retain_accuracy",
    )
    gaps = []
    for u, a in UNITS:
        curve = {
            m: (
                [retain(m, s, u) for s in STRENGTHS],
                [final_rate(m, s, u, a) / 2 for s in STRENGTHS],
            )
            for m in ("resalign", "plain")
        }
        gaps.append(dense_gap(curve["resalign"], curve["plain"]))
    d = cmp["difference"]
    assert d["values"] == pytest.approx(gaps, abs=1e-6) and d["n"] == 4
    mean = float(np.mean(gaps))
    lo, hi = stats.t.interval(0.95, 3, loc=mean, scale=stats.sem(gaps))
    assert (d["mean"], d["lo"], d["hi"]) == pytest.approx((mean, lo, hi), abs=1e-6)
    assert mean < 0 and hi < 0  # resalign's line lies below plain's at equal retain accuracy
    # over unlearning seeds: each seed's pairs averaged, then t with k - 1 = 1 degree of freedom
    per_seed = [np.mean([g for g, (u, _) in zip(gaps, UNITS) if u == s]) for s in (0, 1)]
    k = d["by_unlearn_seed"]
    klo, khi = stats.t.interval(0.95, 1, loc=np.mean(per_seed), scale=stats.sem(per_seed))
    assert k["n"] == 2 and k["values"] == pytest.approx(per_seed, abs=1e-6)
    assert (k["lo"], k["hi"]) == pytest.approx((max(klo, -1.0), min(khi, 1.0)), abs=1e-6)
    assert "over the k = 2 unlearning seeds" in cmp["sentence"]
    assert "resalign relearns less than plain" in cmp["sentence"]
    assert f"{mean:+.3f}" in cmp["sentence"] and "n = 4" in cmp["sentence"]
    sentences = write_frontier(front, tmp_path)
    assert sentences == [cmp["sentence"]]
    assert (tmp_path / "frontier.png").stat().st_size > 0
    saved = json.loads((tmp_path / "frontier.json").read_text())
    assert saved["comparisons"][0]["difference"]["mean"] == pytest.approx(mean)


def test_frontier_says_when_the_common_range_is_empty(tmp_path):
    res, groups = results(shift=0.5)  # resalign's retain accuracies all above plain's
    front = build_frontier(res, groups, "poison", "concept_rate", ["retain_accuracy"])
    (cmp,) = front["comparisons"]
    assert cmp["difference"]["n"] == 0 and len(cmp["pairs_without_common_range"]) == 4
    assert "reach no common retain_accuracy range" in cmp["sentence"]
    assert "widen" in cmp["sentence"]


def transfer_results():
    """A transfer grid's results: cells ``<sim>,s<k>`` with rows ``<cell>/<sim>`` and
    ``<cell>/plain``; sim_a at three strengths, sim_b at two, sim_c at one; two threats. The
    plain rows of sim_b's cells differ from sim_a's (another shift), so pairing a method with
    the reference rows of *other* cells would change every number."""
    out, groups = [], {}
    runs = {"sim_a": [1, 2, 3], "sim_b": [1, 3], "sim_c": [2]}
    for sim, strengths in runs.items():
        for s in strengths:
            cell = f"{sim},s{s}"
            for m in (sim, "plain"):
                row = f"{cell}/{m}"
                groups.setdefault(m, []).append((row, cell))
                shift = 0.02 * (sim == "sim_b") if m == "plain" else 0.0
                for u in (0, 1):
                    pre = {
                        "concept_rate": {"value": 0.0, "role": "safety"},
                        "retain_accuracy": {"value": retain(m, s, u) + shift, "role": "utility"},
                    }
                    out.append(EvalResult(row, None, None, 0, pre, Path("."), u))
                    for t, k in (("poison", 1.0), ("benign", 0.5)):
                        for a in (1, 2):
                            y = k * final_rate(m, s, u, a) + shift
                            post = {"concept_rate": {"value": y, "role": "safety"}}
                            out.append(EvalResult(row, t, a, LAST, post, Path("."), u))
    return out, groups, runs


def test_matched_transfer_compares_each_simulation_with_the_plain_rows_of_its_own_cells():
    from resalign.evaluation.frontier import matched_transfer

    res, groups, runs = transfer_results()
    view = matched_transfer(
        res, groups, ["poison", "benign"], "concept_rate", "retain_accuracy", None
    )
    # sim_c ran one strength: no curve, no entry
    assert [r["row"] for r in view["rows"]] == ["sim_a", "sim_b"]
    for r in view["rows"]:
        sim = r["row"]
        assert r["reference"] == "plain"
        assert r["strengths"] == [f"{sim},s{s}" for s in runs[sim]]
        shift = 0.02 * (sim == "sim_b")
        for t, k in (("poison", 1.0), ("benign", 0.5)):
            gaps = []
            for u, a in UNITS:
                mine = (
                    [retain(sim, s, u) for s in runs[sim]],
                    [k * final_rate(sim, s, u, a) / 2 for s in runs[sim]],
                )
                ref = (
                    [retain("plain", s, u) + shift for s in runs[sim]],
                    [(k * final_rate("plain", s, u, a) + shift) / 2 for s in runs[sim]],
                )
                gaps.append(dense_gap(mine, ref))
            d = r["matched"][t]
            assert d["values"] == pytest.approx(gaps, abs=1e-6) and d["n"] == 4
            lo, hi = stats.t.interval(0.95, 3, loc=np.mean(gaps), scale=stats.sem(gaps))
            assert (d["lo"], d["hi"]) == pytest.approx((max(lo, -1), min(hi, 1)), abs=1e-6)
            assert d["by_unlearn_seed"]["n"] == 2 and d["pairs_without_common_range"] == 0
    # laid out by the transfer view, one table row per simulated configuration
    from resalign.evaluation.report.render import fmt_diff
    from resalign.evaluation.transfer import transfer_markdown, transfer_note

    table = {"table": [], "threats": {"poison": {}, "benign": {}}, "columns": [], "metrics": {}}
    from resalign.evaluation.transfer import transfer_view

    tv = transfer_view(table, view)
    md = transfer_markdown(tv, fmt_diff)
    assert "Δ relearning area at equal retain_accuracy, poison" in md
    line = next(x for x in md.splitlines() if x.startswith("| sim_b − plain"))
    assert fmt_diff(view["rows"][1]["matched"]["benign"]) in line
    assert "equal retain_accuracy" in transfer_note(tv)
    assert transfer_view(table, None) is None


def test_interpolation_helpers_by_hand():
    assert interpolate([0.0, 1.0], [0.0, 2.0], [0.25, -1.0, 3.0]) == [0.5, 0.0, 2.0]
    assert interpolate([1.0, 0.0, 1.0], [1.0, 0.0, 3.0], [1.0]) == [2.0]  # equal xs averaged
    # a(x) = x, b(x) = 0 on [0, 1], common range [0.5, 1]: mean of x over it = 0.75
    gap, rng = mean_gap_over_common_range(([0.0, 1.0], [0.0, 1.0]), ([0.5, 2.0], [0.0, 0.0]))
    assert gap == pytest.approx(0.75) and rng == (0.5, 1.0)
    assert mean_gap_over_common_range(([0.0, 0.4], [0, 0]), ([0.5, 1.0], [0, 0])) is None


TEMPLATE = """\
# Tiny frontier: unlearning steps x two methods on a seconds-long model
---
name: tiny_frontier
matrix:
  steps: [1, 3]
---
version: 1
name: tiny-frontier-{{ cell.slug }}
seed: 0
model:
  family: tiny
  device: cpu
  trainable: {kind: lora, rank: 2}
  noise_schedule: {beta_schedule: linear, beta_start: 1.0e-4, beta_end: 0.02}
  tiny:
    sample_size: 8
    block_out_channels: [8, 16]
    attention_head_dim: 8
    cross_attention_dim: 8
    text_hidden_size: 8
    text_layers: 1
    max_length: 32
    pretrain: {dataset: train, steps: 4, lr: 2.0e-3, batch_size: 16, seed: 0}
datasets:
  train: {type: digits, split: train, limit: 32}
  harmful: {type: digits, split: train, digits: [0], limit: 8}
  retain: {type: digits, split: train, digits: [1, 2, 3], limit: 8}
  benign: {type: digits, split: train, digits: [4, 5, 6], limit: 8}
concepts:
  digit: {harmful: [harmful], retain: [retain], label: 0}
unlearn:
  method: resalign
  steps: {{ steps }}
  seeds: [0, 1]
  optimizer: {name: adam, lr: 1.0e-2, weight_decay: 0.0}
  harmful_loss: {kind: neg_denoise, batch_size: 4}
  regularizers: [{kind: distill, weight: 1.0, batch_size: 4, schedule: {kind: constant}}]
  resilience:
    beta: 0.8
    hypergradient: {kind: moreau, gamma: 0.01, iterations: 1}
    meta:
      samples_per_step: 1
      data: [retain]
      configs:
        sgd: {algorithm: full, optimizer: sgd, lr: 1.0e-3, steps: 1, batch_size: 4, data: retain}
baselines:
  plain: {method: plain}
threats:
  benign:
    data: benign
    steps: 2
    eval_at: [1, 2]
    batch_size: 4
    precision: fp32
    optimizer: adam
    lr: 1.0e-3
    seeds: [1]
evaluate:
  generation: {steps: 2, images_per_prompt: 2, batch_size: 20}
  metrics: [{kind: concept_rate}]
tracking:
  experiment: tiny_frontier
"""


@pytest.mark.slow
def test_report_frontier_on_a_tiny_grid(tmp_path, monkeypatch):
    from resalign.cli import cli
    from resalign.engine.grid import run_grid
    from resalign.engine.options import RunOptions

    tpl = tmp_path / "tiny_frontier.yaml.j2"
    tpl.write_text(TEMPLATE)
    store = tmp_path / "runs"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    summary = run_grid(tpl, RunOptions(store=store, tracking=False))
    assert [c.cell_id for c in summary.cells] == ["steps=1", "steps=3"]

    out = tmp_path / "report"
    args = ["report", str(tpl), "--store", str(store), "--out", str(out), "--frontier"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert (out / "frontier.png").stat().st_size > 0
    front = json.loads((out / "frontier.json").read_text())
    assert front["threat"] == "benign" and front["x_metrics"] == [
        "retain_accuracy",
        "classifier_fid",
    ]
    assert {m: [p["row"] for p in pts] for m, pts in front["methods"].items()} == {
        "resalign": ["steps=1/resalign", "steps=3/resalign"],
        "plain": ["steps=1/plain", "steps=3/plain"],
    }
    # the grid table pairs each cell's resalign row with that cell's plain row
    table = json.loads((out / "table.json").read_text())
    row = next(r for r in table["table"] if r["row"] == "steps=3/resalign")
    assert row["reference"] == "steps=3/plain"
    # one method under one threat: the frontier's sentence, no transfer section repeating it
    assert "transfer" not in table
    assert row["diff"]["concept_rate/benign/area"]["n"] == 2  # 2 unlearning x 1 attack seed
    # the frontier's number, recomputed from the table's per-unit values
    cells = {r["row"]: r["cells"] for r in table["table"]}
    cmp = next(c for c in front["comparisons"] if c["x_metric"] == "retain_accuracy")
    gaps = []
    for u in (0, 1):
        curve = {}
        for m in ("resalign", "plain"):
            xs, ys = [], []
            for s in (1, 3):
                c = cells[f"steps={s}/{m}"]
                xs.append(c["retain_accuracy/pre"]["values"][u])
                ys.append(c["concept_rate/benign/area"]["values"][u])
            curve[m] = (xs, ys)
        lo = max(min(curve["resalign"][0]), min(curve["plain"][0]))
        hi = min(max(curve["resalign"][0]), max(curve["plain"][0]))
        if hi > lo:
            gaps.append(dense_gap(curve["resalign"], curve["plain"]))
    assert cmp["difference"]["n"] == len(gaps)
    assert cmp["difference"]["values"] == pytest.approx(gaps, abs=1e-6)
    assert cmp["sentence"] in res.output
    # a spec is not a grid: --frontier is a user error
    bad = CliRunner().invoke(cli, ["report", "tests/specs/tiny.yaml", "--frontier"])
    assert bad.exit_code == 2 and "grid template" in bad.output and "Traceback" not in bad.output
    # --cell: the report of some cells alone; an unknown id names the grid's cells
    one = tmp_path / "one"
    args = ["report", str(tpl), "--store", str(store), "--out", str(one), "--cell", "steps=3"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    rows = json.loads((one / "table.json").read_text())["rows"]
    assert [r for r in rows if r.startswith("steps=")] == ["steps=3/resalign", "steps=3/plain"]
    bad = CliRunner().invoke(cli, [*args[:-1], "steps=2"])
    assert bad.exit_code == 2 and "no cell 'steps=2'" in bad.output and "steps=1" in bad.output
