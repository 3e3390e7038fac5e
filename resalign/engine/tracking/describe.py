"""What a node's MLflow run says about the node: its run name, its tags and its params.

Everything comes from the graph's :class:`~resalign.graph.nodes.Node` fields (``kind``,
``row``, ``unlearn_seed``, ``threat``, ``seed``, ``step``) and from the node's params, never
from parsing its name, so that MLflow's "Group by" and filter strings work
(``tags.`resalign.row` = 'plain'``):

==========================  ==================================================================
``resalign.kind``           the node kind (``model``, ``unlearn``, ``attack``, ``evaluate``...)
``resalign.row``            the report row (``original``, ``oracle``, an unlearning label)
``resalign.method``         the row's unlearning method (``none`` for rows without unlearning)
``resalign.unlearning_seed`` the unlearning seed (rows that unlearn)
``resalign.threat``         the threat (attack and post-attack evaluation nodes)
``resalign.attack_seed``    the attack seed
``resalign.attack_step``    the attack step (evaluations before any attack: 0)
==========================  ==================================================================

Params are what the node used: its key parameters (:func:`resalign.graph.keys.key_params`,
the rule the content key follows, so a method without a resilience term logs no
``unlearn.resilience.*``) without the LoRA fields of a selection or fine-tune that is not LoRA.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .curation import flatten

# Tag names (also what tests and the README filter on).
KIND, ROW, METHOD = "resalign.kind", "resalign.row", "resalign.method"
UNLEARNING_SEED, THREAT = "resalign.unlearning_seed", "resalign.threat"
ATTACK_SEED, ATTACK_STEP = "resalign.attack_seed", "resalign.attack_step"
NO_METHOD = "none"

# Fields of a trainable selection (``model.trainable``) that only a LoRA selection reads.
_LORA_SELECTION = ("rank", "alpha", "targets", "init")
# Inner fine-tune algorithms that read their ``lora`` block (resalign.algorithms.inner)
_LORA_INNER = ("lora", "dreambooth")


def row_methods(graph: Iterable[Any]) -> dict[str, str]:
    """Report row → unlearning method, from the graph's unlearn nodes (rows without one:
    ``none``)."""
    out: dict[str, str] = {}
    for n in graph:
        if n.row is None:
            continue
        if n.kind == "unlearn":
            out[n.row] = str((n.params.get("unlearn") or {}).get("method", NO_METHOD))
        else:
            out.setdefault(n.row, NO_METHOD)
    return out


def node_tags(node: Any, methods: Mapping[str, str]) -> dict[str, str]:
    """The grouping tags of ``node``'s run (those that apply; see the module docstring)."""
    tags = {KIND: node.kind}
    if node.row is not None:
        tags[ROW] = node.row
        tags[METHOD] = methods.get(node.row, NO_METHOD)
    if node.unlearn_seed is not None:
        tags[UNLEARNING_SEED] = str(node.unlearn_seed)
    if node.threat is not None:
        tags[THREAT] = node.threat
    if node.seed is not None and node.kind in ("attack", "evaluate"):
        tags[ATTACK_SEED] = str(node.seed)
    if node.step is not None and node.kind in ("attack", "evaluate"):
        tags[ATTACK_STEP] = str(node.step)
    return tags


_KIND_WORD = {"evaluate": "eval"}


def varying_fields(graph: Iterable[Any]) -> dict[str, set[str]]:
    """Per node kind, which of ``unlearn_seed``, ``threat``, ``seed`` take more than one
    value among the graph's nodes of that kind: the parts a run name must show."""
    seen: dict[str, dict[str, set[Any]]] = {}
    for n in graph:
        per = seen.setdefault(n.kind, {"unlearn_seed": set(), "threat": set(), "seed": set()})
        for f in per:
            if getattr(n, f) is not None:  # rows without unlearning, evaluations before attack
                per[f].add(getattr(n, f))
    return {k: {f for f, vals in per.items() if len(vals) > 1} for k, per in seen.items()}


def threat_labels(graph: Iterable[Any]) -> dict[str, str]:
    """Threat name → the shortest prefix that no other threat of ``graph`` starts with, for
    run names: the demo's ``poison5_adam_3e-4`` and ``benign_adam_3e-4`` become ``p`` and
    ``b`` (with the full names, ``original poison5_adam_3e-4 a1 @25`` is 33 characters, past
    the ~18 that MLflow's Run Name column shows). The full name is the ``resalign.threat``
    tag."""
    names = sorted({n.threat for n in graph if getattr(n, "threat", None) is not None})
    out = {}
    for name in names:
        others = [o for o in names if o != name]
        k = 1
        while k < len(name) and any(o.startswith(name[:k]) for o in others):
            k += 1
        out[name] = name[:k]
    return out


def run_name(
    node: Any,
    varying: Mapping[str, set[str]] | None = None,
    threats: Mapping[str, str] | None = None,
) -> str:
    """A short run name, its distinguishing part first, so MLflow's default Run Name column
    (about 18 characters before the ellipsis in MLflow 3.17) shows it: ``<row> [u<unlearning
    seed>] [<threat>] [a<attack seed>] @<step> <kind>``, e.g. ``plain a2 @50 eval``,
    ``resalign u0 unlearn``, ``original pre eval``. The unlearning seed, threat and attack
    seed appear only where they vary among the graph's nodes of that kind (``varying``,
    :func:`varying_fields`; all of them when None); the full node name is the
    ``resalign.node.name`` tag. Nodes without a row (``model``, ``harvest/<dataset>``,
    ``report``, a search's nodes) keep their name with ``/`` as a space."""
    if node.row is None or node.kind not in ("unlearn", "attack", "evaluate"):
        return node.name.replace("/", " ")
    show = varying.get(node.kind, set()) if varying is not None else None
    parts = [node.row]

    def shown(field: str) -> bool:
        return show is None or field in show

    if node.unlearn_seed is not None and shown("unlearn_seed"):
        parts.append(f"u{node.unlearn_seed}")
    if node.kind != "unlearn":
        if node.threat is None:
            parts.append("pre")
        else:
            if shown("threat"):
                parts.append((threats or {}).get(node.threat, node.threat))
            if node.seed is not None and shown("seed"):
                parts.append(f"a{node.seed}")
            parts.append(f"@{node.step}")
    parts.append(_KIND_WORD.get(node.kind, node.kind))
    return " ".join(parts)


def _used(params: Any, parent_key: str = "") -> Any:
    """``params`` without the LoRA fields of what is not LoRA: a trainable selection
    (``kind``) that is not ``lora`` loses rank/alpha/targets/init (and a ``lora`` one its
    ``modules``); a fine-tune (``algorithm``) that reads no LoRA loses its ``lora`` block
    (attacks read it for ``lora`` only, simulated fine-tunes for ``lora`` and ``dreambooth``)."""
    if not isinstance(params, Mapping):
        return params
    out = {k: _used(v, k) for k, v in params.items()}
    kind = out.get("kind")
    if "targets" in out and "rank" in out and kind in ("lora", "full", "modules"):
        drop = ("modules",) if kind == "lora" else _LORA_SELECTION
        if kind == "full":
            drop += ("modules",)
        for k in drop:
            out.pop(k, None)
    algo = out.get("algorithm")
    if isinstance(algo, str) and "lora" in out:
        reads = _LORA_INNER if parent_key not in ("threat",) else ("lora",)
        if algo not in reads:
            out.pop("lora")
    return out


def node_params(node: Any) -> dict[str, str]:
    """The flat params of ``node``'s run: what it used (see the module docstring)."""
    from ...graph.keys import key_params

    return flatten(_used(key_params(node.kind, node.params)))
