"""What a node's MLflow run says about it (resalign.engine.tracking.describe): tags from the
Node fields, short distinguishing run names, params that are what the node used; what of a
metrics record is mirrored; the parent's params per row; the graph as a self-contained SVG."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from resalign.engine.tracking.curation import curated_params
from resalign.engine.tracking.describe import (
    node_params,
    node_tags,
    row_methods,
    run_name,
    threat_labels,
    varying_fields,
)
from resalign.engine.tracking.records import mirrored
from resalign.graph.compile import compile_spec
from resalign.graph.nodes import Node
from resalign.graph.svg import render_svg
from resalign.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "specs" / "tiny.yaml"
DEMO = ROOT / "specs" / "digits_demo.yaml"


@pytest.fixture(scope="module")
def demo():
    return compile_spec(load_spec(DEMO))


def test_tags_come_from_the_node_fields_not_its_name():
    # a name that parses as something else: the tags follow the fields
    node = Node("evaluate", "evaluate/plain/seed9/x/seed9/step9", {}, {}, "k", row="resalign",
                threat="poison", seed=2, step=50, unlearn_seed=1)  # fmt: skip
    assert node_tags(node, {"resalign": "resalign"}) == {
        "resalign.kind": "evaluate",
        "resalign.row": "resalign",
        "resalign.method": "resalign",
        "resalign.unlearning_seed": "1",
        "resalign.threat": "poison",
        "resalign.attack_seed": "2",
        "resalign.attack_step": "50",
    }


def test_every_demo_node_gets_the_tags_that_apply(demo):
    methods = row_methods(demo)
    assert methods == {"original": "none", "resalign": "resalign", "plain": "plain"}
    for n in demo:
        tags = node_tags(n, methods)
        assert tags["resalign.kind"] == n.kind
        assert tags.get("resalign.row") == n.row
        assert tags.get("resalign.unlearning_seed") == (
            None if n.unlearn_seed is None else str(n.unlearn_seed)
        )
        if n.kind in ("attack", "evaluate"):
            assert tags["resalign.attack_step"] == str(n.step)
            assert tags.get("resalign.threat") == n.threat
            assert tags.get("resalign.attack_seed") == (None if n.seed is None else str(n.seed))
        else:
            assert "resalign.attack_step" not in tags and "resalign.threat" not in tags


@pytest.mark.parametrize("spec", [TINY, DEMO])
def test_run_names_are_unique_and_short_where_they_differ(spec):
    graph = compile_spec(load_spec(spec))
    varying = varying_fields(graph)
    names = [run_name(n, varying, threat_labels(graph)) for n in graph]
    assert len(set(names)) == len(names), names
    for n, name in zip(graph, names):
        distinguishing = name.rsplit(" ", 1)[0] if n.row is not None else name
        # MLflow 3.17's Run Name column shows about 18 characters before its ellipsis
        assert len(distinguishing) <= 18, name
    demo_names = set(names)
    if spec == DEMO:
        # two threats: each by the shortest prefix no other threat starts with
        assert {"plain p a2 @50 eval", "plain b a1 @200 eval", "resalign unlearn"} <= demo_names
        assert "original pre eval" in demo_names


@pytest.mark.fast
def test_threat_labels_are_the_shortest_unambiguous_prefixes():
    from types import SimpleNamespace as N

    graph = [N(threat=t) for t in ("benign_adam", "benign_lora", "poison", None, "poison")]
    assert threat_labels(graph) == {
        "benign_adam": "benign_a",
        "benign_lora": "benign_l",
        "poison": "p",
    }
    assert threat_labels([N(threat="benign")]) == {"benign": "b"}


def test_params_are_what_the_node_used(demo):
    plain = node_params(demo["unlearn/plain/seed0"])
    resalign = node_params(demo["unlearn/resalign/seed0"])
    # the content key's rule: no resilience block or meta data sets for plain
    assert not [k for k in plain if k.startswith(("unlearn.resilience", "meta_datasets"))]
    assert resalign["unlearn.resilience.beta"] == "0.5"
    assert any(k.startswith("meta_datasets.") for k in resalign)
    # the demo trains the full UNet and attacks it fully: no LoRA fields anywhere
    assert resalign["trainable.kind"] == "full"
    for n in demo:
        if n.kind in ("unlearn", "attack"):
            assert not [k for k in node_params(n) if "lora" in k or "trainable.rank" in k], n
    attack = node_params(demo["attack/plain/seed0/poison5_adam_3e-4/seed1/step25"])
    assert attack["threat.algorithm"] == "full" and attack["stop"] == "25"


def test_lora_fields_stay_for_lora():
    graph = compile_spec(load_spec(TINY, sets=["threats.benign.algorithm=lora"]))
    un = node_params(graph["unlearn/resalign/seed0"])
    assert un["trainable.kind"] == "lora" and un["trainable.rank"] == "2"
    assert "trainable.modules" not in un
    # its simulated fine-tune is `full`: no lora block
    assert not [k for k in un if k.startswith("unlearn.resilience.meta.configs.sgd.lora")]
    attack = node_params(graph["attack/resalign/seed0/benign/seed1/step2"])
    assert attack["threat.lora.rank"] == "4"


def test_parent_params_list_every_row_by_the_key_rule():
    tiny = curated_params(load_spec(TINY))
    assert "unlearn.method" not in tiny
    assert (tiny["row.original.method"], tiny["row.resalign.method"], tiny["row.plain.method"]) == (
        "none", "resalign", "plain")  # fmt: skip
    assert tiny["row.resalign.resilience.beta"] == "0.8" and tiny["row.plain.steps"] == "2"
    assert not [k for k in tiny if k.startswith("row.plain.") and "resilience" in k]
    assert tiny["model.trainable.rank"] == "2"  # LoRA
    assert "model.trainable.rank" not in curated_params(load_spec(DEMO))  # full


def test_mirrored_leaves_out_copies_and_constants():
    rec = {"step": 3, "lr": 1e-4, "retries": 1.0, "fallbacks": 0.0, "cosine": 0.9,
           "residual_0": 0.1, "meta0.retries": 1.0, "meta0.fallback": 0.0, "meta0.cosine": 0.9,
           "meta0.residual_0": 0.1, "meta0.lr": 3e-4, "meta0.steps": 10.0,
           "meta0.batch_size": 16.0, "meta0.gamma": 0.01, "meta0.damping": 0.5,
           "meta0.hvps": 10.0, "meta0.config": "a"}  # fmt: skip
    params = {"unlearn.resilience.meta.distribution": "null",
              "unlearn.resilience.hypergradient.gamma": "0.01"}  # fmt: skip
    out = mirrored(rec, params)
    assert out == {"step": 3, "lr": 1e-4, "retries": 1.0, "fallbacks": 0.0, "cosine": 0.9,
                   "residual_0": 0.1, "meta0.hvps": 10.0, "meta0.config": "a"}  # fmt: skip
    # two configs per step: each config's own values are not copies of the mean
    two = dict(rec, **{"meta1.cosine": 0.7, "meta1.hvps": 10.0})
    assert {"meta0.cosine", "meta1.cosine", "meta0.retries"} <= set(mirrored(two, params))
    # sampled configurations and gamma auto: those vary, so they are metrics
    varying = {"unlearn.resilience.meta.distribution": '{"lr": [0.001]}',
               "unlearn.resilience.hypergradient.gamma": "auto"}  # fmt: skip
    assert {"meta0.lr", "meta0.steps", "meta0.gamma"} <= set(mirrored(rec, varying))


def test_graph_svg_is_self_contained_with_every_node_and_edge(demo):
    svg = render_svg(demo)
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    groups = root.findall(f"{ns}g")
    assert len(groups) == len(demo)
    texts = {t.text for g in groups for t in g.findall(f"{ns}text")}
    assert {n.name for n in demo} <= texts
    edges = [p for p in root.findall(f"{ns}path") if p.get("marker-end")]
    assert len(edges) == sum(len(n.deps) for n in demo)
    assert (
        "<script" not in svg
        and "href" not in svg
        and "http://" not in svg.replace('xmlns="http://www.w3.org/2000/svg"', "")
    )


def test_a_learning_rate_that_cannot_change_is_the_param_it_was():
    from resalign.engine.tracking.records import used_params

    un = {"unlearn.optimizer.lr": "0.0001"}
    recs = [{"step": 1, "lr": 1e-4, "loss_total": 0.5}, {"step": 2, "lr": 1e-4}]
    assert "lr" not in mirrored(recs[0], un) and "loss_total" in mirrored(recs[0], un)
    assert used_params(recs, un) == {"lr_used": "0.0001"}  # read off the optimizer's record
    assert used_params(recs, {**un, "lr_used": "0.0001"}) == {}  # logged once
    constant = {"threat.schedule": "constant", "threat.warmup_steps": "0"}
    warmup = {"threat.schedule": "constant", "threat.warmup_steps": "10"}
    rec = {"step": 1, "attack/lr": 3e-5, "attack/loss": 0.1}
    assert "attack/lr" not in mirrored(rec, constant) and used_params([rec], constant) == {
        "attack/lr_used": "3e-05"
    }
    assert "attack/lr" in mirrored(rec, warmup) and used_params([rec], warmup) == {}
