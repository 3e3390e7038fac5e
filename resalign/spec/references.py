"""Dataset references in a spec: where each dataset name is used and for what (image–caption
pairs, prompts, or harmful data that may be either), and the checks that every name exists
with a type that fits its use, and that a search objective or constraint names a metric the
spec evaluates. Part of the resolve pass (:mod:`.resolve`), on the raw data so that each
problem points at its line.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from .errors import Issue, did_you_mean, join_allowed
from .schema import Spec
from .source import PathT, SourceMap, dotted

# Dataset types that yield image–caption pairs, and those that yield prompts only.
PAIR_TYPES = {"imagefolder", "digits", "harvest", "mix", "dreambooth"}
PROMPT_TYPES = {"prompts"}


def get_at(data: Any, *path: Any) -> Any:
    """``data[path[0]][path[1]]...``, or None where a key or index is missing."""
    cur = data
    for p in path:
        if isinstance(cur, Mapping) and p in cur:
            cur = cur[p]
        elif isinstance(cur, list) and isinstance(p, int) and 0 <= p < len(cur):
            cur = cur[p]
        else:
            return None
    return cur


def items_of(value: Any) -> Iterator[tuple[Any, Any]]:
    """A mapping's items or a list's (index, value) pairs; nothing for anything else."""
    if isinstance(value, Mapping):
        yield from value.items()
    elif isinstance(value, list):
        yield from enumerate(value)


def names_at(value: Any, path: PathT) -> Iterator[tuple[PathT, Any]]:
    """A single name or a list of names at ``path``."""
    if isinstance(value, list):
        for i, v in enumerate(value):
            yield (*path, i), v
    elif value is not None:
        yield path, value


def _unlearn_refs(block: Any, path: PathT) -> Iterator[tuple[PathT, Any, str]]:
    meta = get_at(block, "resilience", "meta")
    mp = (*path, "resilience", "meta")
    for p, n in names_at(get_at(meta, "data"), (*mp, "data")):
        yield p, n, "pairs"
    for cname, cfg in items_of(get_at(meta, "configs")):
        for p, n in names_at(get_at(cfg, "data"), (*mp, "configs", cname, "data")):
            yield p, n, "pairs"
    for p, n in names_at(get_at(meta, "distribution", "data"), (*mp, "distribution", "data")):
        yield p, n, "pairs"


def references(data: Any) -> Iterator[tuple[PathT, Any, str]]:
    """Every dataset reference in raw spec data: (path, name, use) where use is ``pairs``
    (image–caption pairs), ``prompts`` or ``harmful`` (pairs, or prompts to harvest)."""
    for cname, c in items_of(get_at(data, "concepts")):
        for p, n in names_at(get_at(c, "harmful"), ("concepts", cname, "harmful")):
            yield p, n, "harmful"
        for p, n in names_at(get_at(c, "retain"), ("concepts", cname, "retain")):
            yield p, n, "pairs"
    yield from _unlearn_refs(get_at(data, "unlearn"), ("unlearn",))
    for bname, b in items_of(get_at(data, "baselines")):
        yield from _unlearn_refs(b, ("baselines", bname))
    for tname, t in items_of(get_at(data, "threats")):
        for p, n in names_at(get_at(t, "data"), ("threats", tname, "data")):
            yield p, n, "pairs"
        for p, n in names_at(get_at(t, "poison", "data"), ("threats", tname, "poison", "data")):
            yield p, n, "harmful"
        for p, n in names_at(get_at(t, "prior"), ("threats", tname, "prior")):
            yield p, n, "pairs"
        for i, stage in items_of(get_at(t, "stages")):
            sp = ("threats", tname, "stages", i)
            for p, n in names_at(get_at(stage, "data"), (*sp, "data")):
                yield p, n, "pairs"
            for p, n in names_at(get_at(stage, "poison", "data"), (*sp, "poison", "data")):
                yield p, n, "harmful"
        # datasets an attacker search may choose (issue 16): pairs, never harvested
        for searched in ("data", "poison.data", "prior"):
            sp = ("threats", tname, "search", "space", searched, "choice")
            for p, n in names_at(get_at(t, "search", "space", searched, "choice"), sp):
                yield p, n, "pairs"
    for i, m in items_of(get_at(data, "evaluate", "metrics")):
        for p, n in names_at(get_at(m, "prompts"), ("evaluate", "metrics", i, "prompts")):
            yield p, n, "prompts"
        for p, n in names_at(get_at(m, "reference"), ("evaluate", "metrics", i, "reference")):
            yield p, n, "pairs"
    for dname, d in items_of(get_at(data, "datasets")):
        dp = ("datasets", dname)
        kind = get_at(d, "type")
        if kind == "harvest":
            for p, n in names_at(get_at(d, "prompts"), (*dp, "prompts")):
                yield p, n, "prompts"
        elif kind == "mix":
            for p, n in names_at(get_at(d, "base"), (*dp, "base")):
                yield p, n, "pairs"
            for p, n in names_at(get_at(d, "poison"), (*dp, "poison")):
                yield p, n, "harmful"
        elif kind == "dreambooth":
            for p, n in names_at(get_at(d, "instance"), (*dp, "instance")):
                yield p, n, "pairs"
            for p, n in names_at(get_at(d, "prior"), (*dp, "prior")):
                yield p, n, "pairs"
    for p, n in names_at(
        get_at(data, "model", "tiny", "pretrain", "dataset"),
        ("model", "tiny", "pretrain", "dataset"),
    ):
        yield p, n, "pairs"
    for p, n in names_at(get_at(data, "probes", "data"), ("probes", "data")):
        yield p, n, "pairs"


_USE_TEXT = {
    "pairs": "image–caption pairs (imagefolder, digits, harvest, mix, dreambooth)",
    "prompts": "a prompt list (type: prompts)",
    "harmful": "harmful image–caption pairs, or a prompt list to harvest images from",
}


def check_references(data: Any, smap: SourceMap) -> list[Issue]:
    """Unknown dataset names, datasets of the wrong kind, and cycles among datasets."""
    issues: list[Issue] = []
    datasets = get_at(data, "datasets")
    datasets = datasets if isinstance(datasets, Mapping) else {}
    types = {n: get_at(d, "type") for n, d in datasets.items()}
    for path, name, use in references(data):
        if not isinstance(name, str):
            continue  # the schema reports the wrong type
        if name not in datasets:
            issues.append(
                smap.issue(
                    path,
                    f"{dotted(path)}: unknown dataset '{name}'"
                    + ("" if datasets else " (the spec defines no 'datasets')"),
                    allowed=join_allowed(datasets) if datasets else None,
                    suggestion=did_you_mean(name, datasets),
                )
            )
            continue
        kind = types.get(name)
        if not isinstance(kind, str):
            continue
        ok = (
            kind in PAIR_TYPES
            if use == "pairs"
            else kind in PROMPT_TYPES
            if use == "prompts"
            else kind in PAIR_TYPES | PROMPT_TYPES
        )
        if not ok:
            issues.append(
                smap.issue(
                    path,
                    f"{dotted(path)}: dataset '{name}' is of type '{kind}', but this needs "
                    f"{_USE_TEXT[use]}",
                )
            )
    # Cycles (a mix whose base is itself, ...): the loaders would recurse forever.
    edges: dict[str, list[str]] = {}
    for path, name, _ in references(data):
        if path[0] == "datasets" and isinstance(name, str):
            edges.setdefault(path[1], []).append(name)
    state: dict[str, int] = {}

    def visit(n: str, trail: list[str]) -> None:
        state[n] = 1
        for m in edges.get(n, []):
            if state.get(m) == 1:
                cycle = " → ".join([*trail[trail.index(m) :], m]) if m in trail else m
                issues.append(
                    smap.issue(("datasets", n), f"datasets form a cycle: {cycle}", at_key=True)
                )
            elif m in edges and state.get(m) is None:
                visit(m, [*trail, m])
        state[n] = 2

    for n in edges:
        if state.get(n) is None:
            visit(n, [n])
    return issues


def check_search_metrics(spec: Spec, smap: SourceMap) -> list[Issue]:
    """A searched threat's objective and constraint must name values that ``evaluate.metrics``
    writes (:data:`resalign.spec.schema.evaluate.METRIC_OUTPUTS`); caught here, not after the
    first trial has run."""
    from .schema.evaluate import METRIC_OUTPUTS

    produced = {
        name: m.kind for m in spec.evaluate.metrics for name in METRIC_OUTPUTS.get(m.kind, ())
    }
    issues: list[Issue] = []
    for tname, t in spec.threats.items():
        if t.search is None:
            continue
        for part in ("objective", "constraint"):
            block = getattr(t.search, part)
            if block is None or block.metric in produced:
                continue
            path = ("threats", tname, "search", part, "metric")
            issues.append(
                smap.issue(
                    path,
                    f"{dotted(path)}: no metric in evaluate.metrics writes '{block.metric}'; "
                    "name a value the evaluation writes, or add the metric that writes it "
                    "to evaluate.metrics",
                    allowed=join_allowed(produced) if produced else "none",
                    suggestion=did_you_mean(block.metric, produced),
                )
            )
    return issues
