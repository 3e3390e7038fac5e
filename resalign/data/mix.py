"""Poison mixes: a benign set with a ratio of its items replaced by harmful pairs."""

from __future__ import annotations

import numpy as np


def poison_plan(n_base: int, n_poison: int, ratio: float, seed: int) -> list[tuple[int, int]]:
    """Which items to replace: ``round(ratio·n_base)`` pairs ``(base position, poison item)``.

    Positions are drawn without replacement; poison items without replacement while they
    last (then cycling through a fresh permutation). Deterministic in ``seed``.
    """
    k = int(round(ratio * n_base))
    if k == 0:
        return []
    if n_poison == 0:
        raise ValueError("the poison set is empty")
    rng = np.random.default_rng(seed)
    positions = rng.choice(n_base, size=k, replace=False)
    reps = -(-k // n_poison)
    items = np.concatenate([rng.permutation(n_poison) for _ in range(reps)])[:k]
    return [(int(p), int(i)) for p, i in zip(positions, items)]
