"""Compile a resolved spec into the execution graph (docs/architecture.md, "The graph").

    model ─► harvest/<ds> (implied or declared harvest datasets that something reads)
      └────► unlearn/<row>/seed<u> ─► attack/<row>/seed<u>/<threat>/seed<a>/step<n> ─► (next step)
                                 │       └─► evaluate/<row>/seed<u>/<threat>/seed<a>/step<n>
                                 └─► evaluate/<row>/seed<u>/pre/step0                  ─► report

One unlearn node per unlearning seed ``u`` of the row (``unlearn.seeds``), each with its own
attacks (attack seeds ``a``) and evaluations.

Keys hold what a step reads: :func:`.keys.node_key` leaves out what the step class declares
in ``key_exclude`` (labels, checkpoint cadence, bitwise-neutral memory levers; for methods
without a resilience term, ``unlearn.resilience`` and ``meta_datasets``).

The row ``original`` (and any row whose method is ``none``) has no unlearn node and no
``seed<u>`` segment: ``attack/original/<threat>/seed<a>/step<n>``, ``evaluate/original/pre/step0``;
its attacks and evaluations start from the model node. With ``controls.oracle`` a second model
node ``model/oracle`` (the model's params plus ``exclude_labels``) and a row ``oracle`` after
``original`` whose nodes start from it, named like ``original``'s (``evaluate/oracle/pre/step0``,
``attack/oracle/<threat>/seed<a>/step<n>``). Each node's params are exactly the resolved values
its step reads; dataset and model locations carry a fingerprint (see :mod:`.keys`).
Departure from the table in the architecture notes: ``model.allow_download`` is left out of
the model node's key, like ``device``, because it changes where weights come from, not what
they are (the fingerprint of the resolved weights is in the key). Evaluate nodes also carry
``concepts``: concept-aware metrics (``concept_rate``) judge generations against them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..spec.resolve import ORIGINAL_ROW, ResolvedSpec, oracle_labels
from ..spec.schema.controls import ORACLE_ROW
from .keys import canonical_json, fingerprint, key_params, node_key
from .nodes import Graph, Node

# The oracle control's model (``controls.oracle``): a second ``model`` node.
ORACLE_MODEL = "model/oracle"


@dataclass(frozen=True)
class StudyPlan:
    """One attacker search (a threat with ``search``) on one row and unlearning seed.

    ``name`` is ``search/<row>[/seed<u>]/<threat>``; ``key`` a content key of everything its
    trials depend on (the threat with its search block, the attacked model's node key, the
    evaluation), so a changed spec is another study. ``base``: the attacked model's deps
    (``model``, ``unlearn``). Trials are compiled by :func:`trial_graph`."""

    name: str
    key: str
    row: str
    unlearn_seed: int | None
    threat: str
    prefix: str
    base: dict[str, str]

    def trial_threat(self, k: int) -> str:
        """The threat name of trial ``k`` in node names (``:`` cannot occur in a spec name,
        so no fixed threat collides; keys do not depend on names)."""
        return f"{self.threat}:trial{k}"


# Attack algorithms whose segments save a UNet (``unet/``), which a segment probe reads.
_UNET_ATTACKS = ("full", "lora", "dreambooth")

_DATASET_REFS = {
    "harvest": ("prompts",),
    "mix": ("base", "poison"),
    "dreambooth": ("instance", "prior"),
}


class _Compiler:
    def __init__(self, resolved: ResolvedSpec):
        self.r = resolved
        self.spec = resolved.spec
        self.graph = Graph(spec_name=self.spec.name, spec_hash=spec_hash(resolved))
        self._ds_cache: dict[str, dict[str, Any]] = {}
        self.studies: list[StudyPlan] = []

    # -- helpers -------------------------------------------------------------------------

    def dataset(self, name: str) -> dict[str, Any]:
        if name not in self._ds_cache:
            d = self.spec.datasets[name].model_dump(mode="json")
            if "path" in d:
                d["fingerprint"] = fingerprint(d["path"])
            self._ds_cache[name] = d
        return self._ds_cache[name]

    def closure(self, names: Iterable[str | None]) -> dict[str, dict[str, Any]]:
        """The specs of ``names`` and of every dataset they are built from, sorted by name."""
        out: dict[str, dict[str, Any]] = {}
        todo = [n for n in names if n]
        while todo:
            n = todo.pop()
            if n in out:
                continue
            d = self.dataset(n)
            out[n] = d
            todo += [d[f] for f in _DATASET_REFS.get(d["type"], ()) if d.get(f)]
        return dict(sorted(out.items()))

    def add(self, kind: str, name: str, params: dict[str, Any], deps: dict[str, str], **loc: Any):
        upstream = {role: self.graph.nodes[dep].key for role, dep in deps.items()}
        node = Node(kind, name, params, deps, node_key(kind, params, upstream), **loc)
        self.graph.nodes[name] = node
        return node

    def harvest_deps(self, datasets: Mapping[str, dict[str, Any]]) -> dict[str, str]:
        deps = {}
        for n, d in datasets.items():
            if d["type"] == "harvest":
                if f"harvest/{n}" not in self.graph.nodes:
                    params = {"dataset": d, "prompts": self.closure([d["prompts"]])}
                    self.add("harvest", f"harvest/{n}", params, {"model": "model"})
                deps[f"harvest:{n}"] = f"harvest/{n}"
        return deps

    # -- nodes ---------------------------------------------------------------------------

    def model(self) -> None:
        # device is where it runs (the engine's); allow_download is read by the step and
        # left out of its key (ModelStep.key_exclude): it decides whether, not what, it loads
        m = self.spec.model.model_dump(mode="json", exclude={"device"})
        if m.get("pretrained"):
            m["fingerprint"] = fingerprint(
                m["pretrained"], revision=m.get("revision"), variant=m.get("variant")
            )
        params: dict[str, Any] = {"model": m}
        pre = self.spec.model.tiny.pretrain if self.spec.model.tiny else None
        if self.spec.model.family == "tiny" and pre is not None:
            params["pretrain_data"] = self.closure([pre.dataset])
        self.add("model", "model", params, {})

    def oracle_model(self) -> None:
        """The oracle control's model: the model node's params plus ``exclude_labels`` (the
        concepts' labels, whose pretraining items ``ModelStep`` leaves out), so its key differs
        from the original's and it is cached like any node. A node of kind ``model`` rather
        than a new kind: it is built by the same code from the same architecture and
        pretraining settings, and the original's key stays as it was."""
        params = {**self.graph.nodes["model"].params, "exclude_labels": oracle_labels(self.spec)}
        self.add("model", ORACLE_MODEL, params, {})

    def rows(self) -> list[str]:
        """Report rows in order: ``original``, ``oracle`` when ``controls.oracle`` is on,
        then the unlearning rows. The oracle is a control, not a row of ``ResolvedSpec.rows``
        (those are unlearning settings, each paired with ``plain`` in the report)."""
        rows = list(self.r.rows)
        if self.spec.controls.oracle:
            rows.insert(rows.index(ORIGINAL_ROW) + 1, ORACLE_ROW)
        return rows

    def unlearn(self, row: str, seed: int) -> Node:
        u = self.r.rows[row]
        meta = u.resilience.meta
        used = [n for c in self.spec.concepts.values() for n in (*c.harmful, *c.retain)]
        datasets = self.closure(used)
        # What only the resilience term reads (simulated fine-tuning data), apart, so that the
        # key of a method without that term can leave it out (UnlearnStep.key_exclude).
        pools = meta.data + [c.data for c in meta.configs.values()]
        pools += meta.distribution.data if meta.distribution else []
        meta_datasets = self.closure(pools)
        # One node per unlearning seed, carrying that seed alone (not the list), so adding a
        # seed adds nodes and leaves every existing key as it was.
        one = u.model_copy(update={"seed": seed}).model_dump(mode="json", exclude={"seeds"})
        params = {
            "unlearn": one,
            "trainable": self.spec.model.trainable.model_dump(mode="json"),
            "concepts": self.concepts(),
            "datasets": datasets,
            "meta_datasets": meta_datasets,
        }
        deps = {"model": "model", **self.harvest_deps({**datasets, **meta_datasets})}
        return self.add(
            "unlearn", f"unlearn/{row}/seed{seed}", params, deps, row=row, unlearn_seed=seed
        )

    def evaluate_params(self, step: int) -> dict[str, Any]:
        ev = self.spec.evaluate.model_dump(mode="json")
        for m in ev["metrics"]:
            for f in [f for f in m if f.endswith("_path") and m[f]]:
                m[f"{f[: -len('_path')]}_fingerprint"] = fingerprint(m[f])
        names = [m.get(f) for m in ev["metrics"] for f in ("prompts", "reference")]
        params = {
            "evaluate": ev,
            "step": step,
            "datasets": self.closure(names),
            "concepts": self.concepts(),
        }
        caption = self.concept_caption()
        if caption is not None:
            params["caption"] = caption["caption"]
            if caption.get("names"):  # absent without names: those specs keep their keys
                params["caption_names"] = caption["names"]
        return params

    def concept_caption(self) -> dict[str, Any] | None:
        """The caption template (and per-digit ``names``, where given) of the first labelled
        concept's first digits dataset: what the demo's concept metrics build their prompts
        from (steps/evaluate.py metric_context). Before issue 22 the step read it from the
        live spec, so a new caption left every evaluation cached with the old prompts."""
        for c in self.spec.concepts.values():
            if c.label is None:
                continue
            for n in (*c.harmful, *c.retain):
                d = self.dataset(n)
                if d["type"] == "digits":
                    return {"caption": str(d["caption"]), "names": d.get("names") or {}}
            return None
        return None

    def concepts(self) -> dict[str, dict[str, Any]]:
        """What the steps read of each concept: its datasets and label. Its ``description``
        is documentation, read by nothing, so it is not an input (editing it re-keyed 45 of
        the demo's nodes)."""
        return {
            n: c.model_dump(mode="json", exclude={"description"})
            for n, c in self.spec.concepts.items()
        }

    def row(self, row: str) -> list[str]:
        """Every node of one report row; a row that unlearns repeats them per unlearning seed
        (names gain ``seed<u>`` after the row), a ``method: none`` row has them once; the
        oracle control's row is such a row on the oracle model."""
        if row == ORACLE_ROW and self.spec.controls.oracle:
            return self.branch(row, None, {"model": ORACLE_MODEL})
        u = self.r.rows[row]
        if u.method == "none":
            return self.branch(row, None, {"model": "model"})
        evals: list[str] = []
        for seed in u.seeds or [u.seed]:
            un = self.unlearn(row, seed)
            evals += self.branch(row, seed, {"model": "model", "unlearn": un.name})
        return evals

    def branch(self, row: str, useed: int | None, base: dict[str, str]) -> list[str]:
        """The pre-attack evaluation, attacks and their evaluations of one row (and unlearning
        seed ``useed``, None for rows without unlearning)."""
        prefix = row if useed is None else f"{row}/seed{useed}"
        loc = {"row": row, "unlearn_seed": useed}
        evals = [
            self.add(
                "evaluate",
                f"evaluate/{prefix}/pre/step0",
                self.evaluate_params(0),
                dict(base),
                step=0,
                **loc,
            ).name
        ]
        for tname, t in self.spec.threats.items():
            if t.search is not None:
                # no static nodes: the engine asks the study for each trial (StudyPlan)
                self.studies.append(self.study_plan(row, useed, prefix, base, tname, t))
                continue
            evals += self.attack_nodes(prefix, loc, base, tname, t)
        return evals

    def attack_nodes(
        self, prefix: str, loc: dict[str, Any], base: dict[str, str], tname: str, t: Any
    ) -> list[str]:
        """The attack nodes of threat ``t`` (named ``tname`` in node names), one per attack
        seed, and their evaluations; returns the evaluate node names."""
        if t.algorithm == "perturb":
            return self.perturb_nodes(prefix, loc, base, tname, t)
        evals: list[str] = []
        # ``search`` left out: a search trial's threat (search None) has the key of the
        # fixed threat with its values, and a spec without search keeps its keys.
        tparams = t.model_dump(mode="json", exclude={"seeds", "search", "eval_at"})
        if tparams.get("stages") is None:
            tparams.pop("stages", None)  # a plain threat keeps the key it had before stages
        if tparams.get("embedding") is None:
            tparams.pop("embedding", None)  # as for stages: keys from before embedding attacks
        tparams.pop("perturb", None)  # None here (perturb_nodes): keys from before it
        # every dataset it reads: its data, poison and prior, or each stage's data and poison
        read = [t.data, t.poison.data if t.poison else None, t.prior]
        for st in t.stages or ():
            read += [st.data, st.poison.data if st.poison else None]
        datasets = self.closure(read)
        for seed in t.seeds:
            deps = {**base, **self.harvest_deps(datasets)}
            prev: str | None = None
            for step in sorted(set(t.eval_at)):
                # one segment per evaluation step: its key is the attack and where it stops,
                # not the list of evaluation steps (steps/attack.py); ``resume`` orders it
                # after the previous segment, whose state it continues, and is not in the key
                params = {"threat": tparams, "seed": seed, "stop": step, "datasets": datasets}
                seg_deps = dict(deps) if prev is None else {**deps, "resume": prev}
                at = self.add(
                    "attack",
                    f"attack/{prefix}/{tname}/seed{seed}/step{step}",
                    params,
                    seg_deps,
                    threat=tname,
                    seed=seed,
                    step=step,
                    **loc,
                )
                prev = at.name
                evals.append(self.evaluation(prefix, loc, base, tname, seed, step, at.name))
        return evals

    def evaluation(
        self,
        prefix: str,
        loc: dict[str, Any],
        base: dict[str, str],
        tname: str,
        seed: int,
        step: int,
        attack: str,
    ) -> str:
        """The evaluate node of the attack node ``attack`` (threat ``tname``, attack seed,
        step); returns its name."""
        return self.add(
            "evaluate",
            f"evaluate/{prefix}/{tname}/seed{seed}/step{step}",
            self.evaluate_params(step),
            {**base, "attack": attack},
            threat=tname,
            seed=seed,
            step=step,
            **loc,
        ).name

    def perturb_nodes(
        self, prefix: str, loc: dict[str, Any], base: dict[str, str], tname: str, t: Any
    ) -> list[str]:
        """The nodes of an ``algorithm: perturb`` threat: per attack seed, one attack node per
        radius (``.../step<k>`` for the ``k``-th radius, as eval_at's steps; no ``resume``:
        each radius starts from the row) and its evaluation. The attack's params are what it
        reads: ``threat`` (algorithm, the perturb block without ``radii``, data), ``radius``,
        ``seed`` and the specs of its data, so adding a radius at the end adds nodes and
        changes no key."""
        assert t.perturb is not None  # the schema's rule for algorithm perturb
        block = t.perturb.model_dump(mode="json", exclude={"radii"})
        tparams = {"algorithm": t.algorithm, "perturb": block, "data": t.data}
        datasets = self.closure([t.data])
        evals: list[str] = []
        for seed in t.seeds:
            deps = {**base, **self.harvest_deps(datasets)}
            for step, radius in enumerate(t.perturb.radii, start=1):
                params = {"threat": tparams, "seed": seed, "radius": radius, "datasets": datasets}
                at = self.add(
                    "attack",
                    f"attack/{prefix}/{tname}/seed{seed}/step{step}",
                    params,
                    dict(deps),
                    threat=tname,
                    seed=seed,
                    step=step,
                    **loc,
                )
                evals.append(self.evaluation(prefix, loc, base, tname, seed, step, at.name))
        return evals

    def study_plan(
        self, row: str, useed: int | None, prefix: str, base: dict[str, str], tname: str, t: Any
    ) -> StudyPlan:
        upstream = self.graph.nodes[base.get("unlearn", base["model"])].key
        threat = t.model_dump(mode="json")
        if threat.get("stages") is None:
            threat.pop("stages", None)  # as in attack_nodes: keys from before stages hold
        if threat.get("embedding") is None:
            threat.pop("embedding", None)  # likewise for embedding attacks
        threat.pop("perturb", None)  # None: a perturb threat cannot be searched
        for f, empty in (("report_at", []), ("pruner", None)):
            if threat["search"].get(f) == empty:
                threat["search"].pop(f, None)  # and for studies from before pruning
        # what the trials' attack nodes leave out of their keys (AttackStep.key_exclude: the
        # checkpoint cadence) the study's key leaves out too
        threat = key_params("attack", {"threat": threat})["threat"]
        ident = {
            "threat": threat,
            "upstream": upstream,
            "evaluate": self.evaluate_params(0),
        }
        key = hashlib.sha256(canonical_json(ident).encode()).hexdigest()
        return StudyPlan(f"search/{prefix}/{tname}", key, row, useed, tname, prefix, dict(base))

    def compile(self) -> Graph:
        self.model()
        if self.spec.controls.oracle:
            self.oracle_model()
        rows = self.rows()
        evals: list[str] = []
        for row in rows:
            evals += self.row(row)
        probes = self.probes() if self.spec.probes is not None else []
        params = {
            "title": self.spec.name,  # the report's heading
            "rows": rows,
            "unlearn_seeds": {
                n: list(u.seeds or [u.seed]) for n, u in self.r.rows.items() if u.method != "none"
            },
            "threats": {
                n: {
                    "seeds": t.seeds,
                    "eval_at": t.eval_at,
                    "steps": t.steps,
                    # a perturb threat's step k is its k-th radius (the report plots radii)
                    **({"radii": t.perturb.radii} if t.perturb is not None else {}),
                }
                for n, t in self.spec.threats.items()
                if t.search is None  # searched threats: reported from their studies
            },
            "resurgence": self.spec.report.resurgence.model_dump(mode="json"),
            "reference": self.spec.report.reference,  # the row method rows are paired with
        }
        # the unlearned models too: the report summarises their outer steps (steps.jsonl)
        unlearned = [n.name for n in self.graph.of_kind("unlearn")]
        deps = {e: e for e in evals} | {p: p for p in probes} | {u: u for u in unlearned}
        self.add("report", "report", params, deps)
        return self.graph

    def probe_params(self, quantities: Sequence[str]) -> dict[str, Any]:
        """A probe node's params: its quantities and exactly the settings they read."""
        pr = self.spec.probes
        assert pr is not None
        params: dict[str, Any] = {"quantities": list(quantities)}
        if any(q != "weight_distance" for q in quantities):
            params.update(
                data=pr.data,
                datasets=self.closure([pr.data]),
                batch_size=pr.batch_size,
                seed=pr.seed,
            )
        if "lambda_max" in quantities:
            params.update(power_iterations=pr.power_iterations, power_tol=pr.power_tol)
        if "hessian_trace" in quantities:
            params["hutchinson_samples"] = pr.hutchinson_samples
        return params

    def probes(self) -> list[str]:
        """The ``probes`` block's nodes, added after every other node but the report:
        ``probe/<prefix>/pre`` beside each pre-attack evaluation (its model), and with
        ``probes.along_attack`` ``probe/<prefix>/<threat>/seed<a>/step<n>`` after each attack
        segment whose result is a UNet (not ``embedding``, which leaves it unchanged).
        Search trials get none. Returns their names."""
        pr = self.spec.probes
        assert pr is not None
        out: list[str] = []
        pre = self.probe_params(pr.quantities)
        along = self.probe_params(pr.along_attack) if pr.along_attack else None
        data = self.closure([pr.data])
        for n in list(self.graph):
            base = {r: d for r, d in n.deps.items() if r in ("model", "unlearn")}
            loc = {"row": n.row, "unlearn_seed": n.unlearn_seed}
            if n.kind == "evaluate" and n.threat is None:
                params, name = pre, "probe/" + n.name[len("evaluate/") : -len("/step0")]
            elif (
                n.kind == "attack"
                and along is not None
                and n.params["threat"].get("algorithm") in _UNET_ATTACKS
            ):
                params, name = along, "probe/" + n.name[len("attack/") :]
                base["attack"] = n.name
                loc.update(threat=n.threat, seed=n.seed, step=n.step)
            else:
                continue
            deps = {**base, **self.harvest_deps(data if "datasets" in params else {})}
            out.append(self.add("probe", name, params, deps, **loc).name)
        return out


def spec_hash(resolved: ResolvedSpec) -> str:
    """sha256 of the resolved spec without volatile parts: tracking, execution, device and absolute
    locations (the node keys carry the fingerprints of what is at those locations)."""
    data = resolved.spec.model_dump(
        mode="json", exclude={"tracking": True, "execution": True, "model": {"device"}}
    )
    data["rows"] = {n: u.model_dump(mode="json") for n, u in resolved.rows.items()}
    for t in data.get("threats", {}).values():
        if t.get("perturb") is None:
            t.pop("perturb", None)  # the hash of a spec without perturb threats stays as it was
    if data.get("probes") is None:
        data.pop("probes", None)  # a spec without probes keeps the hash it had before them

    def strip(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {
                k: strip(v)
                for k, v in obj.items()
                if not (
                    isinstance(v, str)
                    and v.startswith("/")
                    and (k == "path" or k.endswith("_path") or k == "pretrained")
                )
            }
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    return hashlib.sha256(canonical_json(strip(data)).encode()).hexdigest()


def compile_spec(resolved: ResolvedSpec) -> Graph:
    """The execution graph of ``resolved``, nodes in topological order.

    Node names: ``model`` (and ``model/oracle`` with ``controls.oracle``), ``harvest/<dataset>``,
    ``unlearn/<row>/seed<u>``,
    ``attack/<row>/seed<u>/<threat>/seed<a>/step<n>`` (the attack's segment that ends at
    evaluation step ``n``; ``resume`` dep: the previous segment; for ``algorithm: perturb``
    the ``n``-th radius, no ``resume``), ``evaluate/<row>/seed<u>/pre/step0`` (before
    any attack: ``threat`` and ``seed`` None, ``step`` 0),
    ``evaluate/<row>/seed<u>/<threat>/seed<a>/step<n>`` (``u`` an unlearning seed of the
    row, ``a`` an attack seed of the threat; rows without unlearning have no ``seed<u>``
    segment), ``report`` (deps: role = name of each evaluate node).
    """
    return _Compiler(resolved).compile()


def search_plans(resolved: ResolvedSpec) -> list[StudyPlan]:
    """Every attacker search of ``resolved``: one per (row, unlearning seed, searched threat),
    rows in report order."""
    return compile_with_searches(resolved)[1]


def compile_with_searches(resolved: ResolvedSpec) -> tuple[Graph, list[StudyPlan]]:
    """:func:`compile_spec` and :func:`search_plans` of ``resolved`` from one compilation
    (what a run plans before it starts)."""
    c = _Compiler(resolved)
    graph = c.compile()
    return graph, c.studies


def trial_graph(
    resolved: ResolvedSpec, graph: Graph, trials: Sequence[tuple[StudyPlan, int, Any]]
) -> Graph:
    """The nodes of search trials: for each (study, trial number, fixed threat), the attack
    nodes of that threat (one per attack seed) and their evaluations at its last step, named
    with ``<threat>:trial<k>`` and keyed exactly as a fixed threat with those values would
    be; with the upstream nodes of ``graph`` (model, harvests, unlearning) they read."""
    c = _Compiler(resolved)
    c.graph = Graph(spec_name=graph.spec_name, spec_hash=graph.spec_hash)
    for n in graph:
        if n.kind in ("model", "harvest", "unlearn"):
            c.graph.nodes[n.name] = n
    for plan, k, threat in trials:
        loc = {"row": plan.row, "unlearn_seed": plan.unlearn_seed}
        c.attack_nodes(plan.prefix, loc, plan.base, plan.trial_threat(k), threat)
    return c.graph
