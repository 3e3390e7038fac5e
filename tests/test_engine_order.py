"""The order in which the engine starts ready nodes: the longest chain of work first."""

from __future__ import annotations

from pathlib import Path

from resalign.engine.runner import critical_path_order
from resalign.graph.compile import compile_spec
from resalign.spec import load_spec_text

SPEC = """\
name: order
model: {family: tiny, device: cpu, tiny: {pretrain: {dataset: all}}}
datasets:
  all: {type: digits}
  keep: {type: digits, digits: [1, 2]}
  gone: {type: digits, digits: [0]}
concepts:
  c: {harmful: [gone], retain: [keep]}
unlearn: {method: plain, steps: 2}
threats:
  a: {data: keep, steps: 4, seeds: [1, 2], eval_at: [2, 4]}
evaluate:
  metrics: [{kind: concept_rate}]
"""


def test_unlearning_starts_before_the_original_models_attacks(tmp_path: Path) -> None:
    graph = compile_spec(load_spec_text(SPEC, filename="o.yaml", base_dir=tmp_path))
    nodes = list(graph)
    names = [n.name for n in critical_path_order(graph, nodes)]
    # graph order puts the original model's attacks first; the unlearning row's chain
    # (unlearn -> attack -> evaluate) is longer, so it must start first
    graph_order = [n.name for n in nodes]
    assert graph_order.index("attack/original/a/seed1/step2") < graph_order.index(
        "unlearn/plain/seed0"
    )
    assert names.index("unlearn/plain/seed0") < names.index("attack/original/a/seed1/step2")
    # still a topological order: a dependency is never started after its dependant
    for n in graph:
        assert all(names.index(d) < names.index(n.name) for d in n.deps.values())
    # the report (the end of every chain) comes last, the model (the start) first
    assert names[0] == "model" and names[-1] == "report"
