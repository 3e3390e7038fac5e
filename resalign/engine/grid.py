"""Run a grid of specs rendered from a template (:mod:`resalign.spec.templates`).

Every cell is rendered, validated (files checked) and compiled before the first node runs.
Cells then run one after another through :func:`resalign.engine.run.run_spec` on one store,
so a node shared by several cells (the model, the original row's attacks and evaluations, a
harvest) runs once and is a cache hit for every later cell. MLflow: one grid run, and under it
one run per cell (the run ``run_spec`` creates for the cell's graph, nested under the grid run
through ``parent_run_id``, named by the cell id and tagged ``grid.cell`` / ``grid.axis.<name>``,
with the axis values also logged as params ``axis.<name>`` for the compare and
parallel-coordinates views); the node runs sit under their cell's run as usual, and so do
the cell's search rounds, tagged with the cell's tags as its trials' attack runs are. The grid run
gets the totals as metrics: ``grid.executed``, ``grid.cache_hits``, ``grid.seconds``.

The grid's manifest ``<store>/grids/<grid name>/grid.json`` lists each cell's id, axes, spec
name, report node key and MLflow run: :func:`report_cells` reads a template back into
``(cell id, resolved spec)`` pairs for ``resalign report``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..spec.templates import GridTemplate, RenderedCell, load_template, render_grid
from .options import RunOptions


@dataclass
class CellResult:
    cell_id: str
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    seconds: float = 0.0
    run_id: str | None = None
    ok: bool = True
    error: str | None = None


@dataclass
class GridSummary:
    name: str
    cells: list[CellResult]
    seconds: float
    parent_run_id: str | None = None
    tracking_uri: str | None = None
    manifest: Path | None = None

    @property
    def executed(self) -> int:
        return sum(len(c.executed) for c in self.cells)

    @property
    def cache_hits(self) -> int:
        """Node executions the cache saved: nodes of a cell that were already complete."""
        return sum(len(c.cached) for c in self.cells)


def prepare(
    template: str | Path, *, check_files: bool = False, sets: Sequence[str] = ()
) -> tuple[GridTemplate, list]:
    """Load, render and validate every cell (``sets``: ``--set`` items applied to each) and
    compile its graph; nothing runs.

    Returns the template and ``[(rendered cell, graph)]``; raises ``UserError`` listing every
    problem of every cell.
    """
    from ..graph.compile import compile_spec

    tpl = load_template(template)
    rendered = render_grid(tpl, check_files=check_files, sets=sets)
    out, problems = [], []
    for rc in rendered:
        try:
            out.append((rc, compile_spec(rc.spec)))
        except UserError as e:
            problems.append(f"cell {rc.cell.id}: {e.render()}")
    if problems:
        raise UserError(
            "\n".join(problems) + "\nno cell was run", where=str(tpl.path), hint="fix the template"
        )
    return tpl, out


def list_table(tpl: GridTemplate) -> str:
    """The cells as an aligned text table: id, then one column per axis."""
    head = ["cell", *tpl.axes]
    spelt = [c.spelt for c in tpl.cells]  # as in the id: 1e-5, not 1e-05
    rows = [[c.id, *[sp.get(a, "") for a in tpl.axes]] for c, sp in zip(tpl.cells, spelt)]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head).rstrip()] + [fmt.format(*r).rstrip() for r in rows]
    return "\n".join(lines + [f"{len(rows)} cells in grid {tpl.name!r}"])


def estimate_table(template: str | Path, store_root: str | Path, sets: Sequence[str] = ()) -> str:
    """``grid --list --estimate``: per cell, its nodes to run and their predicted time
    (:mod:`.estimate`), then the grid's total, where a node that several cells share (same
    key) counts once."""
    from .estimate import duration, estimate, history, load_note, search_estimates
    from .plan import plan_status
    from .store import Store

    store = Store(store_root)
    recorded = history(store)
    tpl, prepared = prepare(template, sets=sets)
    lines, seen = [], {}
    trials_s = [0.0, 0.0, 0.0]
    without = 0
    for rc, graph in prepared:
        to_run = [n for n, st in plan_status(graph, store).items() if st.state == "run"]
        est = estimate(graph, to_run, recorded)
        searches = search_estimates(rc.spec, graph, recorded)
        extra = ""
        for plan, trials, one in searches:
            if one.without_history:
                without += 1
                continue
            key = f"search:{plan.key}"  # a study shared by cells (same key) counts once
            if key not in seen:
                seen[key] = True
                for i, v in enumerate((one.seconds, one.low, one.high)):
                    trials_s[i] += trials * v
        if searches:
            known = [(t, o) for _, t, o in searches if not o.without_history]
            tot = sum(t * o.seconds for t, o in known)
            extra = f"; searches {duration(tot)} ({len(known)} of {len(searches)} estimated)"
        for name in to_run:
            seen.setdefault(graph[name].key, est.per_node[name])
        note = f", {est.without_history} without history" if est.without_history else ""
        lines.append(
            f"{rc.cell.id}: {len(to_run)} node(s) to run, {duration(est.seconds)} "
            f"[{duration(est.low)}, {duration(est.high)}]{note}{extra}"
        )
    nodes = [v for k, v in seen.items() if not k.startswith("search:")]
    known = [v for v in nodes if v is not None]
    total = [sum(v[i] for v in known) + trials_s[i] for i in range(3)]
    lines.append(
        f"grid {tpl.name!r}: {len(nodes)} distinct node(s) to run, {duration(total[0])} "
        f"[{duration(total[1])}, {duration(total[2])}] of node time (serial; shared nodes "
        "once; searches: trials x one trial at the middle of every range)"
        + (f", not counting {len(nodes) - len(known)} node(s) without history"
           if len(known) < len(nodes) else "")
        + (f" and {without} search(es) without history" if without else "")
    )  # fmt: skip
    if note := load_note():
        lines.append(note)
    return "\n".join(lines)


def _cell_spec(rc: RenderedCell) -> Any:
    """The cell's resolved spec, its run named by the cell id; a ResolvedSpec, as `resalign
    run` passes, so that the ``--set`` items it was loaded with reach the run's params."""
    spec = rc.spec.spec
    named = spec.model_copy(
        update={"tracking": spec.tracking.model_copy(update={"run_name": rc.cell.id})}
    )
    return dataclasses.replace(rc.spec, spec=named)


class _GridTracking:
    """The grid's MLflow run and the re-parenting of each cell's run under it."""

    def __init__(self, uri: str, experiment: str, tpl: GridTemplate, store_root: Path):
        from .tracking import _client, artifact_location, check_reachable, setup_lock

        check_reachable(uri)
        self.client = _client(uri)
        with setup_lock(uri):  # a new SQLite database: one process migrates it
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                loc = artifact_location(uri, store_root)
                self.experiment_id = self.client.create_experiment(
                    experiment, artifact_location=loc
                )
            else:
                self.experiment_id = exp.experiment_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"grid {tpl.name}",
            tags={
                "resalign.grid": tpl.name,
                "resalign.grid.template": str(tpl.path),
                "resalign.grid.cells": str(len(tpl.cells)),
                "resalign.grid.axes": ",".join(tpl.axes),
            },
        )
        self.run_id = run.info.run_id
        self.grid_name = tpl.name

    def cell_tags(self, rc: RenderedCell) -> dict[str, str]:
        return {"resalign.grid": self.grid_name, **rc.cell.tags}

    def find_cell_run(self, rc: RenderedCell, since_ms: int) -> str | None:
        """The cell's run (a failed cell's): a child of the grid run named by the cell id;
        its search rounds share the name and tags but are children of the cell's run."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"attributes.run_name = '{rc.cell.id}' "
            f"and tags.mlflow.parentRunId = '{self.run_id}' "
            f"and attributes.start_time >= {since_ms}",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        return runs[0].info.run_id if runs else None

    def finish(self, status: str, results: Sequence[CellResult], seconds: float) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        totals = {
            "grid.executed": sum(len(r.executed) for r in results),
            "grid.cache_hits": sum(len(r.cached) for r in results),
            "grid.seconds": seconds,
            "grid.cells_done": sum(1 for r in results if r.ok),
        }
        try:
            self.client.log_batch(
                self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in totals.items()]
            )
        finally:
            self.client.set_terminated(self.run_id, status=status)


def run_grid(
    template: str | Path,
    options: RunOptions | None = None,
    *,
    cells: Sequence[str] | None = None,
) -> GridSummary:
    """Run the grid's cells (all, or the ids in ``cells``) after validating all of them, each
    through :func:`.run.run_spec` with ``options`` (``options.sets`` are applied to every
    cell; ``options.command`` is the grid's command, for the resume line).

    Each cell's run (its graph's and its searches') is nested under the grid's MLflow run,
    tagged with the cell's axes; one executor from ``options`` serves every cell's graph
    runs (:meth:`.options.RunOptions.shared_executor`), shut down after the last.
    """
    from .run import run_spec
    from .store import atomic_write_json
    from .tracking import resolve_tracking_uri

    o = options or RunOptions()
    t0 = time.perf_counter()
    tpl, prepared = prepare(template, check_files=True, sets=o.sets)
    if cells:
        for c in cells:
            tpl.cell(c)  # a user error naming the grid's cells when there is no such cell
        prepared = [(rc, g) for rc, g in prepared if rc.cell.id in cells]
    store = Path(o.store)
    store.mkdir(parents=True, exist_ok=True)
    tracker = None
    uri = None
    first_spec = prepared[0][0].spec.spec
    if o.tracking and first_spec.tracking.enabled:
        uri = resolve_tracking_uri(o.tracking_uri, first_spec.tracking.uri, store.resolve())
        tracker = _GridTracking(uri, first_spec.tracking.experiment, tpl, store.resolve())
    grid_options = o.replace(
        store=store,
        tracking=tracker is not None,
        tracking_uri=uri,
        command=o.command or ("resalign", "grid", str(tpl.path), "--run"),
        parent_run_id=tracker.run_id if tracker is not None else None,
    )

    results: list[CellResult] = []
    status = "FINISHED"
    # one worker pool for every cell (and its searches' rounds): a fresh pool per cell paid
    # the workers' imports and first model load again (RunOptions.shared_executor)
    try:
        with grid_options.shared_executor() as shared:
            for rc, _ in prepared:
                res = CellResult(rc.cell.id)
                results.append(res)
                since = int(time.time() * 1000) - 1000
                cell_options = shared.replace(
                    tags=tracker.cell_tags(rc) if tracker is not None else {},
                    params={f"axis.{k}": v for k, v in rc.cell.spelt.items()},
                )
                # the cell's graph, then its attacker searches (issue 16); studies shared by
                # cells (e.g. the original row's) are in the store already
                run = run_spec(_cell_spec(rc), cell_options)
                if not run.ok or run.summary is None:
                    res.ok, res.error = False, f"failed: {', '.join(run.failed)}"
                    status = "FAILED"
                    if tracker is not None:
                        res.run_id = tracker.find_cell_run(rc, since)
                    break
                summary = run.summary
                res.executed = list(summary.executed)
                res.cached = list(summary.cached)
                res.seconds = summary.seconds
                res.run_id = summary.parent_run_id
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if tracker is not None:
            tracker.finish(status, results, time.perf_counter() - t0)
        manifest = store / "grids" / tpl.name / "grid.json"
        atomic_write_json(
            manifest,
            {
                "grid": tpl.name,
                "template": str(Path(tpl.path).resolve()),
                "axes": tpl.axes,
                "parent_run_id": tracker.run_id if tracker else None,
                "tracking_uri": uri,
                "cells": [
                    {
                        "id": rc.cell.id,
                        "axes": {k: v for k, v in rc.cell.axes.items()},
                        "spec_name": rc.spec.name,
                        "report_key": next((n.key for n in g.of_kind("report")), None),
                        **(
                            {
                                "run_id": r.run_id,
                                "executed": r.executed,
                                "cached": r.cached,
                                "seconds": r.seconds,
                                "ok": r.ok,
                            }
                            if (r := next((x for x in results if x.cell_id == rc.cell.id), None))
                            else {}
                        ),
                    }
                    for rc, g in prepared
                ],
            },
        )
    failed = [r for r in results if not r.ok]
    if failed:
        raise UserError(
            f"grid {tpl.name!r}: cell {failed[0].cell_id} failed; later cells were not run",
            hint="fix the failure and run the same command again: finished nodes are cached",
        )
    return GridSummary(
        name=tpl.name,
        cells=results,
        seconds=time.perf_counter() - t0,
        parent_run_id=tracker.run_id if tracker else None,
        tracking_uri=uri,
        manifest=manifest,
    )


def report_cells(template: str | Path) -> list[tuple[str, Any]]:
    """``[(cell id, resolved spec)]`` of a grid, in cell order, for a one-row-per-cell report.

    The resolved specs compile to the same graphs (and node keys) the grid ran, so a report
    finds each cell's evaluations in the store by key.
    """
    tpl = load_template(template)
    return [(rc.cell.id, rc.spec) for rc in render_grid(tpl)]


def manifest(store_root: str | Path, grid_name: str) -> dict[str, Any]:
    """The manifest a grid run wrote (cells, axes, run ids, executed/cached node names)."""
    p = Path(store_root) / "grids" / grid_name / "grid.json"
    if not p.exists():
        raise UserError(f"grid {grid_name!r} has not run in {store_root}", where=str(p))
    return json.loads(p.read_text())
