"""Predict what the nodes still to run will cost, from what recorded nodes cost (issue 25).

Every finished node carries its cost in its ``DONE`` manifest (:mod:`.cost`). For a node to
run, :func:`estimate` takes the recorded nodes of the same kind (and model family) in the
store, and scales their busy time (below) by what drives the cost, a *work* number computed from the
node's params alone (:func:`work`, torch-free):

- ``model``: pretraining steps x batch (``family: tiny`` with ``pretrain``; 0 otherwise: a
  load), times the model's size;
- ``harvest``: 1 (no driver);
- ``unlearn``: outer steps x (1 + J x (mean simulated fine-tuning steps + K)) for a method
  with a resilience term (J ``samples_per_step``; K the hypergradient ``iterations``, 0 for the
  first-order ``none``, the inner steps again for ``unrolled``, whose reverse pass runs back
  through them), outer steps otherwise; times the model's size;
- ``attack``: the segment's steps (``stop`` minus the previous segment's) x batch x
  gradient accumulation; times the model's size;
- ``evaluate``: images per prompt x sampling steps; times the model's size;
- ``report``: the number of evaluations it reads.

"The model's size" is a compute proxy, not a parameter count (which needs the weights):
``sample_size^2 x sum(c^2 for c in block_out_channels) x layers_per_block`` for tiny models,
1 for a loaded family (their history is kept apart by family anyway).

What is fitted is a node's *busy* time, not its wall time as recorded: for a node that ran on
the CPU, ``min(wall_s, cpu_s / threads)``; for one on an accelerator, ``wall_s``. On a shared
CPU the wall time measures the queue: in this project's store, attack segments of the same
work took 6.5 s of wall and 6.0 s of CPU at load < 3 but 107 s of wall and 8.8 s of CPU at
load > 10 (evaluations 10.8 / 10.4 s against 196 / 12.6 s), so a history recorded on a
loaded machine over-predicted an idle run ~6.6x (the one-switch ``meta-benign`` cell: 23 min
estimated, 211 s run). CPU time stays within ~1.3x across loads. The estimate is therefore
the time on an idle machine; :func:`load_note` says how the current load stretches it.

The model, per (kind, family, group): ``seconds = a + b * work`` fitted by least squares to the
recorded nodes (``a, b >= 0``; through the origin when ``a`` would be negative; the mean when
all recorded nodes have the same work or only one is recorded: then ``seconds = mean(seconds /
work) * work``). The range is the prediction times the smallest and largest ratio of
recorded to fitted time. A kind with no recorded node says so and gets no number. The group
(:func:`group`) keeps apart nodes of one kind whose fixed costs differ: for ``unlearn``, a
method with a resilience term from one without. One fit over both put the ResAlign nodes'
intercept on plain's: 10 plain nodes of 5 s each were predicted at 48 s (8 min for 47 s, 10x).
A group with no history falls back to the kind's other groups.
Totals add the nodes' times (serial time; ``--workers N`` overlaps them) and their
ranges. The peak memory shown is the largest recorded for the kind.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..graph.nodes import Graph, Node
from .store import DONE, Store

_STEP = re.compile(r"/step(\d+)$")

DRIVERS = {
    "model": "pretraining steps x batch x model size",
    "harvest": "none (constant)",
    "unlearn": "outer steps x (1 + J x (inner steps + K)) x model size",
    "attack": "segment steps x batch x accumulation x model size",
    "evaluate": "images per prompt x sampling steps x model size",
    "report": "evaluations read",
}


def model_size(model: Mapping[str, Any] | None) -> float:
    """The compute proxy of a model section (see the module docstring)."""
    if not model or model.get("family") != "tiny":
        return 1.0
    t = model.get("tiny") or {}
    chans = t.get("block_out_channels") or [1]
    return float((t.get("sample_size") or 1) ** 2 * sum(c * c for c in chans)
                 * max(1, int(t.get("layers_per_block") or 1)))  # fmt: skip


def family(model: Mapping[str, Any] | None) -> str:
    return str((model or {}).get("family") or "?")


def work(kind: str, params: Mapping[str, Any], prev_stop: int = 0) -> float:
    """The work number of a node (before the model size factor)."""
    if kind == "model":
        m = params.get("model") or {}
        pre = (m.get("tiny") or {}).get("pretrain") if m.get("family") == "tiny" else None
        return float(pre["steps"] * pre["batch_size"]) if pre else 0.0
    if kind == "unlearn":
        u = params.get("unlearn") or {}
        steps = float(u.get("steps") or 1)
        if group(kind, params) == "direct":
            return steps
        res = u["resilience"]
        meta = res["meta"]
        inner = [float(c.get("steps") or 1) for c in meta["configs"].values()]
        j = float(meta.get("samples_per_step") or 1)
        hyper = res.get("hypergradient") or {}
        mean_inner = sum(inner) / len(inner)
        if hyper.get("kind") == "none":  # first order: no HVPs
            k = 0.0
        elif hyper.get("kind") == "unrolled":  # the reverse pass through the inner steps
            k = mean_inner
        else:
            k = float(hyper.get("iterations") or 0)
        return steps * (1 + j * (mean_inner + k))
    if kind == "attack":
        t = params.get("threat") or {}
        seg = max(1, int(params.get("stop") or t.get("steps") or 1) - prev_stop)
        return float(seg * (t.get("batch_size") or 1) * (t.get("grad_accumulation") or 1))
    if kind == "evaluate":
        g = (params.get("evaluate") or {}).get("generation") or {}
        return float((g.get("images_per_prompt") or 1) * (g.get("steps") or 1))
    if kind == "report":
        return float(len(params.get("rows") or ()) or 1)
    return 1.0


def group(kind: str, params: Mapping[str, Any]) -> str:
    """The fit group of a node within its kind (module docstring): ``resilience`` or
    ``direct`` for ``unlearn``, ``""`` for every other kind."""
    if kind != "unlearn":
        return ""
    u = params.get("unlearn") or {}
    res = u.get("resilience") or {}
    direct = u.get("method") != "resalign" or not (res.get("meta") or {}).get("configs")
    return "direct" if direct else "resilience"


@dataclass
class Recorded:
    """One recorded node: its kind, model family, work (with the size factor), its busy
    seconds (:func:`busy_seconds`), peak memory and fit group (:func:`group`)."""

    kind: str
    family: str
    work: float
    seconds: float
    peak_rss_mb: float | None
    group: str = ""


def busy_seconds(cost: Mapping[str, Any]) -> float:
    """The seconds a recorded node would take on an idle machine (module docstring):
    ``min(wall_s, cpu_s / threads)`` for a CPU node with a CPU time, else ``wall_s``."""
    wall = float(cost["wall_s"])
    cpu, threads = cost.get("cpu_s"), cost.get("threads")
    if str(cost.get("device") or "cpu") != "cpu" or not isinstance(cpu, int | float):
        return wall
    n = threads if isinstance(threads, int) and threads > 0 else 1
    return min(wall, float(cpu) / n)


def load_note() -> str | None:
    """A line on how the machine's current load stretches the estimate, or None when the
    1-minute load average is within the cores this process may use."""
    import os

    try:
        load1 = os.getloadavg()[0]
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    except OSError:
        return None
    cores = cores or os.cpu_count() or 1
    if load1 <= cores:
        return None
    return (f"these are idle-machine times; the load average is {load1:.1f} on {cores} "
            f"core(s) now, so CPU nodes' wall times stretch about {load1 / cores:.1f}x")  # fmt: skip


def _prev_stop(deps: Mapping[str, str]) -> int:
    m = _STEP.search(deps.get("resume") or "")
    return int(m.group(1)) if m else 0


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def recorded_cost(folder: Path) -> dict[str, Any] | None:
    """The cost a node folder's ``DONE`` records (:mod:`.cost`), None without a usable one.
    Only that hint is read: checking every manifest's file list (parse_manifest) took 2.4 of
    2.9 s on a store of 1,419 nodes, and a damaged DONE is skipped either way."""
    done = _read(Path(folder) / DONE)
    cost = done.get("cost") if isinstance(done, dict) else None
    if not isinstance(cost, dict) or not isinstance(cost.get("wall_s"), int | float):
        return None
    return cost


def record(
    kind: str, fam: str, w: float, params: Mapping[str, Any], cost: Mapping[str, Any]
) -> Recorded:
    """A recorded node of ``kind`` and family ``fam`` with work ``w`` (the size factor in)."""
    peak = cost.get("peak_rss_mb")
    return Recorded(kind, fam, w, busy_seconds(cost),
                    float(peak) if isinstance(peak, int | float) else None,
                    group(kind, params))  # fmt: skip


def history(store: Store) -> list[Recorded]:
    """Every node in ``store`` whose ``DONE`` records a cost."""
    out: list[Recorded] = []
    models: dict[str, Any] = {}  # model folder -> its model section

    def model_of(folder: str | None) -> Any:
        # the model node by its key in this store (a store that was moved or copied, such as
        # the cost records scripts/gpu_check.sh keeps), else at the recorded path
        if not folder:
            return None
        if folder not in models:
            here = store.node_dir("model", Path(folder).name) / "node.json"
            nj = _read(here) or _read(Path(folder) / "node.json") or {}
            models[folder] = (nj.get("params") or {}).get("model")
        return models[folder]

    for kind, _key, folder in store.node_dirs():
        cost = recorded_cost(folder)
        if cost is None:
            continue
        nj = _read(folder / "node.json")
        if not isinstance(nj, dict):
            continue
        params = nj.get("params") or {}
        model = (
            params.get("model")
            if kind == "model"
            else model_of((nj.get("inputs") or {}).get("model"))
        )
        w = work(kind, params, _prev_stop(nj.get("deps") or {}))
        scale = model_size(model) if kind not in ("harvest", "report") else 1.0
        out.append(record(kind, family(model), w * scale, params, cost))
    return out


@dataclass
class Fit:
    """``seconds = a + b * work``; ``lo``/``hi`` the extreme ratios recorded / fitted."""

    a: float
    b: float
    lo: float
    hi: float
    n: int
    peak_rss_mb: float | None
    w_min: float = 0.0
    w_max: float = 0.0

    def extrapolates(self, w: float) -> bool:
        """``w`` lies more than 2x outside the recorded work range."""
        return w > 2 * self.w_max or w < self.w_min / 2

    def predict(self, w: float) -> tuple[float, float, float]:
        p = self.a + self.b * w
        return p, p * self.lo, p * self.hi


def fit(points: Sequence[Recorded]) -> Fit:
    """The per-kind linear model of the module docstring."""
    ws = [p.work for p in points]
    ts = [p.seconds for p in points]
    n = len(points)
    mw, mt = sum(ws) / n, sum(ts) / n
    sxx = sum((w - mw) ** 2 for w in ws)
    if n >= 2 and sxx > 1e-12 * max(1.0, mw * mw):
        b = sum((w - mw) * (t - mt) for w, t in zip(ws, ts)) / sxx
        a = mt - b * mw
        if b < 0:  # more work, less time: noise; the mean
            a, b = mt, 0.0
        elif a < 0:  # through the origin
            a, b = 0.0, sum(w * t for w, t in zip(ws, ts)) / sum(w * w for w in ws)
    elif mw > 0:
        a, b = 0.0, sum(t / w for w, t in zip(ws, ts) if w > 0) / max(1, sum(w > 0 for w in ws))
        if b == 0:
            a = mt
    else:
        a, b = mt, 0.0
    ratios = [t / (a + b * w) for w, t in zip(ws, ts) if a + b * w > 0]
    peaks = [p.peak_rss_mb for p in points if p.peak_rss_mb is not None]
    return Fit(a, b, min(ratios, default=1.0), max(ratios, default=1.0), n,
               max(peaks) if peaks else None, min(ws), max(ws))  # fmt: skip


@dataclass
class KindEstimate:
    kind: str
    nodes: int
    seconds: float | None = None  # None: no recorded history
    low: float | None = None
    high: float | None = None
    recorded: int = 0
    peak_rss_mb: float | None = None
    names: list[str] = field(default_factory=list)
    without_history: int = 0  # nodes of this kind with no recorded node to scale from
    extrapolated: int = 0  # nodes whose work lies > 2x outside the recorded range


@dataclass
class Estimate:
    kinds: list[KindEstimate]
    per_node: dict[str, tuple[float, float, float] | None]

    @property
    def seconds(self) -> float:
        return sum(k.seconds or 0.0 for k in self.kinds)

    @property
    def low(self) -> float:
        return sum(k.low or 0.0 for k in self.kinds)

    @property
    def high(self) -> float:
        return sum(k.high or 0.0 for k in self.kinds)

    @property
    def without_history(self) -> int:
        return sum(k.without_history for k in self.kinds)


def node_work(graph: Graph, n: Node) -> tuple[str, float]:
    """(model family, work with the size factor) of a node of ``graph``."""
    model_name = n.deps.get("model") if n.kind != "model" else n.name
    model = graph.nodes[model_name].params.get("model") if model_name in graph.nodes else None
    prev = 0
    if n.kind == "attack" and n.deps.get("resume") in graph.nodes:
        prev = int(graph[n.deps["resume"]].params.get("stop") or 0)
    scale = model_size(model) if n.kind not in ("harvest", "report") else 1.0
    return family(model), work(n.kind, n.params, prev) * scale


def estimate(graph: Graph, to_run: Iterable[str], recorded: Sequence[Recorded]) -> Estimate:
    """The estimate of the nodes ``to_run`` (names of ``graph``) from ``recorded``."""
    fits: dict[tuple[str, str, str], Fit | None] = {}
    kinds: dict[str, KindEstimate] = {}
    per_node: dict[str, tuple[float, float, float] | None] = {}
    for name in to_run:
        n = graph[name]
        fam, w = node_work(graph, n)
        at = (n.kind, fam, group(n.kind, n.params))
        if at not in fits:
            same = [r for r in recorded if r.kind == n.kind and r.family == fam]
            pts = [r for r in same if r.group == at[2]] or same  # no such group: the kind's
            fits[at] = fit(pts) if pts else None
        f = fits[at]
        ke = kinds.setdefault(n.kind, KindEstimate(n.kind, 0))
        ke.nodes += 1
        ke.names.append(name)
        if f is None:
            per_node[name] = None
            continue
        p, lo, hi = f.predict(w)
        per_node[name] = (p, lo, hi)
        ke.extrapolated += f.extrapolates(w)
        ke.seconds = (ke.seconds or 0.0) + p
        ke.low = (ke.low or 0.0) + lo
        ke.high = (ke.high or 0.0) + hi
        ke.recorded = max(ke.recorded, f.n)
        if f.peak_rss_mb is not None:
            ke.peak_rss_mb = max(ke.peak_rss_mb or 0.0, f.peak_rss_mb)
    for ke in kinds.values():  # e.g. nodes of another model family than the recorded ones
        ke.without_history = sum(per_node[x] is None for x in ke.names)
    return Estimate(list(kinds.values()), per_node)


def duration(s: float) -> str:
    """Seconds as ``42 s``, ``7 min 5 s`` or ``2 h 3 min``."""
    if not math.isfinite(s):
        return "?"
    s = max(0.0, s)
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{int(s // 60)} min {int(s % 60)} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"


def render(est: Estimate, *, title: str = "estimate") -> str:
    """Per kind and in total, the lines ``plan --estimate`` prints."""
    lines = []
    for k in est.kinds:
        if k.seconds is None:
            lines.append(f"  {k.kind}: {k.nodes} to run; no recorded {k.kind} node in the "
                         "store: no estimate")  # fmt: skip
            continue
        peak = f", peak RSS up to {k.peak_rss_mb:.0f} MiB" if k.peak_rss_mb else ""
        part = (
            f" ({k.without_history} of them of a model family with no recorded node: not counted)"
            if k.without_history
            else ""
        )
        lines.append(
            f"  {k.kind}: {k.nodes} to run{part}, {duration(k.seconds)} [{duration(k.low or 0)}, "
            f"{duration(k.high or 0)}] from {k.recorded} recorded (time ~ a + b x "
            f"{DRIVERS.get(k.kind, 'work')}){peak}"
            + (f"; {k.extrapolated} node(s) extrapolated > 2x beyond the recorded work: "
               "a fixed per-node overhead is not separable there, treat as a rough bound"
               if k.extrapolated else "")
        )  # fmt: skip
    if not est.kinds:
        return f"{title}: nothing to run"
    total = (
        f"{title}: {duration(est.seconds)} [{duration(est.low)}, {duration(est.high)}] of "
        "node time (serial; --workers N overlaps nodes)"
    )
    if est.without_history:
        total += f", not counting {est.without_history} node(s) without history"
    return "\n".join([*lines, total])


__all__ = [
    "Estimate",
    "Recorded",
    "busy_seconds",
    "estimate",
    "fit",
    "history",
    "load_note",
    "render",
    "work",
]


def _middle(p: Any) -> Any:
    """A representative value of a searched range: its middle (geometric for log_uniform),
    the middle choice."""
    if p.choice is not None:
        return p.choice[(len(p.choice) - 1) // 2]
    if p.log_uniform is not None:
        return math.sqrt(p.log_uniform[0] * p.log_uniform[1])
    if p.uniform is not None:
        return (p.uniform[0] + p.uniform[1]) / 2
    low, high = p.integer
    return low + ((high - low) // 2) // p.step * p.step


def search_estimates(
    resolved: Any, graph: Graph, recorded: Sequence[Recorded]
) -> list[tuple[Any, int, Estimate]]:
    """Per attacker search: (its ``StudyPlan``, trials, the estimate of one trial). One trial is
    the threat at the middle of every searched range, to its last step; ``trials`` times it
    is the study's cost without pruning (with a pruner, an upper bound)."""
    from ..graph.compile import search_plans, trial_graph

    out = []
    for plan in search_plans(resolved):
        t = resolved.spec.threats[plan.threat]
        trial = t.trial({name: _middle(p) for name, p in t.search.space.items()})
        tg = trial_graph(resolved, graph, [(plan, 0, trial)])
        names = [n.name for n in tg if n.kind in ("attack", "evaluate")]
        out.append((plan, int(t.search.trials), estimate(tg, names, recorded)))
    return out


def plan_estimate_text(
    resolved: Any, graph: Graph, to_run: Sequence[str], store: str | Path
) -> str:
    """The lines ``resalign plan --estimate`` prints: per kind, the total, each search."""
    recorded = history(Store(store))
    est = estimate(graph, to_run, recorded)
    lines = [render(est, title=f"estimate for {graph.spec_name}")]
    for plan, trials, one in search_estimates(resolved, graph, recorded):
        name = plan.name
        if one.without_history:
            lines.append(f"search {name}: {trials} trials; no recorded attack/evaluate node "
                         "in the store: no estimate")  # fmt: skip
            continue
        lines.append(
            f"search {name}: {trials} trials x {duration(one.seconds)} [{duration(one.low)}, "
            f"{duration(one.high)}] per trial (the middle of every searched range, to its "
            f"last step) = {duration(trials * one.seconds)}; with a pruner at most that"
        )
    if note := load_note():
        lines.append(note)
    return "\n".join(lines)
