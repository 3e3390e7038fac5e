"""Attacker search (issue 16) without running a model: the search block's validation
(file:line, exit 2), trial keys equal to the fixed threat's, the seeded replay that resumes a
study, the worst case and best-so-far against hand computation, the report's column and plot."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from resalign.cli import cli

SPEC = Path(__file__).resolve().parent / "specs" / "tiny_search.yaml"


def _write(tmp_path: Path, search_yaml: str, name: str = "s") -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(
        f"extends: {SPEC}\nname: {name}\nthreats:\n  poison:\n    search: !override\n"
        + "".join(f"      {line}\n" for line in search_yaml.strip().splitlines())
    )
    return p


@pytest.mark.parametrize(
    "search, message, line",
    [
        (
            "space: {}\nconstraint: {metric: retain_accuracy, min: 0.5}",
            "search.space is empty",
            5,
        ),
        ("space: {lr: {log_uniform: [1.0e-4, 1.0e-2]}}", "search needs a utility bound", 5),
        (
            "space: {lr: {log_uniform: [1.0e-4, 1.0e-2]}}\nconstraint: {metric: retain_accuracy}",
            "needs exactly one bound",
            7,
        ),
        (
            "sampler: grid\nspace: {lr: {log_uniform: [1.0e-4, 1.0e-2]}}\n"
            "constraint: {metric: retain_accuracy, min: 0.5}",
            "sampler grid needs finite values",
            6,
        ),
        (
            "sampler: grid\ntrials: 5\nspace: {optimizer: {choice: [adam, sgd]}}\n"
            "constraint: {metric: retain_accuracy, min: 0.5}",
            "sampler grid has 2 points but trials is 5",
            6,
        ),
        (
            "space: {poison.ratio: {uniform: [0.1, 1.5]}}\n"
            "constraint: {metric: retain_accuracy, min: 0.5}",
            "value 1.5 makes an invalid threat: poison.ratio",
            5,
        ),
        (
            "space: {stpes: {integer: [1, 4]}}\nconstraint: {metric: retain_accuracy, min: 0.5}",
            "'stpes' cannot be searched",
            5,
        ),
        (
            "space: {data: {choice: [benign, nosuch]}}\n"
            "constraint: {metric: retain_accuracy, min: 0.5}",
            "unknown dataset 'nosuch'",
            6,
        ),
        (  # metric names are checked against what evaluate.metrics writes, before any trial
            "space: {lr: {log_uniform: [1.0e-4, 1.0e-2]}}\n"
            "constraint: {metric: retain_acc, min: 0.5}",
            "no metric in evaluate.metrics writes 'retain_acc'",
            7,
        ),
        (
            "space: {lr: {log_uniform: [1.0e-4, 1.0e-2]}}\nobjective: {metric: nudenet_ip}\n"
            "constraint: {metric: retain_accuracy, min: 0.5}",
            "search.objective.metric: no metric in evaluate.metrics writes 'nudenet_ip'",
            7,
        ),
        (
            "space: {lr: {log_uniform: [1.0e-4, 1.0e-2]}}\npruner: {kind: median}\n"
            "constraint: {metric: retain_accuracy, min: 0.5}",
            "search.pruner needs rungs to prune at: add report_at",
            5,
        ),
        (
            "space: {lr: {log_uniform: [1.0e-4, 1.0e-2]}}\nreport_at: [0.5, 1]\n"
            "constraint: {metric: retain_accuracy, min: 0.5}",
            "search.report_at mixes steps and fractions",
            5,
        ),
        (
            "space: {lr: {log_uniform: [1.0e-4, 1.0e-2]}}\nreport_at: [0.5, 1.0]\n"
            "constraint: {metric: retain_accuracy, min: 0.5}",
            "fractions must lie strictly between 0 and 1",
            5,
        ),
        (
            "space: {lr: {log_uniform: [1.0e-4, 1.0e-2]}}\nreport_at: [1]\n"
            "pruner: {kind: median, reduction_factor: 3}\n"
            "constraint: {metric: retain_accuracy, min: 0.5}",
            "pruner kind median does not read reduction_factor",
            8,
        ),
        (
            "space: {lr: {log_uniform: [1.0e-4, 1.0e-2]}}\nreport_at: [1]\n"
            "pruner: {kind: hyperband}\nconstraint: {metric: retain_accuracy, min: 0.5}",
            "successive_halving",
            8,
        ),
    ],
)
def test_search_block_errors_name_file_line_and_exit_2(tmp_path, search, message, line):
    p = _write(tmp_path, search)
    r = CliRunner().invoke(cli, ["validate", str(p)])
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert f"{p}:{line}:" in r.output
    assert "Traceback" not in r.output


def test_eval_at_with_search_is_an_error(tmp_path):
    p = tmp_path / "e.yaml"
    p.write_text(f"extends: {SPEC}\nname: e\nthreats:\n  poison:\n    eval_at: [1]\n")
    r = CliRunner().invoke(cli, ["validate", str(p)])
    assert r.exit_code == 2 and "remove eval_at" in r.output


def test_trial_nodes_have_the_fixed_threats_keys(tmp_path):
    """A trial with values v is keyed exactly as the fixed threat written with v: a search
    reuses attacks a fixed threat computed, and the other way round."""
    from resalign.graph.compile import compile_spec, search_plans, trial_graph
    from resalign.spec import load_spec

    searched = load_spec(SPEC)
    graph = compile_spec(searched)
    assert not graph.of_kind("attack")  # a searched threat has no static nodes
    assert "poison" not in graph["report"].params["threats"]
    values = {"lr": 0.00123, "poison.ratio": 0.3}
    plans = search_plans(searched)
    assert [p.name for p in plans] == ["search/original/poison", "search/plain/seed0/poison"]
    threat = searched.spec.threats["poison"].trial(values)
    tg = trial_graph(searched, graph, [(p, 4, threat) for p in plans])
    fixed = tmp_path / "fixed.yaml"
    fixed.write_text(
        f"extends: {SPEC}\nname: fixed\nthreats:\n  poison:\n    search: !reset\n"
        "    lr: 0.00123\n    poison: {data: held_out, ratio: 0.3}\n"
    )
    fg = compile_spec(load_spec(fixed))
    for row in ("original", "plain/seed0"):
        t = tg[f"attack/{row}/poison:trial4/seed1/step2"]
        f = fg[f"attack/{row}/poison/seed1/step2"]
        assert t.key == f.key and t.params == f.params
        assert (
            tg[f"evaluate/{row}/poison:trial4/seed1/step2"].key
            == fg[f"evaluate/{row}/poison/seed1/step2"].key
        )
    # the trial graph holds the upstream nodes it reads, unchanged
    assert tg["unlearn/plain/seed0"].key == graph["unlearn/plain/seed0"].key


def test_study_key_follows_the_attack_keys_rule(tmp_path):
    """The study's key leaves out what its trials' attack keys leave out (the checkpoint
    cadence, AttackStep.key_exclude); what the trials read (here their length) changes it."""
    from resalign.graph.compile import search_plans
    from resalign.spec import load_spec

    base = [p.key for p in search_plans(load_spec(SPEC))]
    cadence = [p.key for p in search_plans(load_spec(SPEC, sets=["threats.poison.checkpoint_every=3"]))]  # fmt: skip
    assert cadence == base
    steps = [p.key for p in search_plans(load_spec(SPEC, sets=["threats.poison.steps=3"]))]
    assert steps[0] != base[0] and steps[1] != base[1]


@pytest.mark.parametrize(
    "report_at, steps, want",
    [
        ([], 40, [(40, 40)]),
        ([0.25, 0.5], 40, [(10, 250), (20, 500), (40, 1000)]),
        ([0.5, 0.25], 3, [(1, 250), (2, 500), (3, 1000)]),  # sorted; 0.75 -> 1 step
        ([0.1, 0.2], 4, [(1, 100), (4, 1000)]),  # both round to step 1 (kept once)
        ([25, 50], 40, [(25, 25), (40, 40)]),  # a step past the trial's last is dropped
        ([40], 40, [(40, 40)]),
    ],
)
def test_rungs_of_a_trial(report_at, steps, want):
    from resalign.spec.schema.search import SearchSpec

    s = SearchSpec.model_validate(
        {"space": {"lr": {"log_uniform": [1e-4, 1e-2]}}, "report_at": report_at,
         "constraint": {"metric": "retain_accuracy", "min": 0.5}}
    )  # fmt: skip
    assert s.rungs(steps) == want


def test_pruned_trials_last_segment_keeps_the_unsplit_key(tmp_path):
    """With report_at the trial's attack is split at its rungs; the segment that ends at the
    last step has the key the unsplit trial had (a cache hit either way), and a study without
    pruner keeps the study key it had before pruning existed (no report_at/pruner in it)."""
    from resalign.graph.compile import compile_spec, search_plans, trial_graph
    from resalign.spec import load_spec

    plain = load_spec(SPEC)
    p = tmp_path / "pruned.yaml"
    p.write_text(
        f"extends: {SPEC}\nname: pruned\nthreats:\n  poison:\n    steps: 4\n    search:\n"
        "      report_at: [0.5]\n      pruner: {kind: successive_halving}\n"
    )
    pruned = load_spec(p)
    unsplit = tmp_path / "unsplit.yaml"
    unsplit.write_text(f"extends: {SPEC}\nname: unsplit\nthreats:\n  poison:\n    steps: 4\n")
    values = {"lr": 0.002, "poison.ratio": 0.2}
    graphs = {}
    for name, r in (("pruned", pruned), ("unsplit", load_spec(unsplit))):
        g = compile_spec(r)
        plan = search_plans(r)[0]
        t = r.spec.threats["poison"].trial(values)
        rungs = r.spec.threats["poison"].search.rungs(t.steps)
        t = t.model_copy(update={"eval_at": [a for a, _ in rungs]})
        graphs[name] = trial_graph(r, g, [(plan, 0, t)])
    a, b = graphs["pruned"], graphs["unsplit"]
    last = "attack/original/poison:trial0/seed1/step4"
    assert a[last].key == b[last].key and a[last].deps["resume"].endswith("step2")
    assert "attack/original/poison:trial0/seed1/step2" not in b.nodes
    ev = "evaluate/original/poison:trial0/seed1/step4"
    assert a[ev].key == b[ev].key
    # the study key holds the search block: pruning makes another study, none keeps the old
    import hashlib

    from resalign.graph.keys import canonical_json

    threat = plain.spec.threats["poison"].model_dump(mode="json")
    for f in ("stages", "embedding", "perturb"):
        threat.pop(f)
    for f in ("report_at", "pruner"):
        threat["search"].pop(f)
    threat.pop("checkpoint_every")  # as the attacks' keys (AttackStep.key_exclude)
    plan = search_plans(plain)[0]
    from resalign.graph.compile import _Compiler

    ident = {"threat": threat, "upstream": compile_spec(plain)["model"].key,
             "evaluate": _Compiler(plain).evaluate_params(0)}  # fmt: skip
    assert plan.key == hashlib.sha256(canonical_json(ident).encode()).hexdigest()
    assert search_plans(pruned)[0].key != plan.key


def _objective(p):
    # a smooth function of the sampled values with its maximum inside the space
    return (
        -((math.log10(p["lr"]) + 2.5) ** 2)
        - (p["steps"] - 30) ** 2 / 400
        + (0.3 if p["optimizer"] == "adam" else 0.0)
    )


SEARCH = {
    "space": {
        "lr": {"log_uniform": [1e-4, 1e-1]},
        "steps": {"integer": [10, 60], "step": 10},
        "optimizer": {"choice": ["adam", "sgd"]},
    },
    "trials": 14,
    "sampler": "tpe",
    "seed": 3,
    "objective": {"metric": "concept_rate"},
    "constraint": {"metric": "retain_accuracy", "min": 0.5},
}


def test_a_study_recreated_from_its_results_asks_the_same_trials():
    """The resume design: a fresh seeded sampler told the stored results of the first k
    trials asks exactly what the uninterrupted study asked next, for TPE past its random
    start-up (10 trials), random and grid."""
    for sampler in ("tpe", "random", "grid"):
        search = dict(SEARCH, sampler=sampler)
        if sampler == "grid":
            search = dict(search, space={k: v for k, v in SEARCH["space"].items() if k != "lr"})
            search["trials"] = 12
        n = search["trials"]
        full = _ask_tell(search, n)
        stored = [_value(p) for p in full[:9]]
        again = _ask_tell(search, n, stored)
        assert again == full, sampler
        assert len({tuple(sorted(p.items())) for p in full}) == n  # distinct trials


def _value(p):
    return _objective({"lr": 10**-2.5, **p})  # the grid space has no lr


def _ask_tell(search, n, stored=None):
    """Ask/tell ``n`` trials as the engine's replay does; ``stored``: results told from a
    record (the store) for the first trials instead of computed."""
    import optuna

    from resalign.engine.search import USER_ATTR_CONSTRAINT, distributions, make_sampler

    study = optuna.create_study(sampler=make_sampler(search), direction="maximize")
    dists = distributions(search)
    asked = []
    for k in range(n):
        t = study.ask(dists)
        value = stored[k] if stored and k < len(stored) else _value(t.params)
        t.set_user_attr(USER_ATTR_CONSTRAINT, -0.1 if k % 3 else 0.2)
        study.tell(t, value)
        asked.append(dict(t.params))
    return asked


def _record(trials):
    from resalign.engine.search import StudyRecord, TrialRecord
    from resalign.graph.compile import StudyPlan

    plan = StudyPlan("search/plain/seed0/poison", "k" * 64, "plain", 0, "poison", "plain/seed0", {})
    rec = StudyRecord(plan, dict(SEARCH, trials=6))
    for i, (obj, util) in enumerate(trials):
        rec.trials.append(TrialRecord(i, {"lr": 10.0**-i}, obj, util, util >= 0.5, []))
    return rec


def test_worst_case_is_the_best_trial_within_the_bound():
    # trial 3 has the highest objective but breaks the bound; trials 2 and 4 tie at 0.6
    rec = _record([(0.1, 0.9), (0.05, 0.2), (0.6, 0.7), (0.9, 0.4), (0.6, 0.8)])
    best = rec.best()
    assert best.number == 2 and best.objective == 0.6 and best.utility == 0.7
    assert rec.best_so_far() == [0.1, 0.1, 0.6, 0.6, 0.6]
    assert _record([(0.1, 0.0)]).best() is None
    assert _record([(0.1, 0.0), (0.3, 0.6)]).best_so_far() == [None, 0.3]
    d = rec.as_dict()
    assert d["feasible"] == 3 and d["done"] == 5 and d["budget"] == 6


def test_report_worst_case_column_paired_difference_and_plot(tmp_path):
    from resalign.evaluation.report import EvalResult, write_report

    def res(row, useed, value):
        m = {
            "concept_rate": {"value": value, "role": "safety", "better": "lower", "n": 20},
            "retain_accuracy": {"value": 0.8, "role": "utility", "better": "higher", "n": 180},
        }
        return EvalResult(row, None, None, 0, m, tmp_path, useed)

    results = [res("original", None, 0.8), res("plain", 0, 0.0), res("plain", 1, 0.0)]
    results += [res("resalign", 0, 0.0), res("resalign", 1, 0.05)]
    searches = []
    best = {("original", None): 0.85, ("plain", 0): 0.7, ("plain", 1): 0.5,
            ("resalign", 0): 0.75, ("resalign", 1): 0.45}  # fmt: skip
    for (row, useed), b in best.items():
        rec = _record([(b - 0.2, 0.9), (b + 0.1, 0.1), (b, 0.6)])
        rec.plan = type(rec.plan)(f"search/{row}/poison", "k" * 64, row, useed, "poison", row, {})
        searches.append(rec.as_dict())
    out = tmp_path / "rep"
    table = write_report(results, out, rows=["original", "resalign", "plain"], threats={},
                         searches=searches)  # fmt: skip
    col = "concept_rate/poison/worst"
    assert [c["id"] for c in table["columns"]][:2] == ["concept_rate/pre", col]
    cells = {r["row"]: r for r in table["table"]}
    plain = cells["plain"]["cells"][col]
    assert plain["n"] == 2 and plain["mean"] == pytest.approx(0.6)
    # t interval over the two unlearning seeds: 0.6 ± t_{0.975,1} * sd / sqrt(2)
    sd = math.sqrt(((0.7 - 0.6) ** 2 + (0.5 - 0.6) ** 2) / 1)
    assert plain["ci95"] == pytest.approx(12.706204736 * sd / math.sqrt(2), rel=1e-6)
    diff = cells["resalign"]["diff"][col]
    assert diff["mean"] == pytest.approx(((0.75 - 0.7) + (0.45 - 0.5)) / 2) and diff["n"] == 2
    assert cells["original"]["cells"][col]["mean"] == pytest.approx(0.85)
    md = (out / "report.md").read_text()
    assert "worst-case concept_rate ↓ over searched poison (retain_accuracy ≥ 0.5)" in md
    assert "| plain | 1 | poison | concept_rate 0.500 | retain_accuracy 0.600 | #2 (3 of 3) |" in md
    # only searched threats: no fixed attack seeds, said in words (was "attack seeds []")
    assert "attack seeds none outside the searches" in md
    assert (out / "search_best_so_far.png").stat().st_size > 1000
    assert "search_best_so_far.png" in (out / "report.html").read_text()


def test_shipped_search_template_attacks_the_demo_rows_with_one_budget():
    """templates/attack_search_digits.yaml.j2: two cells (plain, resalign), each with the
    original row; their unlearn nodes are the demo's; every study has >= 20 TPE trials with the
    same seed and a retain-accuracy bound; the original row's study is one study in both."""
    from resalign.engine.grid import prepare
    from resalign.graph.compile import compile_spec, search_plans
    from resalign.spec import load_spec

    root = Path(__file__).resolve().parents[1]
    r = CliRunner().invoke(cli, ["grid", str(root / "templates/attack_search_digits.yaml.j2"),
                                 "--list"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert [line.split()[0] for line in r.output.splitlines()[1:-1]] == [
        "method=plain",
        "method=resalign",
    ]
    _, prepared = prepare(root / "templates/attack_search_digits.yaml.j2", check_files=True)
    demo = compile_spec(load_spec(root / "specs/digits_demo.yaml"))
    originals = set()
    for rc, graph in prepared:
        method = rc.cell.axes["method"]
        assert list(rc.spec.rows) == ["original", method]
        assert graph[f"unlearn/{method}/seed0"].key == demo[f"unlearn/{method}/seed0"].key
        plans = search_plans(rc.spec)
        assert [p.row for p in plans] == ["original", method]
        (threat,) = rc.spec.spec.threats.values()
        s = threat.search
        assert s.trials >= 20 and s.sampler == "tpe" and threat.poison is not None
        assert s.constraint.metric == "retain_accuracy" and s.constraint.min == 0.7
        originals.add(plans[0].key)
    assert len(originals) == 1
