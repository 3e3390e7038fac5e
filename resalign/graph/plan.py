"""Render a graph for people: an indented tree and Mermaid flowchart text.

Each node is shown under its closest upstream node (attack, else unlearn, else harvest, else
model); other upstream nodes are listed after ``needs``. ``status`` (node name → a short word
such as ``cached`` / ``to run``, supplied by the engine) is appended when given.
:func:`param_changes` names what changed between a node's previous parameters (the store's
record of the last node of the same name) and its current ones, among those in its key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .keys import key_params, key_view
from .nodes import Graph, Node

SHORT = 12
_PARENT_ORDER = ("attack", "unlearn", "model")


def short_key(node: Node) -> str:
    return node.key[:SHORT]


def _parent(node: Node) -> str | None:
    for role in _PARENT_ORDER:
        if role in node.deps:
            return node.deps[role]
    return None


def render_plan(graph: Graph, status: Mapping[str, str] | None = None) -> str:
    """The graph as an indented tree, one node per line: ``kind  name  key[:12]  [status]``."""
    children: dict[str | None, list[Node]] = {}
    for node in graph:
        parent = None if node.kind == "report" else _parent(node)
        children.setdefault(parent, []).append(node)
    lines = [f"{graph.spec_name}  ({len(graph)} nodes, spec {graph.spec_hash[:SHORT]})"]
    implied: dict[str, set[str]] = {}

    def above(name: str) -> set[str]:
        # A parent's own upstream is implied by the tree, so it is not repeated as "needs".
        if name not in implied:
            implied[name] = {name, *graph.upstream(name)}
        return implied[name]

    def line(node: Node, prefix: str, last: bool) -> None:
        branch = "└── " if last else "├── "
        text = f"{prefix}{branch}{node.kind:<8} {node.name}  {short_key(node)}"
        if status is not None and node.name in status:
            text += f"  [{status[node.name]}]"
        parent = _parent(node)
        extra = [d for d in node.deps.values() if parent is None or d not in above(parent)]
        if node.kind == "report":
            probes = sum(1 for d in node.deps.values() if graph[d].kind == "probe")
            text += f"  (needs {len(node.deps) - probes} evaluate nodes"
            text += f" and {probes} probe nodes)" if probes else ")"
        elif extra:
            text += f"  (needs {', '.join(extra)})"
        lines.append(text)
        kids = children.get(node.name, [])
        for i, kid in enumerate(kids):
            line(kid, prefix + ("    " if last else "│   "), i == len(kids) - 1)

    roots = children.get(None, [])
    for i, node in enumerate(roots):
        line(node, "", i == len(roots) - 1)
    return "\n".join(lines)


def _mermaid_id(i: int) -> str:
    return f"n{i}"


def render_mermaid(graph: Graph, status: Mapping[str, str] | None = None) -> str:
    """Mermaid ``flowchart TD`` text; node labels carry name, kind, short key and status."""
    ids = {node.name: _mermaid_id(i) for i, node in enumerate(graph)}
    out = ["flowchart TD"]
    for node in graph:
        label = f"{node.name}<br/>{node.kind} {short_key(node)}"
        if status is not None and node.name in status:
            label += f"<br/>{status[node.name]}"
        out.append(f'    {ids[node.name]}["{label.replace(chr(34), "#quot;")}"]')
    for node in graph:
        for dep in node.deps.values():
            out.append(f"    {ids[dep]} --> {ids[node.name]}")
    return "\n".join(out)


def param_changes(
    kind: str, old: Mapping[str, Any], new: Mapping[str, Any]
) -> list[tuple[str, Any, Any]]:
    """(dotted path, old value, new value) for every key parameter of a ``kind`` node that
    differs between ``old`` and ``new`` params (what :func:`.keys.key_params` keeps; a
    parameter that is absent on one side has the value None there). Lists of equal length are
    compared item by item (``path[i]``), others as a whole."""
    out: list[tuple[str, Any, Any]] = []

    def walk(path: str, a: Any, b: Any) -> None:
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for k in sorted(set(a) | set(b), key=str):
                walk(f"{path}.{k}" if path else str(k), a.get(k), b.get(k))
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(f"{path}[{i}]", x, y)
        elif a != b:
            out.append((path, a, b))

    walk("", key_view(key_params(kind, old)), key_view(key_params(kind, new)))
    return out


def describe_changes(changes: list[tuple[str, Any, Any]], limit: int = 3) -> str:
    """``unlearn.steps 20 → 21; ...`` for the first ``limit`` changes, then how many more."""

    def show(v: Any) -> str:
        text = json.dumps(v, sort_keys=True, default=str)
        return text if len(text) <= 40 else text[:37] + "..."

    parts = [f"{p} {show(a)} → {show(b)}" for p, a, b in changes[:limit]]
    if len(changes) > limit:
        parts.append(f"and {len(changes) - limit} more")
    return "; ".join(parts)
