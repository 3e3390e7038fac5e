"""Nodes of the execution graph. Pure data: no torch, no I/O."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

# The fields of a Node that say where it sits in the study (the report's rows and columns);
# the engine writes them into each stored node.json.
LOCATION_FIELDS = ("row", "unlearn_seed", "threat", "seed", "step")


@dataclass(frozen=True)
class Node:
    """One step of the graph.

    ``params`` are exactly the resolved spec values the step reads (JSON-able); together with
    the step kind, its code version and the upstream keys they make ``key``. ``deps`` maps a
    role (``model``, ``unlearn``, ``attack``, ``harvest:<dataset>``, ...) to an upstream
    node name. ``row`` is the report row (``original`` or an unlearning label) and ``threat``
    / ``seed`` (the attack seed) / ``step`` locate attack and evaluation nodes in the report;
    ``unlearn_seed`` is the unlearning seed of unlearn, attack and evaluation nodes of a row
    that unlearns (None for ``original`` and other ``method: none`` rows).
    """

    kind: str
    name: str
    params: Mapping[str, Any]
    deps: Mapping[str, str]
    key: str
    row: str | None = None
    threat: str | None = None
    seed: int | None = None
    step: int | None = None
    unlearn_seed: int | None = None


@dataclass
class Graph:
    """Nodes in topological order (every dependency precedes its dependants)."""

    spec_name: str
    spec_hash: str
    nodes: dict[str, Node] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes.values())

    def __len__(self) -> int:
        return len(self.nodes)

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def of_kind(self, kind: str) -> list[Node]:
        return [n for n in self.nodes.values() if n.kind == kind]

    def upstream(self, name: str) -> list[str]:
        """All transitive dependencies of ``name``, in topological order."""
        seen: set[str] = set()

        def visit(n: str) -> None:
            for dep in self.nodes[n].deps.values():
                if dep not in seen:
                    seen.add(dep)
                    visit(dep)

        visit(name)
        return [n for n in self.nodes if n in seen]
