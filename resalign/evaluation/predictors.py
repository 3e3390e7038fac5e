"""What predicts resurgence (issue 26, "what decides resurgence"): per property of an
unlearned model, how well it separates the models that resurged from those that did not.

A **predictor** (:class:`Predictor`) is a mapping model → value, a model being ``(row,
unlearning seed)`` (:data:`ModelId`; ``(row, None)`` for a control row). The probe nodes give
them (:func:`predictors_from_probes`: each quantity measured before fine-tuning, and for
quantities probed along an attack, their value after each evaluated step and its change from
before, averaged over attack seeds); other sources (e.g. a perturbation probe's concept rate
at a radius) add :class:`Predictor` objects of their own to the list given to
:func:`predictor_table`.

For each safety metric, threat and **group** of models (each method row; ``pooled``: every
method row together, since the question is what property of an unlearned model predicts its
resurgence whatever the method) and each predictor, with the resurgence of each model from
the report's resurgence table (:mod:`.resurgence`):

- **AUC** = U / (n₁·n₀), U the Mann–Whitney statistic of the resurged models' values against
  the others' (ties count ½): the probability that a resurged model has the larger value. 0.5
  is no separation; below 0.5 the smaller value goes with resurgence. Its two-sided **exact
  p** is the permutation distribution of the rank sum (midranks, so ties are handled),
  counted exactly by dynamic programming (:func:`rank_sum_test`);
- **point-biserial r**: the Pearson correlation of the value with the resurged flag (its
  t-test p);
- **Spearman ρ** of the value with the model's relearning area (mean over attack seeds), with
  its p and the n of models that have an area.

Caveats written with the table: the pooled group mixes methods, so a property that merely
differs between methods can separate the pooled models when one method resurges more; and
with several predictors, the count below the Bonferroni line is the one to read.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..errors import UserError
from .figure import save_png
from .store_read import completed_folders, stored_location

ModelId = tuple[str, "int | None"]  # (row, unlearning seed; None for a control row)
POOLED = "pooled"
PROBE_FILE = "probe.json"  # the probe step's output (resalign.steps.probe.PROBE_FILE)


# ----------------------------------------------------------------------------- probe results


@dataclass(frozen=True)
class ProbeResult:
    """One probe node's values. ``threat``/``seed``/``step`` are None for the probe before
    fine-tuning; ``unlearn_seed`` None for rows without unlearning."""

    row: str
    unlearn_seed: int | None
    threat: str | None
    seed: int | None
    step: int | None
    values: Mapping[str, float]
    folder: Path


# (row, unlearning seed, threat, attack seed, step): where a probe node sits, as its Node has it
ProbeLocation = tuple[str, "int | None", "str | None", "int | None", "int | None"]

_PROBE_NAME = re.compile(
    r"^probe/(?P<row>.+?)(?:/seed(?P<useed>-?\d+))?"
    r"/(?:pre|(?P<threat>[^/]+)/seed(?P<seed>-?\d+)/step(?P<step>\d+))$"
)


def parse_probe_name(name: str) -> ProbeLocation:
    """``probe/<row>[/seed<u>]/pre`` or ``probe/<row>[/seed<u>]/<threat>/seed<a>/step<n>``
    (:meth:`resalign.graph.compile._Compiler.probes`) → (row, u, threat, a, n). Only for a
    stored node whose ``node.json`` does not record its location."""
    m = _PROBE_NAME.match(name)
    if m is None:
        raise ValueError(f"not a probe node name: {name!r}")

    def num(g: str) -> int | None:
        return None if m.group(g) is None else int(m.group(g))

    return m["row"], num("useed"), m["threat"], num("seed"), num("step")


def read_probe(name: str, loc: ProbeLocation, folder: Path) -> ProbeResult:
    """The probe node ``name``'s result in ``folder``; ``loc`` is where the node sits, (row,
    unlearning seed, threat, attack seed, step) as its ``Node`` has them."""
    path = Path(folder) / PROBE_FILE
    if not path.is_file():
        raise UserError(f"{name}: no {PROBE_FILE} in {folder}", where=str(folder))
    record = json.loads(path.read_text("utf-8"))
    values = {k: float(v) for k, v in record["values"].items()}
    return ProbeResult(*loc, values, Path(folder))


def _node_location(node: Any) -> ProbeLocation:
    return node.row, node.unlearn_seed, node.threat, node.seed, node.step


def probe_results_from_dirs(dirs: Mapping[str, Path]) -> list[ProbeResult]:
    """Results of stored probe nodes given as ``{node name: output folder}`` (the report
    step's inputs), located as their ``node.json`` records it, else by their name
    (:func:`resalign.evaluation.store_read.stored_location` says which nodes need that)."""
    out = []
    for n, p in dirs.items():
        stored = stored_location(p)
        loc = parse_probe_name(n) if stored is None else _node_location(SimpleNamespace(**stored))
        out.append(read_probe(n, loc, p))
    return out


def probe_results_from_store(
    graph: Any,
    store_root: Path,
    spec_path: str = "SPEC",
    complete: Callable[[str, str], bool] | None = None,
) -> list[ProbeResult]:
    """Results of every probe node of ``graph`` from ``store_root``, each located by its
    :class:`~resalign.graph.nodes.Node`, like
    :func:`resalign.evaluation.report.results_from_store` for evaluate nodes (``complete``:
    the store's completeness test); a missing one is a :class:`UserError` naming them."""
    found = completed_folders(graph, store_root, "probe", PROBE_FILE, "probe", spec_path, complete)
    return [read_probe(n, _node_location(graph[n]), p) for n, p in found.items()]


# ----------------------------------------------------------------------------- predictors


@dataclass(frozen=True)
class Predictor:
    """A property of each model: ``values`` maps :data:`ModelId` → value. ``threat``: only
    tested against resurgence under that threat (a value measured along its attack); None:
    a property of the model before fine-tuning, tested under every threat."""

    name: str
    values: Mapping[ModelId, float]
    threat: str | None = None
    description: str = ""
    # the threat it was measured under, if any (a perturbation probe's radius): never tested
    # against resurgence under that same threat, which it would restate
    source: str | None = None


def perturb_predictors(
    results: Sequence[Any], threats: Mapping[str, Mapping[str, Any]], metrics: Sequence[str]
) -> list[Predictor]:
    """The neighbourhood probe as predictors (issue 20, point 2): for each perturbation
    threat (meta ``radii``; step k is its k-th radius) and safety metric, each model's value at
    each radius, averaged over the threat's seeds (directions): a property of the unlearned
    model, measured without fine-tuning, tested against resurgence under every other threat.
    ``results``: the report's :class:`resalign.evaluation.report.EvalResult` objects."""
    out = []
    for t, meta in threats.items():
        radii = meta.get("radii")
        if not radii:
            continue
        for metric in metrics:
            for k, r in enumerate(radii, start=1):
                per: dict[ModelId, list[float]] = {}
                for res in results:
                    if res.threat == t and res.step == k and metric in res.metrics:
                        mid: ModelId = (res.row, res.unlearn_seed)
                        per.setdefault(mid, []).append(float(res.metrics[metric]["value"]))
                if per:
                    out.append(
                        Predictor(
                            f"{metric} at radius {float(r):g} ({t})",
                            {m: sum(v) / len(v) for m, v in per.items()},
                            None,
                            "perturbation probe, mean over directions",
                            source=t,
                        )
                    )
    return out


def predictors_from_probes(probes: Sequence[ProbeResult]) -> list[Predictor]:
    """The probes' predictors: every quantity before fine-tuning (its name), and for each
    quantity probed along an attack, per threat and evaluated step ``n``: ``<q> at step n``
    (mean over attack seeds) and, where it was also probed before, ``Δ<q> to step n``
    (that mean minus the value before)."""
    pre: dict[str, dict[ModelId, float]] = {}
    along: dict[tuple[str, int, str], dict[ModelId, list[float]]] = {}
    for p in probes:
        mid: ModelId = (p.row, p.unlearn_seed)
        for q, v in p.values.items():
            if p.threat is None:
                pre.setdefault(q, {})[mid] = v
            else:
                along.setdefault((p.threat, int(p.step or 0), q), {}).setdefault(mid, []).append(v)
    out = [Predictor(q, vals, None, "before fine-tuning") for q, vals in pre.items()]
    for (threat, step, q), per in sorted(along.items()):
        means = {m: sum(v) / len(v) for m, v in per.items()}
        out.append(Predictor(f"{q} at step {step}", means, threat, "mean over attack seeds"))
        if q in pre:
            delta = {m: v - pre[q][m] for m, v in means.items() if m in pre[q]}
            out.append(Predictor(f"Δ{q} to step {step}", delta, threat, "minus before"))
    return out


# ----------------------------------------------------------------------------- statistics


def _midranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def rank_sum_test(positive: Sequence[float], negative: Sequence[float]) -> dict[str, Any]:
    """Mann–Whitney of ``positive`` against ``negative``: ``u`` (pairs where the positive is
    larger, ties ½), ``auc`` = u / (n₁·n₀), and ``p``: the two-sided exact permutation p-value
    P(|U − n₁n₀/2| ≥ |u − n₁n₀/2|) under random assignment of the n₁ labels to the pooled
    values, counted exactly: a dynamic program over subsets of the doubled midranks (integers)
    by size and sum, so ties are handled and no normal approximation is made. Empty side:
    ``auc`` and ``p`` None."""
    n1, n0 = len(positive), len(negative)
    out: dict[str, Any] = {"n1": n1, "n0": n0, "u": None, "auc": None, "p": None}
    if not n1 or not n0:
        return out
    u = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in positive for b in negative)
    ranks2 = [int(round(2 * r)) for r in _midranks([*positive, *negative])]
    n = n1 + n0
    import numpy as np

    # counts[k, s]: subsets of size k of the items so far with doubled-rank sum s (float64:
    # exact below 2**53, relative error ~1e-16 beyond, far below any p-value's precision)
    top = sum(sorted(ranks2)[-n1:])
    counts = np.zeros((n1 + 1, top + 1))
    counts[0, 0] = 1.0
    for r in ranks2:
        counts[1:, r:] += counts[:-1, : top + 1 - r].copy()
    observed = sum(ranks2[:n1])
    centre = n1 * (n + 1)  # E[doubled rank sum of the positives]
    sums = np.arange(top + 1)
    tail = float(counts[n1][np.abs(sums - centre) >= abs(observed - centre)].sum())
    total = float(counts[n1].sum())  # = C(n, n1)
    out.update(u=u, auc=u / (n1 * n0), p=min(1.0, tail / total))
    return out


def _corr(kind: str, x: Sequence[float], y: Sequence[float]) -> tuple[float | None, float | None]:
    """(r, p) of scipy's pearsonr / spearmanr; None where undefined (n < 3, constant)."""
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None, None
    from scipy import stats

    res = stats.pearsonr(x, y) if kind == "pearson" else stats.spearmanr(x, y)
    r, p = float(res[0]), float(res[1])
    return (r, p) if math.isfinite(r) else (None, None)


def separation(
    models: Sequence[tuple[ModelId, bool, float | None]], values: Mapping[ModelId, float]
) -> dict[str, Any]:
    """The statistics of one predictor on one group: ``models`` are (model, resurged, area)
    (area None when the model has none); models without a value are left out."""
    have = [(m, f, a, float(values[m])) for m, f, a in models if m in values]
    pos = [v for _, f, _, v in have if f]
    neg = [v for _, f, _, v in have if not f]
    test = rank_sum_test(pos, neg)
    r_pb, p_pb = _corr("pearson", [v for *_, v in have], [1.0 if f else 0.0 for _, f, _, _ in have])
    with_area = [(v, a) for _, _, a, v in have if a is not None]
    rho, p_rho = _corr("spearman", [v for v, _ in with_area], [a for _, a in with_area])
    return {
        "n": len(have),
        "n_resurged": len(pos),
        "auc": test["auc"],
        "u": test["u"],
        "p": test["p"],
        "r_pb": r_pb,
        "p_pb": p_pb,
        "rho": rho,
        "p_rho": p_rho,
        "n_area": len(with_area),
        "mean_resurged": sum(pos) / len(pos) if pos else None,
        "mean_not": sum(neg) / len(neg) if neg else None,
        "points": [
            {"row": m[0], "unlearn_seed": m[1], "resurged": f, "area": a, "value": v}
            for m, f, a, v in have
        ],
    }


# ----------------------------------------------------------------------------- the table


@dataclass
class PredictorTable:
    """Every (metric, threat, group, predictor) entry, and the groups' summaries."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    summaries: list[dict[str, Any]] = field(default_factory=list)


def predictor_table(
    resurgence: Sequence[Mapping[str, Any]],
    predictors: Sequence[Predictor],
    controls: Sequence[str] = ("original", "oracle"),
    alpha: float = 0.05,
) -> PredictorTable:
    """For each (metric, threat) of the report's resurgence entries and each group (each
    method row, then ``pooled`` when there are several), the :func:`separation` of every
    predictor that applies to the threat; a control row's value is shown beside it
    (``controls``: the report's control rows). Each group's summary: the predictor of the
    largest |AUC − ½| and how many have exact p < ``alpha`` and < ``alpha``/k (Bonferroni over
    the k predictors with an AUC)."""
    by_threat: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for e in resurgence:
        if e.get("threshold") is not None:
            by_threat.setdefault((e["metric"], e["threat"]), []).append(e)
    table = PredictorTable()
    for (metric, threat), entries in by_threat.items():
        methods = [e for e in entries if e["row"] not in controls]
        groups = [(e["row"], [e]) for e in methods]
        if len(methods) > 1:
            groups.append((POOLED, methods))
        control_models = {
            (e["row"], m) for e in entries if e["row"] in controls for m in e["models"]
        }
        for group, es in groups:
            models = [
                ((e["row"], m), bool(v["resurged"]), v.get("area"))
                for e in es
                for m, v in e["models"].items()
            ]
            rows = [e["row"] for e in es]
            done = []
            for pred in predictors:
                if pred.threat is not None and pred.threat != threat:
                    continue
                if pred.source == threat:
                    continue
                s = separation(models, pred.values)
                if not s["n"]:
                    continue
                s.update(
                    metric=metric,
                    threat=threat,
                    group=group,
                    rows=rows,
                    predictor=pred.name,
                    description=pred.description,
                    controls={f"{r}": pred.values[(r, m)] for r, m in sorted(control_models,
                              key=str) if (r, m) in pred.values},
                )  # fmt: skip
                table.entries.append(s)
                done.append(s)
            table.summaries.append(_summary(metric, threat, group, rows, models, done, alpha))
    return table


def _summary(
    metric: str,
    threat: str,
    group: str,
    rows: Sequence[str],
    models: Sequence[tuple[ModelId, bool, float | None]],
    done: Sequence[Mapping[str, Any]],
    alpha: float,
) -> dict[str, Any]:
    tested = [s for s in done if s["auc"] is not None]
    best = max(tested, key=lambda s: abs(s["auc"] - 0.5), default=None)
    k = len(tested)
    return {
        "metric": metric,
        "threat": threat,
        "group": group,
        "rows": list(rows),
        "n": len(models),
        "n_resurged": sum(1 for _, f, _ in models if f),
        "tested": k,
        "best": None if best is None else best["predictor"],
        "best_auc": None if best is None else best["auc"],
        "best_p": None if best is None else best["p"],
        "below_alpha": sum(1 for s in tested if s["p"] < alpha),
        "below_bonferroni": sum(1 for s in tested if s["p"] < alpha / k) if k else 0,
        "alpha": alpha,
    }


def _f(v: float | None, digits: int = 3, sign: bool = False) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
        return f"{v:+.3g}" if sign else f"{v:.3g}"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def _p(p: float | None) -> str:
    """A p-value: three decimals, or two significant digits below 0.001."""
    if p is None or not math.isfinite(p):
        return "–"
    return f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}"


def summary_sentence(s: Mapping[str, Any]) -> str:
    """One group's result in words."""
    who = s["group"] if s["group"] != POOLED else f"pooled ({', '.join(s['rows'])})"
    head = f"{who}, {s['threat']}: n = {s['n']} models, {s['n_resurged']} resurged ({s['metric']})"
    if not s["tested"]:
        return head + "; no predictor can be tested (every model on one side)."
    bonf = s["alpha"] / s["tested"]
    return (
        f"{head}; the strongest separation is {s['best']} (AUC {_f(s['best_auc'], 2)}, exact "
        f"p = {_p(s['best_p'])}); {s['below_alpha']} of {s['tested']} predictors have "
        f"p < {s['alpha']:g}, {s['below_bonferroni']} below the Bonferroni line "
        f"{s['alpha']:g}/{s['tested']} = {bonf:.3g}."
    )


def predictor_markdown(table: PredictorTable) -> str:
    """The predictor table (one line per group and predictor) and the groups' sentences."""
    lines = [
        "| threat | models | predictor | n (resurged) | AUC (exact p) | point-biserial r (p) | "
        "Spearman ρ with area (p, n) | mean resurged / not | control rows |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in table.entries:
        ctrl = ", ".join(f"{r} {_f(v)}" for r, v in s["controls"].items()) or "–"
        lines.append(
            f"| {s['threat']} | {s['group']} | {s['predictor']} | {s['n']} ({s['n_resurged']}) "
            f"| {_f(s['auc'], 2)} ({_p(s['p'])}) | {_f(s['r_pb'], 2, True)} "
            f"({_p(s['p_pb'])}) | {_f(s['rho'], 2, True)} ({_p(s['p_rho'])}, "
            f"{s['n_area']}) | {_f(s['mean_resurged'])} / {_f(s['mean_not'])} | {ctrl} |"
        )
    out = "\n".join(lines)
    sentences = [f"- {summary_sentence(s)}" for s in table.summaries]
    return out + ("\n\n" + "\n".join(sentences) if sentences else "")


def predictor_note() -> str:
    return (
        "Predictors: properties of each unlearned model (probe nodes: before fine-tuning, "
        "and along an attack where probed there), tested against whether the model resurged "
        "(the resurgence table's definition). AUC = U/(n₁·n₀), the chance that a resurged "
        "model has the larger value (0.5: no separation; < 0.5: smaller values resurge), "
        "two-sided exact permutation p of the rank sum (ties as midranks). Point-biserial r: "
        "Pearson correlation with the resurged flag; Spearman ρ: with the model's relearning "
        "area (mean over attack seeds). 'pooled' puts every method row's models together: a "
        "property that differs between methods separates them when one method resurges "
        "more, so read it with the per-row lines. Several predictors are tested: count the "
        "ones below the Bonferroni line, not below 0.05. predictors.png: each predictor "
        "against the relearning area, filled red = resurged."
    )


def plot_predictors(table: PredictorTable, path: Path, max_panels: int = 12) -> bool:
    """One scatter panel per predictor (pooled group, or the single row, of the first metric
    and each threat): value against relearning area, filled red = resurged, a marker per
    row, AUC in the title. Returns False when no point has an area."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {(s["metric"], s["threat"]): s["group"] for s in table.entries}
    first_metric = next(iter(groups), (None, None))[0]
    panels = [
        s
        for s in table.entries
        if s["metric"] == first_metric
        and s["group"] == groups[(s["metric"], s["threat"])]
        and any(p["area"] is not None for p in s["points"])
    ][:max_panels]
    if not panels:
        return False
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.1 * nrows), squeeze=False)
    markers = "osD^vP*X"
    row_marker: dict[str, str] = {}
    for ax, s in zip(axes.flat, panels):
        for p in s["points"]:
            if p["area"] is None:
                continue
            mk = row_marker.setdefault(p["row"], markers[len(row_marker) % len(markers)])
            red = p["resurged"]
            ax.plot(p["value"], p["area"], mk, ms=5, color="tab:red" if red else "tab:blue",
                    mfc="tab:red" if red else "none", alpha=0.85)  # fmt: skip
        ax.set_xlabel(s["predictor"], fontsize=8)
        ax.set_ylabel(f"relearning area ({s['threat']})", fontsize=7)
        ax.set_title(f"{s['group']}: AUC {_f(s['auc'], 2)}, p {_p(s['p'])}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles = [
        plt.Line2D([], [], marker=m, ls="", color="gray", mfc="none", label=r)
        for r, m in row_marker.items()
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    save_png(fig, path, rect=(0, 0.06, 1, 1))
    return True


def predictor_section(
    table: dict[str, Any], predictors: Sequence[Predictor], out: Path, controls: Sequence[str]
) -> tuple[str, str]:
    """Compute the predictor table from the report's ``table["resurgence"]``, store it as
    ``table["predictors"]`` (entries and summaries), draw ``predictors.png``; returns the
    markdown and HTML sections (empty when nothing could be tested)."""
    import html

    pt = predictor_table(table.get("resurgence") or [], predictors, controls)
    table["predictors"] = {"entries": pt.entries, "summaries": pt.summaries}
    if not pt.entries:
        return "", ""
    has_plot = plot_predictors(pt, Path(out) / "predictors.png")
    title = "## What predicts resurgence"
    md = "\n".join(
        [title, "", predictor_markdown(pt), "", predictor_note(), ""]
        + (["![predictors](predictors.png)", ""] if has_plot else [])
    )
    page = (
        "<h2>What predicts resurgence</h2>"
        f"<pre>{html.escape(predictor_markdown(pt))}</pre>"
        f"<p>{html.escape(predictor_note())}</p>"
        + ("<img src='predictors.png'>" if has_plot else "")
    )
    return md, page


__all__ = [
    "ModelId",
    "POOLED",
    "Predictor",
    "PredictorTable",
    "ProbeResult",
    "parse_probe_name",
    "plot_predictors",
    "predictor_markdown",
    "predictor_section",
    "predictor_table",
    "predictors_from_probes",
    "probe_results_from_dirs",
    "probe_results_from_store",
    "rank_sum_test",
    "read_probe",
    "separation",
]
