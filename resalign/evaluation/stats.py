"""Statistics of the report: intervals over seeds, paired differences, relearning summaries.

Units. A post-fine-tuning cell of a row that unlearns aggregates one value per (unlearning
seed, attack seed) pair; a pre-fine-tuning cell one value per unlearning seed; a row without
unlearning (``original``) one value per attack seed (pre: its single evaluation). Units are
treated as independent draws, although pairs that share an unlearning seed share its
unlearned model: with few unlearning seeds that interval is optimistic about the between-seed
spread. Paired differences therefore also carry ``by_unlearn_seed``: the mean over each
unlearning seed's attack seeds, then a t-interval over the unlearning seeds (the conservative
one; it needs ≥ 2 unlearning seeds, and with 2–3 it is wide).

Intervals. Mean and a two-sided 95 % Student-t interval (n − 1 degrees of freedom). For rate
metrics (fractions of images, in [0, 1]) the interval is clipped to [0, 1], and the paired
difference of two rates to [−1, 1]: the t-interval is kept because a percentile bootstrap
over 2–6 units is narrower than the data justify (it cannot be wider than the sample's range).

Relearning over a whole attack (per row, threat and unit): ``area`` is the trapezoid area under
the metric against the attack step over [0, last evaluated step], with step 0 the unit's
pre-fine-tuning value, divided by the last step (so a rate's area lies in [0, 1]); ``first``
is the first evaluated step (0 included) at which the metric exceeds half of the original
model's pre-fine-tuning value, or None when it never does within the attack (censored at the
last step). Every unit is censored at the same step, so the lower median over units is a
well-defined step or "> last".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

# Metrics that are fractions of images or prompts: their values lie in [0, 1].
RATE_METRICS = frozenset({"concept_rate", "retain_accuracy", "nudenet_ip", "mhsc_us", "q16_rate"})

Unit = tuple[int | None, int | None]  # (unlearning seed, attack seed)


def t_half_width(values: Sequence[float], level: float = 0.95) -> float | None:
    """Half-width of the two-sided Student-t interval of the mean (None for n < 2)."""
    n = len(values)
    if n < 2:
        return None
    from scipy import stats

    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return float(stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n))


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float | None]:
    """Mean and the half-width of the t confidence interval of the mean (None for n < 2)."""
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), None
    return sum(vals) / len(vals), t_half_width(vals, level)


def summary(values: Sequence[float], bounds: tuple[float, float] | None = None) -> dict[str, Any]:
    """``{"mean", "ci95", "lo", "hi", "n", "values"}``: ``ci95`` the t half-width, ``lo``/``hi``
    the interval clipped to ``bounds`` (None: unclipped; both None for n < 2)."""
    vals = [float(v) for v in values]
    mean, half = mean_ci(vals)
    lo = hi = None
    if half is not None:
        lo, hi = mean - half, mean + half
        if bounds is not None:
            lo, hi = min(max(lo, bounds[0]), bounds[1]), min(max(hi, bounds[0]), bounds[1])
    return {
        "mean": mean if vals else None,
        "ci95": half,
        "lo": lo,
        "hi": hi,
        "n": len(vals),
        "values": vals,
    }


def bounds_of(metric: str, difference: bool = False) -> tuple[float, float] | None:
    """The range a value (or a difference of two values) of ``metric`` can take."""
    if metric not in RATE_METRICS:
        return None
    return (-1.0, 1.0) if difference else (0.0, 1.0)


def by_unlearn_seed(
    diffs: Mapping[Unit, float], bounds: tuple[float, float] | None
) -> dict[str, Any] | None:
    """The conservative interval: each unlearning seed's differences averaged over its attack
    seeds, then the t-interval over the k unlearning seeds (k − 1 degrees of freedom). Pairs
    that share an unlearning seed share its unlearned model, so they are not independent; this
    interval does not assume they are. None when the units carry no unlearning seed or all
    share one (then only the unit interval exists)."""
    groups: dict[int, list[float]] = {}
    for (u, _), d in diffs.items():
        if u is None:
            return None
        groups.setdefault(u, []).append(d)
    if len(groups) < 2:
        return None
    out = summary([sum(v) / len(v) for v in groups.values()], bounds)
    out["seeds"] = sorted(groups)
    return out


def paired(
    a: Mapping[Unit, float], b: Mapping[Unit, float], bounds: tuple[float, float] | None
) -> dict[str, Any]:
    """Summary of a − b over the units both have (same unlearning and attack seed), with
    ``by_unlearn_seed``: the same difference with its interval over unlearning seeds."""
    units = [u for u in a if u in b]
    diffs = {u: a[u] - b[u] for u in units}
    out = summary(list(diffs.values()), bounds)
    out["units"] = [list(u) for u in units]
    out["by_unlearn_seed"] = by_unlearn_seed(diffs, bounds)
    return out


def area_under(points: Sequence[tuple[int, float]]) -> float:
    """Trapezoid area under (step, value) points over [0, last step], divided by the last
    step. ``points`` sorted by step, the first at step 0."""
    if len(points) < 2 or points[0][0] != 0 or points[-1][0] <= 0:
        raise ValueError(f"need points from step 0 to a later step, got {list(points)}")
    area = sum((s1 - s0) * (v0 + v1) / 2 for (s0, v0), (s1, v1) in zip(points, points[1:]))
    return area / points[-1][0]


def first_exceeding(
    points: Sequence[tuple[int | float, float]], threshold: float
) -> int | float | None:
    """The first step (or x position: a perturb threat's radius) whose value exceeds
    ``threshold``, as given; None when none does (censored)."""
    for step, v in points:
        if v > threshold:
            return step
    return None


def lower_median(values: Sequence[int | None]) -> int | None:
    """Lower median with None (censored at the last step) ranked above every step; None
    when the lower median is censored."""
    if not values:
        return None
    ranked = sorted(values, key=lambda v: (v is None, v or 0))
    return ranked[(len(ranked) - 1) // 2]


def first_step_summary(values: Sequence[int | None], last: int) -> dict[str, Any]:
    """``{"median", "relearned", "n", "last_step", "values"}`` of first-relearn steps."""
    return {
        "median": lower_median(values),
        "relearned": sum(v is not None for v in values),
        "n": len(values),
        "last_step": last,
        "values": list(values),
    }


def paired_first(a: Mapping[Unit, int | None], b: Mapping[Unit, int | None]) -> dict[str, Any]:
    """Paired comparison of first-relearn steps (a against b, same units): how many pairs
    relearn later in a (a censored and b not counts as later), earlier, or tie (both
    censored, or the same step), and the two-sided exact sign-test p over untied pairs."""
    later = earlier = tied = 0
    units = [u for u in a if u in b]
    inf = float("inf")
    for u in units:
        x = inf if a[u] is None else a[u]
        y = inf if b[u] is None else b[u]
        later += x > y
        earlier += x < y
        tied += x == y
    p = None
    if later + earlier:
        from scipy import stats

        p = float(stats.binomtest(later, later + earlier, 0.5).pvalue)
    return {
        "later": later,
        "earlier": earlier,
        "tied": tied,
        "n": len(units),
        "sign_test_p": p,
        "units": [list(u) for u in units],
    }


def interpolate(xs: Sequence[float], ys: Sequence[float], at: Sequence[float]) -> list[float]:
    """Piecewise-linear y(x) through the points (x sorted; ys of equal xs averaged)."""
    by_x: dict[float, list[float]] = {}
    for x, y in zip(xs, ys):
        by_x.setdefault(float(x), []).append(float(y))
    px = sorted(by_x)
    py = [sum(by_x[x]) / len(by_x[x]) for x in px]
    out = []
    for q in at:
        if q <= px[0]:
            out.append(py[0])
            continue
        if q >= px[-1]:
            out.append(py[-1])
            continue
        i = next(k for k in range(1, len(px)) if px[k] >= q)
        w = (q - px[i - 1]) / (px[i] - px[i - 1])
        out.append(py[i - 1] + w * (py[i] - py[i - 1]))
    return out


def mean_gap_over_common_range(
    a: tuple[Sequence[float], Sequence[float]], b: tuple[Sequence[float], Sequence[float]]
) -> tuple[float, tuple[float, float]] | None:
    """Mean over x of a(x) − b(x) on the x range both curves span (each curve piecewise linear
    through its (xs, ys) points), and that range; None when the ranges do not overlap (or a
    curve spans a single x). Exact: the difference is linear between the union of both
    curves' x points, so the trapezoid rule on those points integrates it without error."""
    lo = max(min(a[0]), min(b[0]))
    hi = min(max(a[0]), max(b[0]))
    if not hi > lo:
        return None
    at = sorted({lo, hi} | {float(x) for x in (*a[0], *b[0]) if lo < x < hi})
    d = [p - q for p, q in zip(interpolate(*a, at), interpolate(*b, at))]
    area = sum((x1 - x0) * (d0 + d1) / 2 for x0, x1, d0, d1 in zip(at, at[1:], d, d[1:]))
    return area / (hi - lo), (lo, hi)


# ----------------------------------------------------------------------------- proportions


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float] | None:
    """The exact (Clopper–Pearson) two-sided interval of a binomial proportion k/n: the
    beta quantiles, 0 and 1 at the ends. Never outside [0, 1]; None for n = 0."""
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"k = {k} is not within 0..{n}")
    from scipy import stats

    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(stats.beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def proportion(flags: Sequence[bool], level: float = 0.95) -> dict[str, Any]:
    """``{"k", "n", "share", "lo", "hi"}``: how many of ``flags`` are true, with the exact
    binomial interval of the share (None for n = 0)."""
    n, k = len(flags), sum(bool(f) for f in flags)
    ci = clopper_pearson(k, n, level)
    return {
        "k": k,
        "n": n,
        "share": k / n if n else None,
        "lo": ci[0] if ci else None,
        "hi": ci[1] if ci else None,
    }


def exact_mcnemar(a: Mapping[Any, bool], b: Mapping[Any, bool], level: float = 0.95) -> dict:
    """The paired comparison of two proportions over the keys both have (here: unlearning
    seeds, one unlearned model each per row): ``a_only`` (true for a, false for b) and
    ``b_only`` are the discordant pairs; ``p`` the two-sided exact McNemar p-value (the
    binomial test of a_only among the m = a_only + b_only discordant pairs at 1/2; 1.0 when
    m = 0); ``diff`` = (a_only − b_only)/n, the difference of the two shares; ``lo``/``hi``
    its interval conditional on m (the Clopper–Pearson interval of a_only/m mapped through
    diff = (2π − 1)·m/n; [0, 0] when m = 0, i.e. no evidence either way and no spread)."""
    keys = [k for k in a if k in b]
    n = len(keys)
    a_only = sum(1 for k in keys if a[k] and not b[k])
    b_only = sum(1 for k in keys if b[k] and not a[k])
    m = a_only + b_only
    out: dict[str, Any] = {
        "n": n,
        "a_only": a_only,
        "b_only": b_only,
        "both": sum(1 for k in keys if a[k] and b[k]),
        "neither": sum(1 for k in keys if not a[k] and not b[k]),
        "diff": (a_only - b_only) / n if n else None,
        "p": 1.0,
        "lo": None,
        "hi": None,
        "keys": keys,
    }
    if not n:
        return out
    if m:
        from scipy import stats

        out["p"] = float(stats.binomtest(a_only, m, 0.5).pvalue)
        lo, hi = clopper_pearson(a_only, m, level) or (0.0, 1.0)
        out["lo"], out["hi"] = (2 * lo - 1) * m / n, (2 * hi - 1) * m / n
    else:
        out["lo"] = out["hi"] = 0.0
    return out
