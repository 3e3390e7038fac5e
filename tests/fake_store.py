"""A store of tests/specs/tiny.yaml's graph without running it: every node committed by the
real :meth:`Store.commit` with a small stand-in output, the provenance of its inputs (as the
worker records it) and, for evaluations, a ``metrics.json`` the report reads. Seconds, no
torch: for the tests of what reads a store (plan, verify, report, an all-cached run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from resalign.engine.store import Store

TINY = Path(__file__).resolve().parent / "specs" / "tiny.yaml"


def fake_store(root: Path, spec: Path = TINY) -> tuple[Store, Any]:
    from resalign.engine.plan import index_entry
    from resalign.graph.compile import compile_spec
    from resalign.spec import load_spec

    graph = compile_spec(load_spec(str(spec)))
    store = Store(root)
    for i, n in enumerate(graph):
        staging = store.new_staging(n.kind, n.key)
        inputs = {r: str(store.node_dir(graph[d].kind, graph[d].key)) for r, d in n.deps.items()}
        (staging / "node.json").write_text(json.dumps({"name": n.name, "inputs": inputs}))
        (staging / "out.bin").write_bytes(n.key.encode() * 8)
        (staging / "metrics.jsonl").write_text("")
        if n.kind == "evaluate":
            entry = {"value": 0.1 * (i % 10), "definition": "concept_rate", "version": "1",
                     "params": {}, "role": "safety", "better": "lower", "n": 10}  # fmt: skip
            (staging / "metrics.json").write_text(json.dumps({"concept_rate": entry}))
        store.commit(staging, n.kind, n.key, {"inputs": store.inputs_record(inputs)})
    store.update_index(graph.spec_name, {n.name: index_entry(n) for n in graph})
    return store, graph
