"""Resurgence as a proportion of unlearned models (issue 26): the exact binomial interval, the
exact McNemar comparison, the per-model classification and the report section. Each number is
checked against an independent computation (binomial sums with math.comb, by hand)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from resalign.evaluation.report import results_from_store, write_report
from resalign.evaluation.resurgence import resurgence_of_row
from resalign.evaluation.stats import clopper_pearson, exact_mcnemar, proportion
from resalign.graph.nodes import Graph, Node


def binom_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def bisect(f, lo=0.0, hi=1.0, it=200):
    """The root of an increasing f on [lo, hi]."""
    for _ in range(it):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("k,n", [(0, 10), (1, 10), (3, 10), (7, 12), (10, 10), (2, 3)])
def test_clopper_pearson_inverts_the_binomial_tails(k, n):
    """lo: P(X >= k | lo) = 0.025; hi: P(X <= k | hi) = 0.025 (the definition), solved by
    bisection on binomial sums, not by beta quantiles."""
    lo, hi = clopper_pearson(k, n)
    want_lo = 0.0 if k == 0 else bisect(lambda p: (1 - binom_cdf(k - 1, n, p)) - 0.025)
    want_hi = 1.0 if k == n else bisect(lambda p: 0.025 - binom_cdf(k, n, p))
    assert lo == pytest.approx(want_lo, abs=1e-9)
    assert hi == pytest.approx(want_hi, abs=1e-9)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_proportion_and_its_edges():
    p = proportion([True, False, False, True])
    assert (p["k"], p["n"], p["share"]) == (2, 4, 0.5)
    assert proportion([])["lo"] is None
    with pytest.raises(ValueError):
        clopper_pearson(5, 4)


def test_exact_mcnemar_by_hand():
    # seeds 0..9: a resurges on 0,1,2,3,4,5; b on 4,5,6
    a = {s: s <= 5 for s in range(10)}
    b = {s: 4 <= s <= 6 for s in range(10)}
    r = exact_mcnemar(a, b)
    assert (r["a_only"], r["b_only"], r["both"], r["neither"]) == (4, 1, 2, 3)
    # two-sided exact binomial test of 4 of 5 at 1/2: P(X<=1) + P(X>=4) = 12/32
    assert r["p"] == pytest.approx(12 / 32)
    assert r["diff"] == pytest.approx((6 - 3) / 10)
    lo, hi = clopper_pearson(4, 5)
    assert r["lo"] == pytest.approx((2 * lo - 1) * 5 / 10)
    assert r["hi"] == pytest.approx((2 * hi - 1) * 5 / 10)
    assert -1 <= r["lo"] <= r["diff"] <= r["hi"] <= 1
    # only common keys are paired; no discordant pair: p 1, interval [0, 0]
    same = exact_mcnemar({0: True, 1: False, 2: True}, {0: True, 1: False})
    assert (same["n"], same["p"], same["lo"], same["hi"]) == (2, 1.0, 0.0, 0.0)


def test_a_lopsided_difference_is_significant():
    a = {s: True for s in range(12)}
    b = {s: False for s in range(12)}
    r = exact_mcnemar(a, b)
    assert r["p"] == pytest.approx(2 * 0.5**12)
    assert r["lo"] > 0


def test_resurgence_of_row_classifies_each_model_by_its_peak():
    vals = {  # (row, threat, step) -> {unit: value}
        ("plain", "benign", 100): {(0, 1): 0.0, (0, 2): 0.01, (1, 1): 0.5, (1, 2): 0.1},
        ("plain", "benign", 200): {(0, 1): 0.2, (0, 2): 0.02, (1, 1): 0.3, (1, 2): 0.6},
    }

    def get(row, metric, threat, step):
        return vals.get((row, threat, step), {})

    areas = {(0, 1): 0.1, (0, 2): 0.01, (1, 1): 0.4, (1, 2): 0.3}
    e = resurgence_of_row(get, "plain", "concept_rate", "benign", [100, 200], 0.25, areas)
    assert (e["k"], e["n"]) == (1, 2)
    m0, m1 = e["models"][0], e["models"][1]
    assert (m0["resurged"], m0["peak"]) == (False, 0.2)
    assert (m1["resurged"], m1["peak"], m1["attack_runs_resurged"]) == (True, 0.6, 2)
    assert m1["area"] == pytest.approx(0.35)
    # a threshold the peak equals is not exceeded
    e = resurgence_of_row(get, "plain", "concept_rate", "benign", [100, 200], 0.6, areas)
    assert e["k"] == 0


def _store(root, peaks, threats=("benign",)):
    """Evaluate nodes of original (pre 0.8) and rows plain/resalign with 6 unlearning seeds:
    each model's post-FT value is ``peaks[row][seed]`` at step 2, half of it at step 1."""
    graph = Graph("res", "h")
    k = 0

    def add(row, useed, threat, seed, step, v):
        nonlocal k
        prefix = row if useed is None else f"{row}/seed{useed}"
        name = (
            f"evaluate/{prefix}/pre/step0"
            if threat is None
            else f"evaluate/{prefix}/{threat}/seed{seed}/step{step}"
        )
        key = f"k{k:03d}"
        k += 1
        graph.nodes[name] = Node(
            "evaluate", name, {}, {}, key, row, threat, seed, step, unlearn_seed=useed
        )
        folder = root / "evaluate" / key
        folder.mkdir(parents=True)
        metric = {"value": v, "definition": "concept_rate", "version": "1", "params": {},
                  "role": "safety", "better": "lower", "n": 100}  # fmt: skip
        (folder / "metrics.json").write_text(json.dumps({"concept_rate": metric}))
        (folder / "DONE").write_text("")

    add("original", None, None, None, 0, 0.8)
    for t in threats:
        for s in (1, 2):
            add("original", None, t, s, 1, 0.85)
            add("original", None, t, s, 2, 0.9)
    for row, by_seed in peaks.items():
        for u, p in by_seed.items():
            add(row, u, None, None, 0, 0.0)
            for i, t in enumerate(threats):
                for s in (1, 2):
                    add(row, u, t, s, 1, p / 2 / (i + 1))
                    add(row, u, t, s, 2, p / (i + 1))
    return graph


def test_report_section_shares_and_pairs(tmp_path):
    peaks = {
        "plain": {u: (0.6 if u in (1, 3, 4) else 0.0) for u in range(6)},
        "resalign": {u: (0.5 if u == 0 else 0.1) for u in range(6)},
    }
    graph = _store(tmp_path / "runs", peaks)
    results = results_from_store(graph, tmp_path / "runs")
    threats = {"benign": {"seeds": [1, 2], "eval_at": [1, 2], "steps": 2}}
    rows = ["original", "plain", "resalign"]
    table = write_report(results, tmp_path / "out", rows=rows, threats=threats)
    by = {e["row"]: e for e in table["resurgence"]}
    # default threshold: half the original's pre-FT value 0.8
    assert by["plain"]["threshold"] == pytest.approx(0.4)
    assert (by["plain"]["k"], by["plain"]["n"]) == (3, 6)
    assert (by["resalign"]["k"], by["resalign"]["n"]) == (1, 6)
    assert (by["original"]["k"], by["original"]["n"]) == (1, 1)
    p = by["resalign"]["paired"]
    assert (p["a_only"], p["b_only"], p["reference"]) == (1, 3, "plain")
    # two-sided exact test of 1 of 4 discordant at 1/2: (1 + 4 + 4 + 1) / 16
    assert p["p"] == pytest.approx(10 / 16)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Resurgence" in md and "3/6 = 0.50" in md and "1/6 = 0.17" in md
    assert (tmp_path / "out" / "resurgence_areas.png").stat().st_size > 1000
    # an absolute threshold from the spec's report.resurgence
    table = write_report(
        results, tmp_path / "out2", rows=rows, threats=threats, resurgence={"threshold": 0.05}
    )
    by = {e["row"]: e for e in table["resurgence"]}
    assert (by["plain"]["k"], by["resalign"]["k"]) == (3, 6)


def test_transfer_view_pivots_the_tables_own_differences(tmp_path):
    peaks = {
        "plain": {u: 0.1 * u for u in range(3)},
        "sim_a": {u: 0.05 * u + 0.02 for u in range(3)},
        "sim_b": {u: 0.2 for u in range(3)},
    }
    graph = _store(tmp_path / "runs", peaks, threats=("benign", "poison"))
    results = results_from_store(graph, tmp_path / "runs")
    threats = {t: {"seeds": [1, 2], "eval_at": [1, 2], "steps": 2} for t in ("benign", "poison")}
    rows = ["original", "plain", "sim_a", "sim_b"]
    table = write_report(results, tmp_path / "out", rows=rows, threats=threats)
    view = table["transfer"]
    assert view["metric"] == "concept_rate" and view["threats"] == ["benign", "poison"]
    assert [r["row"] for r in view["rows"]] == ["sim_a", "sim_b"]
    by_row = {r["row"]: r for r in table["table"]}
    for r in view["rows"]:
        for t in ("benign", "poison"):
            assert r["area"][t] == by_row[r["row"]]["diff"][f"concept_rate/{t}/area"]
    # sim_b − plain in area at the poison threat, by hand: per seed u the area over steps
    # 0, 1, 2 of (0, p/4, p/2) is (p/4 + p/2)/2 + p/8 ... = (0 + 2·p/4 + p/2)/4 = p/4
    want = sum(0.2 / 4 - 0.1 * u / 4 for u in range(3)) / 3
    assert view["rows"][1]["area"]["poison"]["mean"] == pytest.approx(want)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Transfer" in md and "sim_b − plain" in md
    # one method row: no transfer view
    table = write_report(results, tmp_path / "o2", rows=rows[:3], threats=threats)
    assert "transfer" not in table


def test_the_perturbation_probe_is_a_predictor_of_the_other_threats_resurgence(tmp_path):
    """A perturb threat's value at each radius (mean over directions) is tested against
    resurgence under the other threats, never its own."""
    peaks = {"plain": {u: (0.6 if u in (1, 3, 4) else 0.0) for u in range(6)}}
    graph = _store(tmp_path / "runs", peaks, threats=("benign", "probe"))
    results = results_from_store(graph, tmp_path / "runs")
    threats = {
        "benign": {"seeds": [1, 2], "eval_at": [1, 2], "steps": 2},
        "probe": {"seeds": [1, 2], "eval_at": [1, 2], "steps": 2, "radii": [0.05, 0.1]},
    }
    table = write_report(results, tmp_path / "out", rows=["original", "plain"], threats=threats)
    entries = table["predictors"]["entries"]
    named = [e for e in entries if e["predictor"].startswith("concept_rate at radius")]
    assert {e["predictor"] for e in named} == {
        "concept_rate at radius 0.05 (probe)",
        "concept_rate at radius 0.1 (probe)",
    }
    assert {e["threat"] for e in named} == {"benign"}
    # the probe's value at radius 0.1 (step 2) is each model's peak / 2: it separates the
    # resurged models (peak 0.6) from the others (0) perfectly
    e = next(e for e in named if e["predictor"] == "concept_rate at radius 0.1 (probe)")
    assert e["n"] == 6 and e["auc"] == pytest.approx(1.0)


def test_report_reference_pairs_every_method_with_the_named_row(tmp_path):
    """``report.reference: esd``: ResAlign built on ESD's loss is paired with ESD, in the
    table's differences and in the resurgence comparison; the reference has neither."""
    peaks = {
        "plain": {u: 0.0 for u in range(6)},
        "esd": {u: (0.6 if u in (1, 3, 4) else 0.0) for u in range(6)},
        "resalign_esd": {u: (0.5 if u == 0 else 0.1) for u in range(6)},
    }
    graph = _store(tmp_path / "runs", peaks)
    results = results_from_store(graph, tmp_path / "runs")
    threats = {"benign": {"seeds": [1, 2], "eval_at": [1, 2], "steps": 2}}
    rows = ["original", "plain", "esd", "resalign_esd"]
    table = write_report(results, tmp_path / "out", rows=rows, threats=threats, reference="esd")
    entries = {e["row"]: e for e in table["table"]}
    assert entries["resalign_esd"]["reference"] == "esd"
    assert entries["plain"]["reference"] == "esd"
    assert "diff" not in entries["esd"] and "diff" not in entries["original"]
    d = entries["resalign_esd"]["diff"]["concept_rate/benign"]
    want = [peaks["resalign_esd"][u] - peaks["esd"][u] for u in range(6) for _ in (1, 2)]
    assert sorted(d["values"]) == pytest.approx(sorted(want))
    p = {e["row"]: e for e in table["resurgence"]}["resalign_esd"]["paired"]
    assert (p["a_only"], p["b_only"], p["reference"]) == (1, 3, "esd")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| Δ resalign_esd − esd (paired) |" in md and "− plain (paired)" not in md


@pytest.mark.fast
def test_a_report_reference_that_names_no_row_is_a_located_error(tmp_path):
    from click.testing import CliRunner

    from resalign.cli import cli

    demo = Path(__file__).resolve().parents[1] / "specs" / "digits_demo.yaml"
    spec = tmp_path / "ref.yaml"
    spec.write_text(f"version: 1\nextends: {demo}\nname: ref\nreport:\n  reference: esd\n")
    res = CliRunner().invoke(cli, ["validate", str(spec)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert f"{spec}:5:14: report.reference is 'esd', but no row has that label" in res.output
    assert "allowed: resalign, plain" in res.output
    # naming an existing row is valid, and the report node reads it
    spec.write_text(f"version: 1\nextends: {demo}\nname: ref\nreport:\n  reference: resalign\n")
    assert CliRunner().invoke(cli, ["validate", str(spec)]).exit_code == 0
    from resalign.graph.compile import compile_spec
    from resalign.spec import load_spec

    assert compile_spec(load_spec(spec))["report"].params["reference"] == "resalign"
