"""The oracle control (issue 16, item 3): the same attacks on a model that never learned the
concept, so recovery after an attack is told apart from learning the concept anew.

- compile: ``controls.oracle`` adds a second model node ``model/oracle`` (the model's params
  plus the excluded labels: its own key, every other key unchanged) and a row ``oracle``
  after ``original`` whose evaluations and attack segments start from it;
- data: the oracle's pretraining data holds no item of the concept's label, and everything
  else of the original's;
- validation: a spec that cannot build an oracle is refused with file:line and what to do;
- report: the oracle row has the columns of every row, no paired difference to ``plain``
  (it is not a method), and one sentence reads it against the other rows;
- end to end through ``resalign run`` on the real tiny spec: the oracle model is pretrained
  without digit 0, attacked, evaluated and reported.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from resalign.cli import cli
from resalign.errors import UserError
from resalign.graph.compile import compile_spec
from resalign.spec import load_spec

TINY = Path(__file__).resolve().parent / "specs" / "tiny.yaml"
ROOT = Path(__file__).resolve().parents[1]


def tiny(tmp_path: Path, **changes: object) -> Path:
    """The tiny spec with the oracle on (and ``changes`` written over the top level)."""
    d = yaml.safe_load(TINY.read_text(encoding="utf-8"))
    d["controls"] = {"oracle": True}
    d["tracking"]["system_metrics"] = False
    d.update(changes)
    p = tmp_path / "oracle.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False), encoding="utf-8")
    return p


# ----------------------------------------------------------------------------- compile


def test_oracle_nodes_keys_and_deps(tmp_path):
    g = compile_spec(load_spec(tiny(tmp_path)))
    plain = compile_spec(load_spec(TINY))
    model, oracle = g["model"], g["model/oracle"]
    assert oracle.kind == "model" and not oracle.deps
    assert oracle.params == {**model.params, "exclude_labels": [0]}
    assert oracle.key != model.key
    # every node of the spec without the control is there with its key: the control only adds
    for n in plain:
        if n.kind != "report":
            assert g[n.name].key == n.key, n.name
    assert g["report"].params["rows"] == ["original", "oracle", "resalign", "plain"]

    # the oracle row: original's nodes, on the oracle model
    own = sorted(n.name for n in g if n.row == "oracle")
    assert own == sorted(n.name.replace("/original/", "/oracle/") for n in g if n.row == "original")
    assert own == [
        "attack/oracle/benign/seed1/step2",
        "evaluate/oracle/benign/seed1/step2",
        "evaluate/oracle/pre/step0",
    ]
    assert g["evaluate/oracle/pre/step0"].deps == {"model": "model/oracle"}
    at = g["attack/oracle/benign/seed1/step2"]
    assert at.deps == {"model": "model/oracle"} and at.unlearn_seed is None
    assert at.params == g["attack/original/benign/seed1/step2"].params  # the same attack
    assert at.key != g["attack/original/benign/seed1/step2"].key  # on another model
    ev = g["evaluate/oracle/benign/seed1/step2"]
    assert ev.deps == {"model": "model/oracle", "attack": at.name}
    assert set(own) - {at.name} <= set(g["report"].deps)
    assert not any(n.kind == "unlearn" and n.row == "oracle" for n in g)
    # the topological order: the oracle model before anything that reads it
    names = list(g.nodes)
    assert names.index("model/oracle") < min(names.index(n) for n in own)


def test_oracle_segments_follow_the_threat(tmp_path):
    """Every attack seed and evaluation step of every threat: one segment each, chained by
    ``resume`` as the original's."""
    p = tiny(tmp_path)
    g = compile_spec(
        load_spec(p, sets=["threats.benign.eval_at=[1,2]", "threats.benign.seeds=[1,2]"])
    )
    for seed in (1, 2):
        first, second = (g[f"attack/oracle/benign/seed{seed}/step{s}"] for s in (1, 2))
        assert "resume" not in first.deps
        assert second.deps["resume"] == first.name and second.deps["model"] == "model/oracle"


def test_oracle_model_key_follows_the_concept_label(tmp_path):
    p = tiny(tmp_path)
    g0 = compile_spec(load_spec(p))
    g3 = compile_spec(load_spec(p, sets=["concepts.digit.label=3"]))
    assert g3["model/oracle"].params["exclude_labels"] == [3]
    assert g3["model/oracle"].key != g0["model/oracle"].key
    assert g3["model"].key == g0["model"].key


def test_demo_spec_with_the_oracle_on():
    """The demo's graph with the control: its model key unchanged, the oracle without
    ``vars.digit``, the oracle row attacked like original at every segment."""
    demo = compile_spec(load_spec(ROOT / "specs" / "digits_demo.yaml"))
    sets = ["controls.oracle=true", "vars.digit=3"]
    g = compile_spec(load_spec(ROOT / "specs" / "digits_demo.yaml", sets=sets))
    assert g["model"].key == demo["model"].key
    assert g["model/oracle"].params["exclude_labels"] == [3]
    orig = [n for n in g if n.row == "original" and n.kind == "attack"]
    assert len(orig) == 8  # the poisoned threat's 2 seeds x 3 segments, the benign one's 1 x 2
    assert len([n for n in g if n.row == "oracle" and n.kind == "attack"]) == len(orig)


# ----------------------------------------------------------------------------- data


def test_oracle_pretraining_data_lacks_the_concept():
    """What ModelStep pretrains the oracle on (``without_labels`` of the pretraining data):
    no item of the concept's label, every other item of the original's, in order."""
    from resalign.data.pairs import label_counts, load_pairs, without_labels

    r = load_spec(TINY)
    name = r.spec.model.tiny.pretrain.dataset
    pairs = load_pairs(name, r.spec, {}, 8, 1)
    counts = label_counts(pairs)
    assert counts["0"] > 0  # the original sees the concept
    oracle = without_labels(pairs, [0], name)
    got = label_counts(oracle)
    assert "0" not in got and sum(got.values()) == len(oracle) == len(pairs) - counts["0"]
    assert got == {k: v for k, v in counts.items() if k != "0"}
    assert all(c != "a handwritten digit zero" for c in oracle.captions)
    keep = [i for i, y in enumerate(pairs.labels) if y != 0]
    assert oracle.captions == [pairs.captions[i] for i in keep]
    assert (oracle.images == pairs.images[keep]).all()


def test_without_labels_refuses_what_is_no_oracle():
    import torch

    from resalign.data.pairs import without_labels
    from resalign.data.types import PairSet

    images = torch.zeros(3, 1, 8, 8)
    caps = ["a", "b", "c"]
    with pytest.raises(UserError, match="has no labels"):
        without_labels(PairSet(images, caps), [0], "folder")
    with pytest.raises(UserError, match="holds no item labelled"):
        without_labels(PairSet(images, caps, [1, 2, 3]), [0], "d")
    with pytest.raises(UserError, match="nothing is left"):
        without_labels(PairSet(images, caps, [0, 0, 0]), [0], "d")


# ----------------------------------------------------------------------------- validation

BAD = """\
name: t
model:
  family: tiny
  tiny: {pretrain: {dataset: train, steps: 2}}
datasets:
  train: {type: digits}
  harm: {type: digits, digits: [3]}
  folder: {type: imagefolder, path: imgs}
  keep: {type: digits, digits: [1]}
concepts:
  three: {harmful: [harm], retain: [keep], label: 3}
controls: {oracle: true}
"""


@pytest.mark.parametrize(
    "old, new, line, message",
    [
        (
            "  family: tiny\n  tiny: {pretrain: {dataset: train, steps: 2}}",
            "  family: sd\n  pretrained: org/model",
            12,
            "controls.oracle needs a model this spec pretrains",
        ),
        (
            "  tiny: {pretrain: {dataset: train, steps: 2}}",
            "  tiny: {sample_size: 8}",
            12,
            "model.tiny has no 'pretrain'",
        ),
        (", label: 3}", "}", 11, "has no 'label'"),
        ("dataset: train,", "dataset: folder,", 4, "carries no labels"),
        ("train: {type: digits}", "train: {type: digits, digits: [1, 2]}", 4, "holds no item"),
        ("controls:", "baselines: {oracle: {method: plain}}\ncontrols:", 12, "row name 'oracle'"),
    ],
)
def test_specs_that_cannot_build_an_oracle(tmp_path, old, new, line, message):
    assert old in BAD
    p = tmp_path / "bad.yaml"
    p.write_text(BAD.replace(old, new), encoding="utf-8")
    res = CliRunner().invoke(cli, ["validate", str(p)])
    assert res.exit_code == 2, res.output
    assert re.search(rf"bad\.yaml:{line}:\d+: .*{re.escape(message)}", res.output), res.output
    assert "remove controls.oracle" in res.output or "rename this row" in res.output


def test_the_unchanged_bad_spec_is_valid(tmp_path):
    p = tmp_path / "ok.yaml"
    p.write_text(BAD, encoding="utf-8")
    res = CliRunner().invoke(cli, ["validate", str(p)])
    assert res.exit_code == 0, res.output


# ----------------------------------------------------------------------------- report


def _result(row, threat, seed, step, rate, useed=None, folder=Path(".")):
    from resalign.evaluation.report import EvalResult

    metric = {"value": rate, "role": "safety", "better": "lower", "n": 300}
    return EvalResult(row, threat, seed, step, {"concept_rate": metric}, folder, useed)


def test_report_reads_the_oracle_and_never_pairs_it():
    """The oracle row gets every column and no Δ row; the sentence gives the oracle's value
    and each row's difference with its n, from the table's own cells."""
    from resalign.evaluation.report import build_table, markdown_table, notes, table_metrics

    seeds = (1, 2, 3)
    post = {"original": (0.90, 0.91, 0.92), "oracle": (0.20, 0.21, 0.22)}
    res = []
    for row, vals in post.items():
        res += [_result(row, None, None, 0, 0.8 if row == "original" else 0.0)]
        res += [_result(row, "ft", a, 10, v) for a, v in zip(seeds, vals)]
    for row, vals in {"resalign": (0.70, 0.71, 0.72), "plain": (0.10, 0.30, 0.50)}.items():
        res += [_result(row, None, None, 0, 0.0, useed=0)]
        res += [_result(row, "ft", a, 10, v, useed=0) for a, v in zip(seeds, vals)]
    rows = ["original", "oracle", "resalign", "plain"]
    table = build_table(res, rows, {"ft": {"eval_at": [10]}})
    by = {r["row"]: r for r in table["table"]}
    assert "reference" not in by["oracle"] and "reference" not in by["original"]
    assert by["resalign"]["reference"] == "plain"
    assert by["oracle"]["cells"].keys() == by["resalign"]["cells"].keys()
    assert by["oracle"]["cells"]["concept_rate/ft"]["mean"] == pytest.approx(0.21)
    md = markdown_table(table)
    assert "| oracle | 0.000 n=1 | 0.210 [" in md and "Δ oracle" not in md
    assert "relearn_area_diff.concept_rate.ft.oracle" not in table_metrics(table)

    sentence = [n for n in notes(table) if n.startswith("Oracle control")]
    assert len(sentence) == 1, notes(table)
    s = sentence[0]
    assert "after ft (step 10)" in s and "concept_rate 0.210 [" in s and "n=3" in s
    assert "original +0.700 (0.910 [" in s
    assert "resalign +0.500 (0.710 [" in s and "plain +0.090 (0.300 [" in s
    assert "original, resalign: interval above the oracle's" in s
    assert "plain: interval overlapping the oracle's" in s


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_run_pretrains_attacks_and_reports_the_oracle(tmp_path):
    p = tiny(tmp_path)
    store = tmp_path / "runs"
    res = CliRunner().invoke(cli, ["run", str(p), "--store", str(store), "--no-tracking"])
    assert res.exit_code == 0, res.output
    g = compile_spec(load_spec(p))

    def stats(name: str) -> dict:
        return json.loads((store / "model" / g[name].key / "stats.json").read_text())

    orig, oracle = stats("model"), stats("model/oracle")
    assert orig["pretrain_items_by_label"]["0"] > 0 and orig["excluded_labels"] == []
    assert "0" not in oracle["pretrain_items_by_label"] and oracle["excluded_labels"] == [0]
    assert oracle["pretrain_items"] == orig["pretrain_items"] - orig["pretrain_items_by_label"]["0"]
    assert oracle["pretrain_steps"] == orig["pretrain_steps"]
    # same architecture and tokenizer (the concept's word is a token of both), other weights
    a, b = (store / "model" / g[n].key / "pipeline" for n in ("model", "model/oracle"))
    for f in ("unet/config.json", "tokenizer/tokenizer.json", "text_encoder/config.json"):
        assert (a / f).read_text() == (b / f).read_text(), f
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (a / unet).read_bytes() != (b / unet).read_bytes()

    report = store / "report" / g["report"].key
    md = (report / "report.md").read_text(encoding="utf-8")
    body = md.split("| model |", 1)[1].split("\n\n", 1)[0]  # the results table
    lines = ["| model |" + body.splitlines()[0], *body.splitlines()[2:]]
    labels = [ln.split(" | ")[0][2:] for ln in lines[1:]]
    assert labels == ["original", "oracle", "resalign", "Δ resalign − plain (paired)", "plain"]
    assert len({ln.count(" | ") for ln in lines}) == 1  # the same columns on every line
    assert re.search(r"^Oracle control \(oracle: .*after benign \(step 2\)", md, re.M), md
    table = json.loads((report / "table.json").read_text())
    row = next(r for r in table["table"] if r["row"] == "oracle")
    assert "reference" not in row and row["cells"]["concept_rate/benign"]["n"] == 1

    # cached like any node: a second run runs nothing
    again = CliRunner().invoke(cli, ["run", str(p), "--store", str(store), "--no-tracking"])
    assert again.exit_code == 0 and re.search(r"\b0 node\(s\) to run", again.output), again.output


@pytest.mark.slow
def test_grid_report_shows_a_shared_oracle_once_and_off_the_frontier(tmp_path, monkeypatch):
    """A grid whose cells share the oracle (same model): one ``oracle`` row after
    ``original``, its nodes run once, and the frontier's methods are the unlearning rows."""
    from test_frontier import TEMPLATE

    from resalign.engine.grid import run_grid
    from resalign.engine.options import RunOptions

    text = TEMPLATE.replace("  seeds: [0, 1]\n", "  seeds: [0]\n")
    text = text.replace("tracking:\n", "controls: {oracle: true}\ntracking:\n")
    assert "controls:" in text and "seeds: [0]\n" in text
    tpl = tmp_path / "tiny_frontier.yaml.j2"
    tpl.write_text(text, encoding="utf-8")
    store = tmp_path / "runs"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_grid(tpl, RunOptions(store=store, tracking=False))
    assert len(list((store / "model").iterdir())) == 2  # original and oracle, once each

    out = tmp_path / "report"
    args = ["report", str(tpl), "--store", str(store), "--out", str(out), "--frontier"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    table = json.loads((out / "table.json").read_text())
    assert table["rows"] == [
        "original",
        "oracle",
        "steps=1/resalign",
        "steps=1/plain",
        "steps=3/resalign",
        "steps=3/plain",
    ]
    oracle = next(r for r in table["table"] if r["row"] == "oracle")
    assert "reference" not in oracle and oracle["cells"]["concept_rate/benign"]["n"] == 1
    front = json.loads((out / "frontier.json").read_text())
    assert set(front["methods"]) == {"resalign", "plain"}
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "Oracle control (oracle: " in md and "steps=3/resalign +" in md
