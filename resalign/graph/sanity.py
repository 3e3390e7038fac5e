"""Counts no experiment means: step and trial counts above a sanity bound (issue 24).

``steps: 1000000000000`` validates (it is a positive integer) and would run for ever, one
node hogging the machine. :func:`sanity_warnings` lists each step or trial count above
:data:`STEP_BOUND` / :data:`TRIAL_BOUND` with where it is written and the run's estimated
node count; ``validate``, ``plan`` and ``run`` print them as warnings, and ``--strict`` makes
them an error (:func:`check_sanity`). Pure: no torch, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..errors import UserError

# Far above any setting of the paper or the shipped specs (SD unlearning: hundreds of outer
# steps; attacks: up to a few thousand; the digits' pretraining 1,000; searches 20-50 trials)
# and far below what finishes: 10^6 steps of the digits' tiny UNet alone take ~2 days here.
STEP_BOUND = 1_000_000
TRIAL_BOUND = 10_000


def _counts(obj: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], str, int]]:
    """``(path, "steps" | "trials", value)`` of every such integer in a dumped spec."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("steps", "trials"):
                for i, x in enumerate(v if isinstance(v, list) else [v]):
                    if isinstance(x, int) and not isinstance(x, bool):
                        yield (path + (k,) + ((i,) if isinstance(v, list) else ())), k, x
            else:
                yield from _counts(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _counts(v, path + (i,))


def estimated_nodes(resolved: Any, graph: Any) -> int:
    """The graph's nodes plus those its searches would add: per trial one attack and one
    evaluation per attack seed (:func:`.compile.trial_graph`)."""
    from .compile import search_plans

    extra = 0
    for sp in search_plans(resolved):
        threat = resolved.spec.threats[sp.threat]
        extra += threat.search.trials * 2 * max(1, len(threat.seeds or []))
    return len(graph) + extra


def sanity_warnings(resolved: Any, graph: Any) -> list[str]:
    """One line per step or trial count of ``resolved`` above its bound (empty: none)."""
    found = [
        (path, what, value)
        for path, what, value in _counts(resolved.spec.model_dump(mode="python"))
        if value > (STEP_BOUND if what == "steps" else TRIAL_BOUND)
    ]
    if not found:
        return []
    total = estimated_nodes(resolved, graph)
    smap = getattr(resolved, "smap", None)
    out = []
    for path, what, value in found:
        dotted = ".".join(str(p) for p in path)
        pos = smap.position(path) if smap is not None else None
        where = f"{smap.file_of(path)}:{pos[0]}:{pos[1]}" if smap is not None and pos else ""
        bound = STEP_BOUND if what == "steps" else TRIAL_BOUND
        out.append(
            f"{where + ': ' if where else ''}{dotted} = {value:,} is above the sanity bound of "
            f"{bound:,} {what}; the run has an estimated {total:,} node(s)"
            + (
                " (each trial: an attack and an evaluation per attack seed)"
                if what == "trials"
                else ""
            )  # fmt: skip
        )
    return out


def check_sanity(resolved: Any, graph: Any, *, strict: bool, warn: Any) -> None:
    """``warn`` each line of :func:`sanity_warnings`; with ``strict`` raise them as one
    :class:`UserError` instead."""
    lines = sanity_warnings(resolved, graph)
    if not lines:
        return
    if strict:
        raise UserError(
            "\n".join(lines),
            hint="lower the count, or leave out --strict to run it anyway",
        )
    for line in lines:
        warn(f"warning: {line}")
