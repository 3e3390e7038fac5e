"""templates/benign_search_digits.yaml.j2 (issue 20.1): a searched *benign* threat against the
original, plain, ESD and gradient ascent on the digits demo, pruned; the shipped search space
and budget as the issue asks, and the template itself run at toy size (the same cells and
search with the model, data, budget and ranges shrunk by --set)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "templates" / "benign_search_digits.yaml.j2"


def test_benign_search_template_searches_a_benign_threat_on_four_rows():
    from resalign.engine.grid import prepare
    from resalign.graph.compile import compile_spec, search_plans, trial_graph
    from resalign.spec import load_spec

    _, prepared = prepare(TEMPLATE, check_files=True)
    demo = load_spec(ROOT / "specs" / "digits_demo.yaml")
    demo_graph = compile_spec(demo)
    _, base = prepare(ROOT / "templates" / "baselines_digits.yaml.j2")
    baselines = {rc.cell.axes["method"]: g for rc, g in base}
    rows, originals = set(), set()
    concept = demo.spec.concepts["digit"].label
    for rc, graph in prepared:
        method = rc.cell.axes["method"]
        assert list(rc.spec.rows) == ["original", method]
        rows.update(rc.spec.rows)
        assert rc.spec.rows[method].method == method
        # the unlearned models are those of the baselines grid (the demo's plain row)
        (un,) = graph.of_kind("unlearn")
        assert un.key == baselines[method].of_kind("unlearn")[0].key
        if method == "plain":
            assert un.key == demo_graph["unlearn/plain/seed0"].key
        (threat,) = rc.spec.spec.threats.values()
        s = threat.search
        # benign: the demo's benign set, no poison, no concept image in what the attack reads
        assert threat.data == "benign" and threat.poison is None and threat.stages is None
        plans = search_plans(rc.spec)
        assert [p.row for p in plans] == ["original", method]
        originals.add(plans[0].key)
        t = threat.trial({"lr": 1e-3, "steps": 500, "optimizer": "adam", "algorithm": "lora",
                          "batch_size": 16})  # fmt: skip
        tg = trial_graph(rc.spec, graph, [(plans[1], 0, t)])
        for n in tg.of_kind("attack"):
            for d in n.params["datasets"].values():
                assert d["type"] == "digits" and concept not in d["digits"], d
        # the space: optimizer, lr over >= 3 decades, steps up to >= 500, full or LoRA, batch
        sp = s.space
        assert sp["optimizer"].choice == ["sgd", "adam", "adamw"]
        lo, hi = sp["lr"].log_uniform
        assert math.log10(hi / lo) >= 3
        assert sp["steps"].corners()[1] >= 500
        assert sp["algorithm"].choice == ["full", "lora"]
        assert len(sp["batch_size"].choice) >= 2
        assert s.trials >= 30 and s.sampler == "tpe" and s.seed == 0
        assert s.constraint.metric == "retain_accuracy" and s.constraint.min == 0.7
        assert s.pruner is not None and s.report_at
    assert rows == {"original", "plain", "esd", "gradient_ascent"}
    assert len(originals) == 1  # the original row's study is one study in every cell


# The template at toy size: the demo's model, data, unlearning, generation and the search's
# budget and ranges shrunk; everything else (rows, threat, space's shape, pruner) as shipped.
TOY = [
    "model.tiny.pretrain.steps=2",
    "model.tiny.block_out_channels=[8,16]",
    "model.tiny.cross_attention_dim=8",
    "model.tiny.text_hidden_size=8",
    "model.tiny.text_layers=1",
    *[
        f"datasets.{d}.limit=8"
        for d in ("digits_train", "harmful", "held_out", "retain", "meta", "benign")
    ],  # fmt: skip
    "unlearn.steps=1",
    "evaluate.generation.steps=2",
    "evaluate.generation.images_per_prompt=1",
    "evaluate.generation.batch_size=20",
    "threats.benign_search.grad_accumulation=1",
    "threats.benign_search.search.trials=3",
    "threats.benign_search.search.space.steps={integer: [2, 4], step: 2}",
    "threats.benign_search.search.space.batch_size={choice: [2, 4]}",
    "threats.benign_search.search.pruner.startup_trials=1",
]


@pytest.mark.slow
def test_benign_search_template_runs_at_toy_size(tmp_path, monkeypatch):
    from resalign.engine.grid import run_grid
    from resalign.engine.options import RunOptions

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "runs"
    toy = RunOptions(store=store, tracking=False, sets=TOY)
    run_grid(TEMPLATE, toy, cells=["method=gradient_ascent"])
    studies = [json.loads(p.read_text()) for p in (store / "search").glob("*.json")]
    assert sorted(s["row"] for s in studies) == ["gradient_ascent", "original"]
    for s in studies:
        assert s["done"] == 3 and s["pruner"]["kind"] == "median"
        assert s["report_at"] == [0.2, 0.5]
        for t in s["trials"]:
            steps = t["params"]["steps"]
            assert t["params"]["optimizer"] in ("sgd", "adam", "adamw")
            # evaluated at its rungs: 20 % and 50 % of 2 steps -> step 1; of 4 -> 1 and 2
            want = [1] if steps == 2 else [1, 2]
            got = [r["step"] for r in t["rungs"]]
            if t["pruned_at"] is None:
                assert got == want and t["objective"] is not None
            else:  # stopped at a rung: no evaluation after it
                assert got == want[: want.index(t["pruned_at"]) + 1]
