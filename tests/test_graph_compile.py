"""Graph compilation: the node table of docs/architecture.md."""

from __future__ import annotations

from pathlib import Path

from resalign.graph.compile import compile_spec
from resalign.graph.plan import render_mermaid, render_plan
from resalign.spec import load_spec_text

SPEC = """\
name: g
model: {family: tiny, device: cpu, tiny: {pretrain: {dataset: all}}}
datasets:
  all: {type: digits}
  keep: {type: digits, digits: [0, 1]}
  p: {type: prompts, path: p.txt}
  mixed: {type: mix, base: keep, poison: p, ratio: 0.5}
concepts:
  c: {harmful: [p], retain: [keep]}
baselines:
  nothing: {method: none}
threats:
  a: {data: keep, steps: 4, seeds: [1, 2], eval_at: [2, 4]}
  b: {data: mixed, steps: 3}
evaluate:
  metrics: [{kind: concept_rate}]
"""


def graph(tmp_path: Path):
    return compile_spec(load_spec_text(SPEC, filename="g.yaml", base_dir=tmp_path))


def test_nodes_and_dependencies(tmp_path: Path) -> None:
    g = graph(tmp_path)
    names = list(g.nodes)
    # topological: every dependency precedes its dependant
    for n in g:
        assert all(names.index(d) < names.index(n.name) for d in n.deps.values())
    assert names[0] == "model" and names[-1] == "report"
    assert [n.name for n in g.of_kind("harvest")] == ["harvest/p__harvest"]
    assert [n.name for n in g.of_kind("unlearn")] == ["unlearn/resalign/seed0"]  # none: none
    attacks = {n.name for n in g.of_kind("attack")}
    assert attacks == {
        f"attack/{r}/{t}/seed{s}/step{n}"
        for r in ("original", "resalign/seed0", "nothing")
        for t, seeds, steps in (("a", (1, 2), (2, 4)), ("b", (42,), (3,)))
        for s in seeds
        for n in steps
    }
    evals = g.of_kind("evaluate")
    assert len(evals) == 3 * (1 + 2 * 2 + 1)
    u = g["unlearn/resalign/seed0"]
    assert dict(u.deps) == {"model": "model", "harvest:p__harvest": "harvest/p__harvest"}
    assert u.params["unlearn"]["seed"] == 0 and u.row == "resalign" and u.unlearn_seed == 0
    assert "seeds" not in u.params["unlearn"]  # the node carries its one seed, not the list
    # the poisoned threat reads the harvest through the mix dataset
    b = g["attack/resalign/seed0/b/seed42/step3"]
    assert b.deps["harvest:p__harvest"] == "harvest/p__harvest"
    assert b.deps["unlearn"] == "unlearn/resalign/seed0"
    assert "seeds" not in b.params["threat"] and b.params["seed"] == 42
    assert "eval_at" not in b.params["threat"] and b.params["stop"] == 3 and "resume" not in b.deps
    # the segment to step 4 continues the one to step 2 (an ordering dep, not in the key)
    a4 = g["attack/resalign/seed0/a/seed2/step4"]
    assert a4.deps["resume"] == "attack/resalign/seed0/a/seed2/step2" and a4.step == 4
    assert set(b.params["datasets"]) == {"keep", "mixed", "p", "p__harvest"}
    e = g["evaluate/resalign/seed0/a/seed2/step2"]
    assert (e.row, e.unlearn_seed, e.threat, e.seed, e.step) == ("resalign", 0, "a", 2, 2)
    assert dict(e.deps) == {
        "model": "model",
        "unlearn": "unlearn/resalign/seed0",
        "attack": "attack/resalign/seed0/a/seed2/step2",
    }
    pre = g["evaluate/original/pre/step0"]
    assert dict(pre.deps) == {"model": "model"} and pre.threat is None and pre.step == 0
    assert pre.unlearn_seed is None
    # every evaluation, and the unlearned models (the report's outer-step section)
    unlearned = {n.name for n in g.of_kind("unlearn")}
    assert set(g["report"].deps.values()) == {n.name for n in evals} | unlearned
    assert "device" not in g["model"].params["model"]
    assert set(g["model"].params["pretrain_data"]) == {"all"}


def test_none_row_shares_keys_with_original(tmp_path: Path) -> None:
    g = graph(tmp_path)
    assert g["attack/nothing/a/seed1/step2"].key == g["attack/original/a/seed1/step2"].key
    assert g["evaluate/nothing/pre/step0"].key == g["evaluate/original/pre/step0"].key
    assert g["attack/resalign/seed0/a/seed1/step2"].key != g["attack/original/a/seed1/step2"].key


def test_plan_renderings(tmp_path: Path) -> None:
    g = graph(tmp_path)
    tree = render_plan(g)
    assert tree.splitlines()[0].startswith(f"g  ({len(g)} nodes")
    for n in g:
        assert f"{n.name}  {n.key[:12]}" in tree
    assert "unlearn/resalign/seed0  " in tree and "(needs harvest/p__harvest)" in tree
    status = {n.name: "cached" for n in g}
    assert tree.count("[cached]") == 0 and render_plan(g, status).count("[cached]") == len(g)
    mer = render_mermaid(g)
    assert mer.startswith("flowchart TD")
    assert sum(1 for ln in mer.splitlines() if "-->" in ln) == sum(len(n.deps) for n in g)


def test_unlearning_seeds_give_a_branch_each(tmp_path: Path) -> None:
    text = SPEC.replace(
        "baselines:\n", "unlearn: {seeds: [3, 5]}\nbaselines:\n  plain: {method: plain}\n"
    )
    g = compile_spec(load_spec_text(text, filename="g.yaml", base_dir=tmp_path))
    # baselines inherit the seeds through the deep merge
    assert [n.name for n in g.of_kind("unlearn")] == [
        "unlearn/resalign/seed3",
        "unlearn/resalign/seed5",
        "unlearn/plain/seed3",
        "unlearn/plain/seed5",
    ]
    for n in g.of_kind("unlearn"):
        assert n.params["unlearn"]["seed"] == n.unlearn_seed
    e = g["evaluate/plain/seed5/a/seed1/step4"]
    assert e.deps["unlearn"] == "unlearn/plain/seed5" and e.unlearn_seed == 5
    assert e.deps["attack"] == "attack/plain/seed5/a/seed1/step4"
    # 'none' rows have no unlearning seed: one branch
    assert {n.name for n in g.of_kind("attack") if n.row == "nothing"} == {
        "attack/nothing/a/seed1/step2", "attack/nothing/a/seed1/step4",
        "attack/nothing/a/seed2/step2", "attack/nothing/a/seed2/step4",
        "attack/nothing/b/seed42/step3"}  # fmt: skip
    assert g["report"].params["unlearn_seeds"] == {"resalign": [3, 5], "plain": [3, 5]}
    evals = g.of_kind("evaluate")
    assert len(evals) == 2 * (1 + 2 * 2 + 1) + 2 * 2 * (1 + 2 * 2 + 1)
