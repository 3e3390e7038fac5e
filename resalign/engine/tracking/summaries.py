"""Summary runs (the report's numbers where MLflow compares them) and the links from a cached
node to the run that holds its result.

**Summary runs.** When an invocation computes its ``report`` node, it adds one MLflow run per
report row and unlearning seed (:func:`resalign.evaluation.summary.row_summaries`: short keys
such as ``concept_rate/pre``, ``concept_rate/<threat>/step100``, ``relearning_area/<threat>``,
``retain_accuracy/pre``, and ``unlearn/resilience_ratio`` and the other outer-step medians),
tagged ``resalign.kind = summary`` with the node tags' row, method
and unlearning seed, the row's unlearn params, and links to the invocation and the report
run. They are top-level runs of the experiment, not children of the invocation's run: MLflow
3.17's runs table shows child runs collapsed under their parent (also under a search filter),
so top-level runs are what the runs table lists on opening, and what its compare view,
parallel-coordinates plot and Group by (``resalign.row``) work on. One run per unlearning seed
rather than metrics on the parent run: the compare view compares runs, a metric per row on one
run would be one bar each (``relearn_area.concept_rate.<threat>.plain``), and MLflow's
grouping aggregates a group's runs (mean, min, max) over the seeds by itself.

The runs are described in ``invocation.json`` (``summaries``) before any of them is created,
so ``resalign sync`` creates what a server outage left out, once.

**Cached nodes.** A node the invocation did not execute is linked from the invocation's run by
the tag ``resalign.cached.<node name>`` = the id of the run that holds its result (the last
finished run of that node key in this store's sync records for the same tracking URI;
``not tracked`` when it ran without tracking), and the run's description lists them as links.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..store import atomic_write_json, read_json
from .describe import METHOD, ROW, UNLEARNING_SEED, node_params
from .records import _log_batch_chunked, _params_entities, _tags

_ROW_PARAMS = ("unlearn.", "trainable.")
KIND_SUMMARY = "summary"
NOT_TRACKED = "not tracked"
# MLflow 3.17's runs table shows no metric columns until one picks them ("Columns"); a shared
# view, an experiment tag ``mlflow.sharedViewState.<key>`` holding the table's state as JSON,
# opened with ``&viewStateShareKey=<key>``, picks the summary metrics (resalign ui prints it).
VIEW_KEY = "resalign"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"


def runs_view(metric_keys: list[str]) -> dict[str, Any]:
    """The runs table's state of the shared view: the summary metrics as columns, in the
    report's order, newest runs first."""
    cols = [f"metrics.`{k}`" for k in metric_keys]
    return {
        "selectedColumns": cols,
        "columnOrder": cols,
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
    }


def finished_runs(store_root: Path, uri: str) -> dict[tuple[str, str], str]:
    """(kind, key) → run id of the latest finished node run logged to ``uri`` from this
    store (its sync records), and ("summaries", report key) → the summary run ids."""
    out: dict[tuple[str, str], tuple[float, str]] = {}
    for inv_path in Path(store_root, "tracking").glob("*/invocation.json"):
        inv = read_json(inv_path)
        if not inv or inv.get("uri") != uri:
            continue
        for p in (inv_path.parent / "nodes").glob("*.json"):
            rec = read_json(p)
            if rec and rec.get("run_id") and rec.get("status") == "FINISHED":
                if rec.get("tags", {}).get("resalign.node.done_by"):
                    continue  # closed while another invocation computed it
                when = p.stat().st_mtime
                k = (rec["kind"], rec["key"])
                if k not in out or out[k][0] < when:
                    out[k] = (when, rec["run_id"])
        summ = inv.get("summaries") or {}
        ids = [s["run_id"] for s in summ.get("runs", []) if s.get("run_id")]
        if ids and summ.get("report_key"):
            k = ("summaries", summ["report_key"])
            when = inv_path.stat().st_mtime
            if k not in out or out[k][0] < when:
                out[k] = (when, ",".join(ids))
    return {k: v for k, (_, v) in out.items()}


def summary_runs(
    graph: Any, store_root: Path, spec_name: str, methods: Mapping[str, str]
) -> list[dict[str, Any]]:
    """The summary runs of ``graph``'s report (see the module docstring) as
    ``{"name", "tags", "params", "metrics"}``, from the evaluation results in the store."""
    from ...evaluation.dynamics import dynamics_from_store
    from ...evaluation.report import results_from_store
    from ...evaluation.summary import row_summaries
    from ..store import Store

    reports = graph.of_kind("report")
    if not reports:
        return []
    params = reports[0].params
    complete = Store(store_root).is_complete
    results = results_from_store(graph, Path(store_root), complete=complete)
    outer = dynamics_from_store(graph, Path(store_root), complete)
    unlearn = {(n.row, n.unlearn_seed): n for n in graph.of_kind("unlearn")}
    runs = []
    for s in row_summaries(results, params.get("rows"), params.get("threats"), outer):
        seed = "" if s.unlearn_seed is None else f" u{s.unlearn_seed}"
        method = methods.get(s.row, "none")
        tags = {"resalign.kind": KIND_SUMMARY, ROW: s.row, METHOD: method,
                "resalign.spec": spec_name}  # fmt: skip
        run_params = {"row": s.row, "method": method}
        if s.unlearn_seed is not None:
            tags[UNLEARNING_SEED] = str(s.unlearn_seed)
            run_params["unlearning_seed"] = str(s.unlearn_seed)
        node = unlearn.get((s.row, s.unlearn_seed))
        if node is not None:  # how this row unlearned, as its unlearn run logs it (the
            # concepts and data sets, the same for every row, are on that run)
            run_params.update(
                {k: v for k, v in node_params(node).items() if k.startswith(_ROW_PARAMS)}
            )
        runs.append(
            {
                "name": f"{s.row}{seed} · {spec_name}",
                "tags": tags,
                "params": run_params,
                "metrics": s.metrics,
            }
        )
    return runs


def _note(inv: Mapping[str, Any]) -> str:
    exp = inv["experiment_id"]
    lines = []
    summ = inv.get("summaries") or {}
    if summ.get("runs"):
        lines.append("Summary runs (one per report row and unlearning seed):")
        lines += [
            f"- [{s['name']}](#/experiments/{exp}/runs/{s['run_id']})"
            for s in summ["runs"]
            if s.get("run_id")
        ]
    elif summ.get("linked"):
        lines.append("The report was cached; its summary runs:")
        lines += [f"- [{r}](#/experiments/{exp}/runs/{r})" for r in summ["linked"].split(",")]
    if inv.get("cached"):
        lines.append("")
        lines.append(f"Cached results ({len(inv['cached'])} nodes, computed by earlier runs):")
        for name, run_id in inv["cached"].items():
            lines.append(
                f"- {name}: {run_id}"
                if run_id == NOT_TRACKED
                else f"- [{name}](#/experiments/{exp}/runs/{run_id})"
            )
    return "\n".join(lines).strip()


def sync_summaries(client: Any, inv_dir: Path, inv: dict[str, Any]) -> None:
    """Create the summary runs ``inv`` describes that have no run yet (each is saved to
    ``invocation.json`` as soon as it exists), and the invocation run's description."""
    summ = inv.get("summaries") or {}
    parent = inv["parent_run_id"]
    for s in summ.get("runs", []):
        if s.get("run_id") is None:
            tags = dict(s["tags"], **{"resalign.invocation": parent})
            if summ.get("report_run"):
                tags["resalign.report_run"] = summ["report_run"]
            run = client.create_run(inv["experiment_id"], run_name=s["name"], tags=tags)
            s["run_id"] = run.info.run_id
            atomic_write_json(inv_dir / "invocation.json", inv)
        if not s.get("logged"):
            from mlflow.entities import Metric

            _log_batch_chunked(
                client,
                s["run_id"],
                params=_params_entities(s["params"]),
                metrics=[Metric(k, float(v), 0, 0) for k, v in s["metrics"].items()],
            )
            client.set_terminated(s["run_id"], status="FINISHED")
            s["logged"] = True
            atomic_write_json(inv_dir / "invocation.json", inv)
    keys = list(dict.fromkeys(k for x in summ.get("runs", []) for k in x["metrics"]))
    if keys and not summ.get("view_set"):
        client.set_experiment_tag(inv["experiment_id"], VIEW_TAG, json.dumps(runs_view(keys)))
        summ["view_set"] = True
    note = _note(inv)
    if note and inv.get("note") != note:
        _log_batch_chunked(client, parent, tags=_tags({"mlflow.note.content": note}))
        inv["note"] = note


def describe_summaries(tracker: Any, graph: Any) -> dict[str, Any] | None:
    """What the invocation's ``summaries`` record holds: the runs to create when this
    invocation computed the report (or no run holds it yet), else a link to the summary runs
    of the invocation that did. None without a completed report."""
    from ..store import Store

    reports = graph.of_kind("report")
    if not reports or not Store(tracker.store_root).is_complete("report", reports[0].key):
        return None
    key = reports[0].key
    rec = read_json(tracker.inv_dir / "nodes" / f"report-{key}.json")
    executed = bool(rec and rec.get("status") == "FINISHED")
    earlier = tracker.finished_runs().get(("summaries", key))
    if not executed and earlier:
        return {"report_key": key, "linked": earlier, "runs": []}
    runs = summary_runs(graph, tracker.store_root, graph.spec_name, tracker.methods)
    report_run = rec.get("run_id") if executed else tracker.finished_runs().get(("report", key))
    return {"report_key": key, "report_run": report_run, "runs": runs}


__all__ = ["KIND_SUMMARY", "NOT_TRACKED", "describe_summaries", "finished_runs", "summary_runs"]
