"""What a run would do: for every node, cached or to run and why.

``plan_status`` is what ``resalign plan`` prints and what the driver (:mod:`.runner`) acts
on. A node is cached when its ``DONE`` manifest matches its files (:meth:`.store.Store.check`:
sizes and mtimes, hashing only files touched since); a node whose files do not match is
*damaged* and runs again, with the first mismatches as the reason.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..graph.nodes import Graph, Node
from ..graph.plan import describe_changes, param_changes
from .store import REHASH_BELOW, Store

NEW = "new"
PARAMS = "parameter changed"
UPSTREAM = "upstream changed"
FORCED = "forced"
DAMAGED = "damaged"
VERSION = "step version changed"


@dataclass(frozen=True)
class NodeStatus:
    """``state`` is ``cached`` or ``run``; ``reason`` says why a node runs; ``resumes`` that
    an interrupted attempt left checkpoints it will continue from."""

    name: str
    kind: str
    key: str
    state: str
    reason: str | None = None
    resumes: bool = False

    def describe(self) -> str:
        if self.state == "cached":
            return "cached"
        extra = ", resumes from checkpoint" if self.resumes else ""
        return f"to run ({self.reason}{extra})"


def load_steps() -> None:
    """Import every module of ``resalign.steps`` so all step kinds are registered (the
    modules are torch-free at import)."""
    import pkgutil

    import resalign.steps as pkg

    for m in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"resalign.steps.{m.name}")


def _step_version(kind: str) -> str:
    from ..graph.keys import step_version

    return step_version(kind)


def forced_names(graph: Graph, force: Iterable[str]) -> set[str]:
    """Node names matched by ``--force`` values: ``all``, a name, a glob, or a kind."""
    pats = [p for p in force if p]
    if not pats:
        return set()
    out: set[str] = set()
    unknown = []
    for p in pats:
        if p == "all":
            return set(graph.nodes)
        hits = {n.name for n in graph if n.kind == p or fnmatch.fnmatchcase(n.name, p)}
        if not hits:
            unknown.append(p)
        out |= hits
    if unknown:
        raise UserError(
            f"--force {', '.join(unknown)} matches no node of spec {graph.spec_name!r}",
            where="--force",
            hint="use 'all', a node kind, a node name or a glob (see `resalign plan SPEC`): "
            + ", ".join(list(graph.nodes)[:8])
            + (" ..." if len(graph) > 8 else ""),
        )
    return out


def plan_status(
    graph: Graph, store: Store | Path | str, force: Iterable[str] = ()
) -> dict[str, NodeStatus]:
    """For every node: cached, or to run and why (new / parameter changed / upstream changed
    / forced). "parameter changed" needs the last key recorded under this node name in
    ``runs/index/<spec>.json``; without one the node is "new"."""
    store = store if isinstance(store, Store) else Store(store)
    load_steps()
    forced = forced_names(graph, force)
    index = store.read_index(graph.spec_name)
    out: dict[str, NodeStatus] = {}
    for n in graph:
        resumes = store.has_state(n.kind, n.key)
        if n.name in forced:
            out[n.name] = NodeStatus(n.name, n.kind, n.key, "run", FORCED, False)
            continue
        if store.has_done(n.kind, n.key):
            damage = store.check(n.kind, n.key)
            if damage is None:
                out[n.name] = NodeStatus(n.name, n.kind, n.key, "cached")
                continue
            # never used: re-run, saying why (the damaged folder is replaced on commit)
            reason = f"{DAMAGED}: {damage}"
            out[n.name] = NodeStatus(n.name, n.kind, n.key, "run", reason, resumes)
            continue
        prev = index.get(n.name)
        if not prev or prev.get("key") == n.key:
            reason = NEW
        elif _canon(prev.get("params")) != _canon(n.params):
            reason = PARAMS
        elif prev.get("version") != _step_version(n.kind):
            reason = VERSION
        else:
            reason = UPSTREAM
        out[n.name] = NodeStatus(n.name, n.kind, n.key, "run", reason, resumes)
    return out


def recheck_reads(
    graph: Graph,
    store: Store,
    status: dict[str, NodeStatus],
    *,
    below: int = REHASH_BELOW,
) -> dict[str, NodeStatus]:
    """``status`` with every cached node that a node to run reads re-hashed (its files
    smaller than ``below`` bytes, :func:`.store.check_files`); one whose content no longer
    matches its manifest is damaged and runs first, and so are the cached nodes it reads.

    ``plan_status`` compares sizes and mtimes; this catches a file changed behind both (bit
    rot, a copy that kept them) before a node reads it and commits a result computed from
    it under the right key. Cached nodes nothing reads are not hashed: an all-cached run
    reads no file contents."""
    out = dict(status)
    checked: set[str] = set()
    for n in reversed(list(graph)):  # a node's readers come after it: they are seen first
        if out[n.name].state != "run":
            continue
        for dep in n.deps.values():
            d = graph[dep]
            if dep in checked or out[dep].state != "cached":
                continue
            checked.add(dep)
            damage = store.check(d.kind, d.key, rehash_below=below)
            if damage is not None:
                out[dep] = NodeStatus(dep, d.kind, d.key, "run", f"{DAMAGED}: {damage}",
                                      store.has_state(d.kind, d.key))  # fmt: skip
    return out


def changed_params(graph: Graph, store: str | Path, status: Mapping[str, str]) -> dict[str, str]:
    """Status texts naming the key parameters that changed, for nodes to run whose name had
    another key in the store's last run of this spec (its index, else the old node.json), for
    ``resalign plan``; ``status``: each node's :meth:`NodeStatus.describe`."""
    st = Store(store)
    index = st.read_index(graph.spec_name)
    out = {}
    for n in graph:
        prev = index.get(n.name)
        if not status[n.name].startswith("to run") or not prev or prev.get("key") == n.key:
            continue
        old = prev.get("params")
        if old is None:
            node_json = Path(st.node_dir(n.kind, prev["key"])) / "node.json"
            if not node_json.is_file():
                continue
            try:  # a damaged node.json explains nothing; plan goes on
                old = json.loads(node_json.read_bytes()).get("params") or {}
            except (OSError, ValueError, RecursionError, AttributeError):
                continue
        if not isinstance(old, dict):
            continue
        changes = param_changes(n.kind, old, n.params)
        if changes:
            resumes = ", resumes from checkpoint" if "resumes" in status[n.name] else ""
            out[n.name] = f"to run (parameter changed: {describe_changes(changes)}{resumes})"
    return out


def _canon(x: Any) -> str:
    return json.dumps(x, sort_keys=True, default=str)


def index_entry(n: Node) -> dict[str, Any]:
    return {"key": n.key, "kind": n.kind, "params": n.params, "version": _step_version(n.kind)}
