"""Attacker search (issue 16): a threat with ``search`` is attacked ``trials`` times per model
row (and unlearning seed), its hyperparameters drawn by an Optuna sampler, and reported as
the worst case: the highest concept metric among trials that keep the utility bound.

How a study runs and resumes:

- Each trial is an ordinary attack node (one per attack seed) plus its evaluation at the
  attack's last step, compiled by :func:`resalign.graph.compile.trial_graph` with exactly the
  keys of a fixed threat with the trial's values, and run by :func:`.runner.run_graph`: it is
  cached, resumed after a kill and tracked like any node.
- The store's nodes are the record. Every invocation re-creates each study from them: a
  fresh, seeded sampler is asked trial after trial in the same order; a trial whose
  evaluations are already in the store is told its stored result without running anything,
  the first one that is not is run. A seeded sampler told the same results asks the same
  values, so the re-created study is the one an uninterrupted run would have built and a
  kill -9 repeats no finished trial. Departure from a plain Optuna resume (load the study from
  its storage and continue): the sampler's random state is not in the storage, so a reloaded
  TPE study would draw other values than the uninterrupted one.
- The Optuna study is also written to the store, ``<store>/search/<study key>.db`` (SQLite,
  study name ``search/<row>[/seed<u>]/<threat>``; for Optuna's own tools: the study runs in
  memory and each round writes the file whole, atomically, so invocations that share a study
  never see each other's half), with ``<store>/search/<study key>.json``, the trials as JSON.
  Neither is read back.
- Rows are searched side by side: round ``k`` asks trial ``k`` of every study and runs them
  in one ``run_graph`` call (``--workers`` runs them in parallel), nested in MLflow under the
  invocation's run; each trial's attack run is tagged ``resalign.search.study``,
  ``resalign.search.trial`` and ``resalign.search.param.<name>``.
- TPE is Optuna's constrained TPE (the utility bound as ``constraints_func``); random and grid
  ignore the bound when sampling. The objective is the mean over the threat's attack seeds.
- Pruning (issue 25; ``search.report_at`` and ``search.pruner``): a trial is evaluated at
  rungs before its last step (``SearchSpec.rungs``: its attack is split into segments there,
  exactly as a fixed threat's ``eval_at`` splits it, so the last segment keeps the key of an
  unsplit trial). Rung by rung, the live trials of a round run side by side; each reports its
  value to Optuna (``trial.report``: the objective, ``-inf`` outside the utility bound) and a
  trial the pruner stops is told ``PRUNED`` and run no further. Its segments and evaluations
  are ordinary cached nodes, and the pruners are deterministic, so re-creating the study from
  the store prunes the same trials at the same rungs. A pruned trial is recorded
  (``TrialRecord.pruned_at``), counted in the report, and never the worst case (it did not
  run the attack it was asked). Without ``report_at`` a trial is one segment, as before.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_bytes, atomic_write_json
from ..errors import UserError
from ..graph.compile import StudyPlan, search_plans, trial_graph
from ..graph.nodes import Graph
from .options import RunOptions
from .store import Store

USER_ATTR_CONSTRAINT = "constraint"


@dataclass
class TrialRecord:
    """One finished trial: ``number`` (0-based), the sampled ``params``, the objective and
    utility metric of the attacked model (means over attack seeds) and whether it kept the
    bound; ``attack_keys`` the attack nodes that hold it."""

    number: int
    params: dict[str, Any]
    objective: float
    utility: float
    feasible: bool
    attack_keys: list[str] = field(default_factory=list)
    failed: str | None = None  # why the trial failed (its attack diverged); objective NaN
    # the attack step at which the pruner stopped it (objective and utility are those there)
    pruned_at: int | None = None
    # every rung before the last step: {"step", "objective", "utility"} (search.report_at)
    rungs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        """Ran to its last step: neither diverged nor pruned (only such trials count)."""
        return self.failed is None and self.pruned_at is None and not math.isnan(self.objective)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for k in ("objective", "utility"):  # strict JSON: a failed trial has no value
            if isinstance(d[k], float) and math.isnan(d[k]):
                d[k] = None
        return d


@dataclass
class StudyRecord:
    """A study re-created from the store: its plan, search block and finished trials."""

    plan: StudyPlan
    search: dict[str, Any]
    trials: list[TrialRecord] = field(default_factory=list)

    @property
    def budget(self) -> int:
        return int(self.search["trials"])

    def best(self) -> TrialRecord | None:
        """The worst case: the highest objective among trials within the bound (the first
        such trial on ties)."""
        ok = [t for t in self.trials if t.feasible and t.finished]
        return max(ok, key=lambda t: (t.objective, -t.number)) if ok else None

    def best_so_far(self) -> list[float | None]:
        """After each trial, the best feasible objective so far (None before the first)."""
        out: list[float | None] = []
        best: float | None = None
        for t in self.trials:
            if t.feasible and t.finished:
                best = t.objective if best is None else max(best, t.objective)
            out.append(best)
        return out

    def as_dict(self) -> dict[str, Any]:
        best = self.best()
        c = self.search["constraint"]
        return {
            "study": self.plan.name,
            "key": self.plan.key,
            "row": self.plan.row,
            "unlearn_seed": self.plan.unlearn_seed,
            "threat": self.plan.threat,
            "objective": self.search["objective"]["metric"],
            "constraint": c,
            "sampler": self.search["sampler"],
            "seed": self.search["seed"],
            "budget": self.budget,
            "done": len(self.trials),
            "feasible": sum(t.feasible and t.finished for t in self.trials),
            "pruned": sum(t.pruned_at is not None for t in self.trials),
            "pruner": self.search.get("pruner"),
            "report_at": self.search.get("report_at") or [],
            "best": None if best is None else best.as_dict(),
            "best_so_far": self.best_so_far(),
            "failed": sum(t.failed is not None for t in self.trials),
            "trials": [t.as_dict() for t in self.trials],
        }


# ----------------------------------------------------------------------------- optuna


def _optuna() -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def distributions(search: Mapping[str, Any]) -> dict[str, Any]:
    """The Optuna distribution of each searched value of a ``search`` block (dumped)."""
    optuna = _optuna()
    d = optuna.distributions
    out: dict[str, Any] = {}
    for name, p in search["space"].items():
        if p.get("choice") is not None:
            out[name] = d.CategoricalDistribution(p["choice"])
        elif p.get("integer") is not None:
            low, high = p["integer"]
            step = int(p.get("step") or 1)
            out[name] = d.IntDistribution(low, low + (high - low) // step * step, step=step)
        else:
            log = p.get("log_uniform") is not None
            low, high = p["log_uniform"] if log else p["uniform"]
            out[name] = d.FloatDistribution(float(low), float(high), log=log)
    return out


def make_sampler(search: Mapping[str, Any]) -> Any:
    """The seeded sampler of a ``search`` block."""
    optuna = _optuna()
    seed = int(search["seed"])
    if search["sampler"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if search["sampler"] == "grid":
        space = {}
        for name, p in search["space"].items():
            if p.get("choice") is not None:
                space[name] = list(p["choice"])
            else:
                low, high = p["integer"]
                space[name] = list(range(low, high + 1, int(p.get("step") or 1)))

        class _Grid(optuna.samplers.GridSampler):
            # GridSampler.after_trial calls study.stop() once the grid is used up, which
            # raises outside study.optimize (we ask and tell); the budget is ours to end.
            def after_trial(self, *args: Any, **kwargs: Any) -> None:
                return None

        return _Grid(space, seed=seed)

    def constraints(trial: Any) -> list[float]:
        return [float(trial.user_attrs.get(USER_ATTR_CONSTRAINT, math.inf))]

    with warnings.catch_warnings():  # constraints_func is marked experimental
        warnings.simplefilter("ignore")
        return optuna.samplers.TPESampler(seed=seed, constraints_func=constraints)


def make_pruner(search: Mapping[str, Any]) -> Any:
    """The pruner of a ``search`` block (``NopPruner`` without one)."""
    optuna = _optuna()
    p = search.get("pruner")
    if p is None:
        return optuna.pruners.NopPruner()
    if p["kind"] == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=int(p["startup_trials"]), n_warmup_steps=int(p["warmup_steps"])
        )
    return optuna.pruners.SuccessiveHalvingPruner(
        min_resource=p["min_resource"] or "auto", reduction_factor=int(p["reduction_factor"])
    )


def _open_study(plan: StudyPlan, search: Mapping[str, Any], storage: Any) -> Any:
    """A new study for ``plan``, in memory (the store's nodes are the record; the SQLite
    copy for Optuna's tools is written whole after each round, :func:`_write_db`). Studies
    used to live in ``<store>/search/<key>.db`` itself, deleted and re-created by each
    invocation: two invocations sharing a study (two grid cells with the same `original`
    row) deleted each other's trials and both crashed with Optuna's "Record does not exist"."""
    optuna = _optuna()
    return optuna.create_study(
        study_name=plan.name,
        storage=storage,  # an InMemoryStorage
        sampler=make_sampler(search),
        pruner=make_pruner(search),
        direction="maximize",
    )


def _write_db(store: Store, key: str, studies: Sequence[tuple[str, Any]]) -> None:
    """``<store>/search/<key>.db``: a SQLite copy of the ``(name, storage)`` studies of study
    key ``key`` for Optuna's own tools (optuna-dashboard), built in a private folder and put
    in place by the one atomic writer, so concurrent invocations of the same study each leave
    a whole file. Rows with the same nodes (``original`` and a ``method: none`` row) share a
    key, so the file holds every study of that key, each under its own name."""
    import tempfile

    optuna = _optuna()
    with tempfile.TemporaryDirectory(prefix="resalign-study-") as tmp:
        path = Path(tmp) / "study.db"
        for name, storage in studies:
            optuna.copy_study(
                from_study_name=name, from_storage=storage, to_storage=f"sqlite:///{path}"
            )
        atomic_write_bytes(store.root / "search" / f"{key}.db", path.read_bytes())


# ----------------------------------------------------------------------------- replay


def _metric(metrics: Mapping[str, Any], name: str, where: Path) -> float:
    if name not in metrics:
        raise UserError(
            f"search objective/constraint metric {name!r} is not among the evaluation's "
            f"metrics ({', '.join(metrics)}) in {where}",
            hint="name a metric that `evaluate.metrics` computes (concept_rate gives "
            "concept_rate, retain_accuracy and classifier_fid)",
        )
    return float(metrics[name]["value"])


def _trial_result(
    tg: Graph, plan: StudyPlan, k: int, search: Mapping[str, Any], store: Store, step: int
) -> tuple[float, float, list[str]] | None:
    """(objective, utility, attack keys) of trial ``k`` at attack step ``step`` from the
    store, None when any of its evaluations there is not there yet."""
    tname = plan.trial_threat(k)
    evals = [n for n in tg.of_kind("evaluate") if n.threat == tname and n.row == plan.row
             and n.unlearn_seed == plan.unlearn_seed and n.step == step]  # fmt: skip
    objs, utils = [], []
    for n in evals:
        folder = store.node_dir(n.kind, n.key)
        if not store.has_done(n.kind, n.key) or not (folder / "metrics.json").is_file():
            return None
        metrics = json.loads((folder / "metrics.json").read_text("utf-8"))
        objs.append(_metric(metrics, search["objective"]["metric"], folder))
        utils.append(_metric(metrics, search["constraint"]["metric"], folder))
    keys = [tg[n.deps["attack"]].key for n in evals]
    return sum(objs) / len(objs), sum(utils) / len(utils), keys


FAILED_DIR = "failed"  # under <store>/search/: one JSON per node whose settings diverged


def _failure_path(store: Store, kind: str, key: str) -> Path:
    return store.root / "search" / FAILED_DIR / f"{kind}-{key}.json"


def record_failure(store: Store, node: Any, error: str) -> None:
    """Record that ``node`` (a trial's attack or evaluation) failed because its settings
    diverged. Keyed by the node's content key: the same settings fail the same way (the
    attack is deterministic in its seed), so a re-created study tells that trial failed
    without running it again; other settings are unaffected. Delete the file to retry."""
    atomic_write_json(
        _failure_path(store, node.kind, node.key),
        {"node": node.name, "kind": node.kind, "key": node.key, "error": error},
    )


def _trial_nodes(tg: Graph, plan: StudyPlan, k: int) -> list[Any]:
    tname = plan.trial_threat(k)
    return [n for n in tg if n.kind in ("attack", "evaluate") and n.threat == tname
            and n.row == plan.row and n.unlearn_seed == plan.unlearn_seed]  # fmt: skip


def _trial_failure(tg: Graph, plan: StudyPlan, k: int, store: Store) -> str | None:
    """Why trial ``k`` failed (its first recorded failure), None when none is recorded."""
    for n in _trial_nodes(tg, plan, k):
        f = _failure_path(store, n.kind, n.key)
        if f.is_file():
            rec = json.loads(f.read_text("utf-8"))
            return f"{n.name}: {rec.get('error', 'failed')}"
    return None


def _results(
    tg: Graph, recs: Sequence[tuple[int, StudyRecord, int]], k: int, store: Store
) -> dict[int, Any]:
    """Per study index: why trial ``k`` failed (str), its (objective, utility, attack keys)
    at the given attack step, or None when that is not in the store yet."""
    out: dict[int, Any] = {}
    for i, rec, step in recs:
        why = _trial_failure(tg, rec.plan, k, store)
        out[i] = why if why is not None else _trial_result(tg, rec.plan, k, rec.search, store, step)
    return out


def _upto(tg: Graph, trials: Sequence[tuple[StudyPlan, int, int]]) -> Graph:
    """The part of a trial graph that evaluates each (study, trial, attack step): the
    upstream nodes, the trial's attack segments up to that step and its evaluations there."""
    want = {(p.row, p.unlearn_seed, p.trial_threat(k)): step for p, k, step in trials}
    out = Graph(spec_name=tg.spec_name, spec_hash=tg.spec_hash)
    for name, n in tg.nodes.items():
        if n.kind not in ("attack", "evaluate"):
            out.nodes[name] = n
            continue
        step = want.get((n.row, n.unlearn_seed, n.threat))
        if step is not None and (n.step <= step if n.kind == "attack" else n.step == step):
            out.nodes[name] = n
    return out


def _violation(constraint: Mapping[str, Any], value: float) -> float:
    if constraint.get("min") is not None:
        return float(constraint["min"]) - value
    return value - float(constraint["max"])


# (trial graph part, trial number, [(study, trial number, sampled values, rung note)])
RoundRunner = Callable[[Graph, int, list[tuple[StudyPlan, int, dict[str, Any], str]]], None]


def _rung_note(step: int, rungs: Sequence[tuple[int, int]]) -> str:
    """`` (to step s, rung r/n)`` for a trial evaluated at rungs; empty without them."""
    if len(rungs) == 1:
        return ""
    r = [a for a, _ in rungs].index(step)
    return f" (to step {step}, rung {r + 1}/{len(rungs)})"


def replay(
    resolved: Any,
    graph: Graph,
    store_root: Path | str,
    run_round: RoundRunner | None = None,
    write: bool = False,
    plans: Sequence[StudyPlan] | None = None,
) -> list[StudyRecord]:
    """Re-create every study of ``resolved`` from the store (see the module docstring).

    With ``run_round``, a round whose trials are not all in the store is handed to it (it
    must compute them) and the studies continue to their budget; without, a study stops at
    its first missing trial (the report's view). ``write``: keep the studies in
    ``<store>/search/`` (SQLite and JSON). ``plans``: the studies of ``resolved`` when the
    caller has planned them already (else planned here)."""
    store = Store(store_root)
    plans = search_plans(resolved) if plans is None else list(plans)
    threats = resolved.spec.threats
    records: list[StudyRecord] = []
    studies: list[Any] = []
    storages: list[Any] = []
    for plan in plans:
        search = threats[plan.threat].search.model_dump(mode="json")
        records.append(StudyRecord(plan, search))
        storages.append(_optuna().storages.InMemoryStorage())
        studies.append(_open_study(plan, search, storages[-1]))
    dists = [distributions(r.search) for r in records]
    specs = [threats[p.threat].search for p in plans]
    optuna = _optuna()
    active = list(range(len(plans)))
    k = 0
    while active:
        active = [i for i in active if k < records[i].budget]
        if not active:
            break
        asked = []
        for i in active:
            trial = studies[i].ask(dists[i])
            values = dict(trial.params)
            threat = threats[records[i].plan.threat].trial(values)
            # the rungs: the trial's evaluation steps (its last step alone without report_at)
            rungs = specs[i].rungs(threat.steps)
            threat = threat.model_copy(update={"eval_at": [a for a, _ in rungs]})
            asked.append((i, trial, values, threat, rungs))
        tg = trial_graph(resolved, graph, [(records[i].plan, k, t) for i, _, _, t, _ in asked])
        seen: dict[int, list[dict[str, Any]]] = {i: [] for i, *_ in asked}
        live = list(asked)
        r = 0
        while live:
            # rung r of every trial still running, side by side (one run_graph call)
            at = {i: rungs[r] for i, *_, rungs in live}
            part = _upto(tg, [(records[i].plan, k, at[i][0]) for i, *_ in live])
            want = [(i, records[i], at[i][0]) for i, *_ in live]
            found = _results(part, want, k, store)
            if run_round is not None and any(v is None for v in found.values()):
                run_round(part, k, [(records[i].plan, k, v, _rung_note(at[i][0], rg))
                                    for i, _, v, _, rg in live])  # fmt: skip
                found = _results(part, want, k, store)
            going = []
            for entry in live:
                i, trial, values, _, rungs = entry
                res, (step, pstep) = found[i], at[i]
                if isinstance(res, str):  # diverged: told to the sampler as failed
                    studies[i].tell(trial, state=optuna.trial.TrialState.FAIL)
                    nan = math.nan
                    rec = TrialRecord(k, values, nan, nan, False, [], res, rungs=seen[i])
                    records[i].trials.append(rec)
                    continue
                if res is None:
                    if run_round is not None:
                        raise RuntimeError(f"{records[i].plan.name}: trial {k} did not complete")
                    active.remove(i)  # report view: this study stops at its first missing trial
                    continue
                obj, util, keys = res
                viol = _violation(records[i].search["constraint"], util)
                trial.set_user_attr(USER_ATTR_CONSTRAINT, viol)
                trial.set_user_attr("utility", util)
                if len(rungs) > 1:
                    # what the pruner compares: the objective where the bound holds, else
                    # -inf (an attack that broke the model competes last; see PrunerSpec)
                    trial.report(obj if viol <= 0 else -math.inf, pstep)
                if r < len(rungs) - 1:
                    seen[i].append({"step": step, "objective": obj, "utility": util})
                    if trial.should_prune():
                        studies[i].tell(trial, state=optuna.trial.TrialState.PRUNED)
                        records[i].trials.append(
                            TrialRecord(k, values, obj, util, viol <= 0, keys, None, step, seen[i])
                        )
                    else:
                        going.append(entry)
                    continue
                studies[i].tell(trial, obj)
                records[i].trials.append(
                    TrialRecord(k, values, obj, util, viol <= 0, keys, rungs=seen[i])
                )
            live = going
            r += 1
        if write:
            for i, *_ in asked:
                _write_json(store, records[i])
            for key in dict.fromkeys(plans[i].key for i, *_ in asked):
                same = [(p.name, storages[j]) for j, p in enumerate(plans) if p.key == key]
                _write_db(store, key, same)
        k += 1
    return records


def _write_json(store: Store, rec: StudyRecord) -> None:
    atomic_write_json(store.root / "search" / f"{rec.plan.key}.json", rec.as_dict())


def study_records(resolved: Any, graph: Graph, store_root: Path | str) -> list[StudyRecord]:
    """The studies of ``resolved`` as far as the store holds their trials (nothing runs)."""
    return replay(resolved, graph, store_root)


# ----------------------------------------------------------------------------- running


def run_searches(
    resolved: Any,
    graph: Graph,
    options: RunOptions | None = None,
    plans: Sequence[StudyPlan] | None = None,
) -> list[StudyRecord]:
    """Run every attacker search of ``resolved`` to its budget after the static ``graph``
    has run (its model and unlearn nodes are the searches' upstream). Finished trials are
    taken from the store. A failing trial node raises :class:`.runner.RunFailed` (the
    printed resume command re-runs the whole invocation, which resumes the search). Returns
    the studies.

    ``options``: the invocation's (:class:`.options.RunOptions`); each round is one
    ``run_graph`` call with them (less ``force``), its MLflow run nested under ``options.parent_run_id`` (the
    invocation's run) and tagged with ``options.tags`` plus ``resalign.search.round``; the
    trials' attack runs get ``options.tags`` too (a grid cell's). ``plans``: the studies
    (:func:`resalign.graph.compile.search_plans`), when the caller has them already."""
    o = options or RunOptions()
    plans = search_plans(resolved) if plans is None else list(plans)
    if not plans:
        return []
    o = o.replace(ui=o.progress())  # one display for every round
    # one worker pool for every round (3 rounds per pruned trial; a fresh pool's workers
    # import torch and diffusers again, 5-20 s each on the loaded 2-core machine)
    with o.shared_executor() as o:
        return _run_searches(resolved, graph, o, plans)


def _run_searches(
    resolved: Any, graph: Graph, o: RunOptions, plans: Sequence[StudyPlan]
) -> list[StudyRecord]:
    from .runner import RunFailed, run_graph

    ui = o.ui
    store_root = o.store

    def run_round(
        tg: Graph, k: int, trials: list[tuple[StudyPlan, int, dict[str, Any], str]]
    ) -> None:
        for plan, _, values, note in trials:
            shown = ", ".join(f"{n}={_short(v)}" for n, v in values.items())
            ui.line(f"search {plan.name}: trial {k}: {shown}{note}")
        store = Store(store_root)
        # nothing forced: --force applies to the graph; a round reruns no cached upstream
        # node, and a trial in the store is the record the study is re-created from
        round_options = o.replace(force=(), tags={**o.tags, "resalign.search.round": str(k)})
        while True:
            # a trial that diverged (recorded) is not run again; its evaluations neither
            live = drop_failed(tg, trials, store)
            try:
                summary = run_graph(live, resolved, round_options)
                break
            except RunFailed as e:
                diverged = {n: r for n, r in e.results.items() if r.error_type == DIVERGED}
                if e.interrupted or not diverged or len(diverged) < len(e.failed):
                    raise  # anything but divergence stops the search, as any failed node
                for name, r in diverged.items():
                    record_failure(store, tg[name], (r.error or "").splitlines()[0])
                    ui.line(f"search: {name} diverged; its trial is told to the sampler "
                            "as failed and the search goes on")  # fmt: skip
        if summary.parent_run_id and summary.tracking_uri:
            _tag_trial_runs(summary.tracking_uri, summary.parent_run_id, tg, trials, ui, o.tags)

    records = replay(resolved, graph, store_root, run_round=run_round, write=True, plans=plans)
    for rec in records:
        best = rec.best()
        c = rec.search["constraint"]
        bound = f"{c['metric']} {'>=' if c.get('min') is not None else '<='} "
        bound += str(c["min"] if c.get("min") is not None else c["max"])
        pruned = sum(t.pruned_at is not None for t in rec.trials)
        pruned_note = f", {pruned} pruned" if pruned else ""
        if best is None:
            failed = sum(t.failed is not None for t in rec.trials)
            notes = (f"{failed} diverged" if failed else "") + (
                (", " if failed else "") + f"{pruned} pruned" if pruned else ""
            )
            ui.line(
                f"search {rec.plan.name}: no trial of {len(rec.trials)} kept {bound}"
                + (f" ({notes})" if notes else "")
            )
        else:
            ui.line(
                f"search {rec.plan.name}: worst case {rec.search['objective']['metric']} "
                f"{best.objective:.3f} at trial {best.number} of {len(rec.trials)} "
                f"({bound}: {best.utility:.3f}{pruned_note})"
            )
    return records


# the error type of a node whose settings diverged (resalign.steps.base.NonFiniteError)
DIVERGED = "NonFiniteError"


def drop_failed(tg: Graph, trials: Sequence[tuple[Any, ...]], store: Store) -> Graph:
    """``tg`` without the nodes of trials that have a recorded failure (their attack and
    evaluation nodes); every other node kept, in order."""
    gone = {n.name for plan, k, *_ in trials if _trial_failure(tg, plan, k, store)
            for n in _trial_nodes(tg, plan, k)}  # fmt: skip
    if not gone:
        return tg
    out = Graph(spec_name=tg.spec_name, spec_hash=tg.spec_hash)
    out.nodes = {name: n for name, n in tg.nodes.items() if name not in gone}
    return out


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _tag_trial_runs(
    uri: str,
    round_run_id: str,
    tg: Graph,
    trials: list[tuple[StudyPlan, int, dict[str, Any], str]],
    ui: Any,
    extra: Mapping[str, str] | None = None,
) -> None:
    """Tag the attack runs this round created with their study, trial and sampled values,
    and with ``extra`` (the invocation's tags: a grid cell's, so a trial is found by its
    cell in MLflow's search, which cannot filter on a parent run's tags)."""
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        exp = client.get_run(round_run_id).info.experiment_id
        runs = client.search_runs(
            [exp], filter_string=f"tags.mlflow.parentRunId = '{round_run_id}'"
        )
        by_name = {r.data.tags.get("resalign.node.name"): r.info.run_id for r in runs}
        for plan, k, values, _ in trials:
            tname = plan.trial_threat(k)
            for n in tg.of_kind("attack"):
                if n.threat != tname or n.row != plan.row or n.name not in by_name:
                    continue
                if n.unlearn_seed != plan.unlearn_seed:
                    continue
                tags = {**(extra or {}), "resalign.search.study": plan.name,
                        "resalign.search.trial": str(k),
                        "resalign.search.study_key": plan.key}  # fmt: skip
                tags.update({f"resalign.search.param.{p}": str(v) for p, v in values.items()})
                for t, v in tags.items():
                    client.set_tag(by_name[n.name], t, v)
    except Exception as e:  # tracking must not fail a finished round; the store has it
        ui.line(f"could not tag the search trials in MLflow: {type(e).__name__}: {e}")
