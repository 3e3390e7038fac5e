"""What predicts resurgence (issue 26): the Mann–Whitney AUC and its exact p against scipy and
against brute-force enumeration, the predictor table's groups, the report section, and the
probe nodes' place in the graph (new nodes only; no existing key changes)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from scipy import stats

from resalign.evaluation.predictors import (
    POOLED,
    Predictor,
    ProbeResult,
    predictor_table,
    predictors_from_probes,
    probe_results_from_store,
    rank_sum_test,
)
from resalign.evaluation.report import results_from_store, write_report
from resalign.graph.compile import compile_spec
from resalign.graph.nodes import Graph, Node
from resalign.spec import load_spec
from resalign.spec.errors import SpecError

DEMO = "specs/digits_demo.yaml"
BENIGN = "specs/digits_benign.yaml"


@pytest.mark.parametrize("n1,n0,seed", [(3, 7, 0), (5, 5, 1), (1, 9, 2), (10, 14, 3), (6, 2, 4)])
def test_auc_and_exact_p_match_scipy_without_ties(n1, n0, seed):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=n1) + 0.7, rng.normal(size=n0)
    r = rank_sum_test(list(x), list(y))
    s = stats.mannwhitneyu(x, y, method="exact")
    assert r["auc"] == pytest.approx(s.statistic / (n1 * n0), rel=1e-12)
    assert r["p"] == pytest.approx(s.pvalue, rel=1e-9)


def test_exact_p_with_ties_by_enumerating_every_labelling():
    pos, neg = [1.0, 2.0, 2.0, 3.0], [0.0, 1.0, 2.0, 2.0, 0.0]
    r = rank_sum_test(pos, neg)
    s = stats.mannwhitneyu(pos, neg)  # U with ties as ½ (asymptotic p: not compared)
    assert r["auc"] == pytest.approx(s.statistic / 20)
    allv, n1 = pos + neg, len(pos)

    def u(idx):
        p = [allv[i] for i in idx]
        q = [allv[i] for i in range(len(allv)) if i not in idx]
        return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in p for b in q)

    us = [u(c) for c in itertools.combinations(range(len(allv)), n1)]
    centre = n1 * (len(allv) - n1) / 2
    obs = abs(r["u"] - centre)
    want = sum(1 for v in us if abs(v - centre) >= obs - 1e-12) / len(us)
    assert r["p"] == pytest.approx(want, rel=1e-12)
    assert rank_sum_test([], [1.0])["auc"] is None


def _entries(flags, areas, threat="benign"):
    """Resurgence entries of rows a and b, models 0..n-1, plus the original."""
    out = [{"row": "original", "metric": "concept_rate", "threat": threat, "threshold": 0.4,
            "models": {None: {"resurged": True, "area": 0.9}}}]  # fmt: skip
    for row in ("a", "b"):
        out.append({"row": row, "metric": "concept_rate", "threat": threat, "threshold": 0.4,
                    "models": {m: {"resurged": f, "area": areas[row][m]}
                               for m, f in enumerate(flags[row])}})  # fmt: skip
    return out


def test_predictor_table_groups_pooled_and_controls():
    flags = {"a": [True, False, True, False, False], "b": [False, False, True, True, False]}
    areas = {r: [0.8 if f else 0.1 + 0.01 * i for i, f in enumerate(fs)] for r, fs in flags.items()}
    vals = {("a", m): float(m) for m in range(5)} | {("b", m): 10.0 - m for m in range(5)}
    vals[("original", None)] = 42.0
    other = Predictor("x after", {("a", 0): 1.0}, threat="poison")
    table = predictor_table(_entries(flags, areas), [Predictor("v", vals), other])
    by = {(e["group"], e["predictor"]): e for e in table.entries}
    assert set(by) == {("a", "v"), ("b", "v"), (POOLED, "v")}  # 'x after' is another threat's
    pooled = by[(POOLED, "v")]
    pos = [vals[(r, m)] for r in "ab" for m in range(5) if flags[r][m]]
    neg = [vals[(r, m)] for r in "ab" for m in range(5) if not flags[r][m]]
    assert (pooled["n"], pooled["n_resurged"]) == (10, 4)
    assert pooled["auc"] == pytest.approx(stats.mannwhitneyu(pos, neg).statistic / 24)
    x = [vals[(r, m)] for r in "ab" for m in range(5)]
    f = [float(flags[r][m]) for r in "ab" for m in range(5)]
    assert pooled["r_pb"] == pytest.approx(stats.pointbiserialr(f, x)[0])
    a = [areas[r][m] for r in "ab" for m in range(5)]
    assert pooled["rho"] == pytest.approx(stats.spearmanr(x, a)[0])
    assert pooled["controls"] == {"original": 42.0}
    assert by[("a", "v")]["auc"] == pytest.approx(
        stats.mannwhitneyu([0, 2], [1, 3, 4]).statistic / 6
    )
    s = {x["group"]: x for x in table.summaries}
    assert s[POOLED]["best"] == "v" and s[POOLED]["tested"] == 1


def test_predictors_from_probes_average_attack_seeds_and_take_differences():
    def pr(row, u, threat=None, seed=None, step=None, **v):
        return ProbeResult(row, u, threat, seed, step, v, None)

    probes = [
        pr("a", 0, harmful_loss=1.0, lambda_max=5.0),
        pr("a", 0, "benign", 1, 100, harmful_loss=0.5),
        pr("a", 0, "benign", 2, 100, harmful_loss=0.7),
        pr("original", None, harmful_loss=0.2),
    ]
    preds = {p.name: p for p in predictors_from_probes(probes)}
    assert preds["harmful_loss"].values == {("a", 0): 1.0, ("original", None): 0.2}
    assert preds["harmful_loss"].threat is None
    at = preds["harmful_loss at step 100"]
    assert at.threat == "benign" and at.values[("a", 0)] == pytest.approx(0.6)
    assert preds["Δharmful_loss to step 100"].values[("a", 0)] == pytest.approx(-0.4)


def _store(root, flags, value):
    """Evaluate nodes (original pre 0.8; rows a, b with models 0..n-1 reaching 0.6 when they
    resurge, 0.0 else) and probe nodes (pre: ``value(row, m)``) in a store under ``root``."""
    graph = Graph("pred", "h")
    counter = itertools.count()

    def node(kind, name, row, useed, out, threat=None, seed=None, step=None):
        key = f"k{next(counter):03d}"
        graph.nodes[name] = Node(
            kind, name, {}, {}, key, row, threat, seed, step, unlearn_seed=useed
        )
        folder = root / kind / key
        folder.mkdir(parents=True)
        for fname, data in out.items():
            (folder / fname).write_text(json.dumps(data))
        (folder / "DONE").write_text("")

    def ev(v):
        return {"metrics.json": {"concept_rate": {"value": v, "definition": "concept_rate",
                "version": "1", "params": {}, "role": "safety", "better": "lower", "n": 100}}}  # fmt: skip

    # pre-FT evaluations sit at step 0, as graph/compile.py places them
    node("evaluate", "evaluate/original/pre/step0", "original", None, ev(0.8), step=0)
    node(
        "evaluate",
        "evaluate/original/benign/seed1/step2",
        "original",
        None,
        ev(0.9),
        "benign",
        1,
        2,
    )
    node("probe", "probe/original/pre", "original", None, {"probe.json": {"values": {"q": -1.0}}})
    for row, fs in flags.items():
        for m, f in enumerate(fs):
            node("evaluate", f"evaluate/{row}/seed{m}/pre/step0", row, m, ev(0.0), step=0)
            node("evaluate", f"evaluate/{row}/seed{m}/benign/seed1/step2", row, m,
                 ev(0.6 if f else 0.0), "benign", 1, 2)  # fmt: skip
            node("probe", f"probe/{row}/seed{m}/pre", row, m,
                 {"probe.json": {"values": {"q": value(row, m)}, "info": {}}})  # fmt: skip
    return graph


def test_report_has_the_predictor_section(tmp_path):
    flags = {"plain": [True, False, True, False, True, False],
             "resalign": [False, False, True, False, False, True]}  # fmt: skip
    graph = _store(tmp_path / "runs", flags, lambda r, m: 10.0 * flags[r][m] + m)
    results = results_from_store(graph, tmp_path / "runs")
    probes = probe_results_from_store(graph, tmp_path / "runs")
    threats = {"benign": {"seeds": [1], "eval_at": [2], "steps": 2}}
    table = write_report(
        results, tmp_path / "out", rows=["original", "plain", "resalign"], threats=threats,
        predictors=predictors_from_probes(probes),
    )  # fmt: skip
    pooled = next(e for e in table["predictors"]["entries"] if e["group"] == POOLED)
    assert (pooled["n"], pooled["n_resurged"], pooled["auc"]) == (12, 5, 1.0)
    assert pooled["p"] == pytest.approx(2 / math.comb(12, 5))  # the one labelling, both tails
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## What predicts resurgence" in md
    assert "| benign | pooled | q | 12 (5) | 1.00 (0.003) | +0.95 (3.1e-06) |" in md
    assert "original -1.000" in md
    assert "the strongest separation is q (AUC 1.00" in md
    assert (tmp_path / "out" / "predictors.png").stat().st_size > 1000
    assert "What predicts resurgence" in (tmp_path / "out" / "report.html").read_text()
    saved = json.loads((tmp_path / "out" / "table.json").read_text())
    assert saved["predictors"]["summaries"][-1]["group"] == POOLED
    # a missing probe result is named
    (tmp_path / "runs" / "probe" / graph["probe/plain/seed0/pre"].key / "DONE").unlink()
    with pytest.raises(Exception, match="1 of 13 probe results are missing"):
        probe_results_from_store(graph, tmp_path / "runs")


PROBES = "probes={data: held_out, along_attack: [harmful_loss]}"


@pytest.mark.parametrize("spec", [DEMO, BENIGN])
def test_probes_add_nodes_and_change_no_existing_key(spec):
    # digits_benign ships with probes: compare against it without them
    before = {n.name: n.key for n in compile_spec(load_spec(spec, sets=["probes=null"]))}
    graph = compile_spec(load_spec(spec, sets=[PROBES]))
    after = {n.name: n.key for n in graph}
    assert {n for n in before if before[n] != after[n]} == {"report"}
    new = set(after) - set(before)
    assert new == {n.name for n in graph.of_kind("probe")}
    pre = [n for n in graph.of_kind("probe") if n.name.endswith("/pre")]
    rows = compile_spec(load_spec(spec, sets=["probes=null"])).of_kind("unlearn")
    assert len(pre) == 1 + len(rows)  # the original and every (row, unlearning seed)
    # one per fine-tuning segment; a perturbation has no fine-tune to probe along
    trained = [n for n in graph.of_kind("attack") if n.params["threat"]["algorithm"] != "perturb"]
    assert len(graph.of_kind("probe")) - len(pre) == len(trained)
    assert set(graph["report"].deps) >= new
    p = graph["probe/plain/seed0/pre"]
    assert p.deps == {"model": "model", "unlearn": "unlearn/plain/seed0"}
    assert p.params["datasets"] == {"held_out": graph["evaluate/plain/seed0/pre/step0"].params[
        "datasets"].get("held_out", p.params["datasets"]["held_out"])}  # fmt: skip


def test_a_probe_key_holds_exactly_what_it_reads():
    def key(sets):
        return compile_spec(load_spec(DEMO, sets=sets))["probe/plain/seed0/pre"]

    only_wd = key(["probes={data: held_out, quantities: [weight_distance]}"])
    assert set(only_wd.params) == {"quantities"}
    assert (
        key(["probes={data: harmful, quantities: [weight_distance], seed: 3}"]).key == only_wd.key
    )
    loss = key(["probes={data: held_out, quantities: [harmful_loss]}"])
    assert set(loss.params) == {"quantities", "data", "datasets", "batch_size", "seed"}
    assert (
        key(["probes={data: held_out, quantities: [harmful_loss], power_iterations: 3}"]).key
        == loss.key
    )
    assert key(["probes={data: held_out, quantities: [harmful_loss], seed: 1}"]).key != loss.key
    # order written is not a key
    ab = key(["probes={data: held_out, quantities: [lambda_max, harmful_loss]}"])
    assert ab.key == key(["probes={data: held_out, quantities: [harmful_loss, lambda_max]}"]).key


def test_embedding_attacks_get_no_segment_probes():
    emb = (
        "threats={ti: {algorithm: embedding, data: held_out, steps: 4, eval_at: [4], "
        "embedding: {token: '<z>', replaces: zero}, seeds: [1]}}"
    )
    graph = compile_spec(load_spec(DEMO, sets=[emb, PROBES]))
    assert graph.of_kind("attack") and all(n.name.endswith("/pre") for n in graph.of_kind("probe"))


@pytest.mark.parametrize(
    "value,message",
    [
        ("{data: nope}", "probes.data: unknown dataset 'nope'"),
        ("{data: held_out, quantities: [sharp]}", "sharp"),
        ("{data: held_out, quantities: []}", "quantities"),
        ("{quantities: [harmful_loss]}", "data"),
    ],
)
def test_bad_probes_blocks_are_clear_errors(value, message):
    with pytest.raises(SpecError, match=message):
        load_spec(DEMO, sets=[f"probes={value}"])
