"""``resalign report`` from a store: compile a spec (or every cell of a grid template), read
its evaluation results, probes and searches from the store, and hand them to the report
pipeline (:func:`resalign.evaluation.report.write_report`); for a grid, also the frontier.

Why this is not in :mod:`resalign.evaluation.report`: it compiles the graph and uses the
engine's store and search records, and ``evaluation/`` imports neither (the report step,
which the graph's step registry imports, must not import the graph back). The pipeline
itself (results → table → render → plots) is that package; this module only finds the
inputs and names the output folder.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import UserError
from .evaluation.dynamics import ModelDynamics, dynamics_from_store
from .evaluation.predictors import predictors_from_probes, probe_results_from_store
from .evaluation.report import CONTROL_ROWS, EvalResult, results_from_store, write_report


def is_template(path: str | Path) -> bool:
    """A grid template (``*.j2``) rather than a spec: ``resalign report`` reports its cells."""
    return str(path).endswith(".j2")


def _complete(store_root: Path | str) -> Any:
    """The store's own completeness test: ``DONE`` exists and the files match its manifest,
    so a damaged evaluation is reported missing instead of read."""
    from .engine.store import Store

    return Store(store_root).is_complete


def report_for_spec(
    spec_path: str,
    store_root: Path,
    out: Path | None = None,
    all_steps: bool = False,
    sets: Sequence[str] = (),
) -> Path:
    """``resalign report SPEC``: compile the spec (with the ``--set`` items the run used),
    read its evaluate results from the store, write the report (default:
    ``<store>/reports/<spec name>/``). Returns the folder."""
    from .graph.compile import compile_spec
    from .spec import load_spec

    resolved = load_spec(spec_path, sets=sets)
    graph = compile_spec(resolved)
    results = results_from_store(graph, Path(store_root), spec_path, _complete(store_root))
    probes = probe_results_from_store(graph, Path(store_root), spec_path, _complete(store_root))
    steps = dynamics_from_store(graph, Path(store_root), _complete(store_root))
    report_node = graph.of_kind("report")[0] if graph.of_kind("report") else None
    params = report_node.params if report_node is not None else {}
    out = Path(out) if out else Path(store_root) / "reports" / graph.spec_name
    write_report(
        results,
        out,
        rows=params.get("rows"),
        threats=params.get("threats"),
        resurgence=params.get("resurgence"),
        reference=params.get("reference"),
        title=f"resalign report: {graph.spec_name}",
        all_steps=all_steps,
        searches=_searches(resolved, graph, Path(store_root)),
        predictors=predictors_from_probes(probes),
        dynamics=steps,
    )
    return out


def _searches(resolved: Any, graph: Any, store_root: Path) -> list[dict[str, Any]]:
    """The attacker searches of a spec as far as the store holds their trials (issue 16)."""
    from .graph.compile import search_plans

    if not search_plans(resolved):
        return []
    from .engine.search import study_records

    return [r.as_dict() for r in study_records(resolved, graph, store_root)]


@dataclasses.dataclass
class GridResults:
    """A grid's results with rows renamed per cell. ``groups``: unlearn row label (the
    method's row in every cell) → [(renamed row, cell id)]."""

    name: str
    path: Path
    results: list[EvalResult]
    rows: list[str]
    threats: dict[str, Any]
    groups: dict[str, list[tuple[str, str]]]
    cells: int
    # attacker searches (issue 16), rows renamed as the results' rows
    searches: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # the template's report.resurgence and report.reference (the first cell's; cells that
    # differ are an error)
    resurgence: dict[str, Any] | None = None
    reference: str | None = None
    # the unlearned models' outer steps (resalign.evaluation.dynamics), rows renamed as above
    dynamics: list[ModelDynamics] = dataclasses.field(default_factory=list)


def grid_results(
    template_path: str,
    store_root: Path,
    sets: Sequence[str] = (),
    only: Sequence[str] = (),
) -> GridResults:
    """Every cell rendered and compiled as ``resalign grid --run`` did (same node keys), its
    evaluate results read from the store. A cell's row is named by the cell id (``<cell
    id>/<row>`` when the cell has several unlearned rows). The ``original`` row is shown once,
    first, when every cell shares its evaluate nodes (same keys); otherwise once per cell as
    ``<cell id>/original``; the oracle control's row (``controls.oracle``) likewise, after it.
    Control rows are never a cell's method (nor on the frontier). Threats are the union over
    cells. ``sets``: the ``--set`` items the grid ran with (applied to every cell); ``only``:
    these cell ids alone (``--cell``; default: every cell)."""
    from .graph.compile import compile_spec
    from .spec.templates import load_template, render_grid

    tpl = load_template(template_path)
    for c in only:
        tpl.cell(c)  # a user error naming the grid's cells when there is no such cell
    rendered = render_grid(tpl, sets=sets)
    cells = []
    for rc in (r for r in rendered if not only or r.cell.id in only):
        graph = compile_spec(rc.spec)
        try:
            found = results_from_store(
                graph, Path(store_root), template_path, _complete(store_root)
            )
            steps = dynamics_from_store(graph, Path(store_root), _complete(store_root))
        except UserError as e:
            raise UserError(
                f"grid {tpl.name!r}, cell {rc.cell.id}: {e.message}",
                where=str(tpl.path),
                hint=f"run `resalign grid {template_path} --run` first (it computes only what "
                "is missing), or pass --store with the folder the grid ran in",
            ) from None
        report_node = graph.of_kind("report")[0] if graph.of_kind("report") else None
        params = report_node.params if report_node is not None else {}
        controls = {
            c: frozenset(n.key for n in graph.of_kind("evaluate") if n.row == c)
            for c in CONTROL_ROWS
        }
        unlearned = list(dict.fromkeys(n.row for n in graph.of_kind("unlearn")))
        studies = _searches(rc.spec, graph, Path(store_root))
        cells.append((rc.cell.id, found, params, controls, unlearned, studies, steps))
    # a control row shown once: every cell has it with the same evaluate nodes
    shared = {c for c in CONTROL_ROWS if len({x[3][c] for x in cells}) == 1 and cells[0][3][c]}
    results: list[EvalResult] = []
    rows: list[str] = [c for c in CONTROL_ROWS if c in shared]
    threats: dict[str, Any] = {}
    groups: dict[str, list[tuple[str, str]]] = {}
    searches: list[dict[str, Any]] = []
    res_specs = {json.dumps(x[2].get("resurgence"), sort_keys=True) for x in cells}
    if len(res_specs) > 1:
        raise UserError(
            f"grid {tpl.name!r}: its cells set different report.resurgence blocks, and the "
            "grid's one table has one resurgence threshold",
            where=str(tpl.path),
            hint="write report.resurgence in the template's body once, outside the matrix",
        )
    if len({x[2].get("reference") for x in cells}) > 1:
        raise UserError(
            f"grid {tpl.name!r}: its cells set different report.reference rows, and the "
            "grid's one table pairs every method with one reference",
            where=str(tpl.path),
            hint="write report.reference in the template's body once, outside the matrix",
        )
    dynamics: list[ModelDynamics] = []
    for i, (cid, found, params, _, unlearned, studies, steps) in enumerate(cells):
        own = list(params.get("rows") or dict.fromkeys(x.row for x in found))
        methods = [r for r in own if r not in CONTROL_ROWS]
        names = {r: cid if len(methods) == 1 else f"{cid}/{r}" for r in methods}
        for c in CONTROL_ROWS:
            if c not in shared:
                names[c] = f"{cid}/{c}"
        for r in own:
            if r in names:
                rows.append(names[r])
        for r in unlearned:
            groups.setdefault(r, []).append((names[r], cid))
        for res in found:
            if res.row in names:
                results.append(dataclasses.replace(res, row=names[res.row]))
            elif res.row in shared and i == 0:
                results.append(res)
        dynamics += [dataclasses.replace(m, row=names[m.row]) for m in steps if m.row in names]
        for t, meta in (params.get("threats") or {}).items():
            threats.setdefault(t, meta)
        for st in studies:
            if st["row"] in names:
                searches.append({**st, "row": names[st["row"]]})
            elif st["row"] in shared and all(x["key"] != st["key"] for x in searches):
                searches.append(st)
    return GridResults(
        tpl.name, Path(tpl.path), results, rows, threats, groups, len(cells), searches,
        cells[0][2].get("resurgence") if cells else None,
        cells[0][2].get("reference") if cells else None,
        dynamics,
    )  # fmt: skip


def report_for_grid(
    template_path: str,
    store_root: Path,
    out: Path | None = None,
    all_steps: bool = False,
    frontier: bool = False,
    threat: str | None = None,
    sets: Sequence[str] = (),
    only: Sequence[str] = (),
) -> Path:
    """``resalign report TEMPLATE.yaml.j2``: one table with a row per cell (see
    :func:`grid_results`; ``only``: these cells alone); a cell without a threat shows "–" in
    its columns. With
    ``frontier``: also ``frontier.png``/``.json``/``.md`` (:mod:`resalign.evaluation.frontier`)
    for ``threat`` (default: the last threat). Default folder: ``<store>/reports/<grid>/``."""
    g = grid_results(template_path, store_root, sets, only)
    out = Path(out) if out else Path(store_root) / "reports" / g.name
    table = write_report(
        g.results,
        out,
        transfer_matched=_matched_transfer(g),
        rows=g.rows,
        threats=g.threats or None,
        resurgence=g.resurgence,
        reference=g.reference,
        title=f"resalign report: grid {g.name} ({g.cells} cells)",
        all_steps=all_steps,
        searches=g.searches,
        dynamics=g.dynamics,
    )
    if frontier:
        write_grid_frontier(g, table, out, threat)
    return out


def _matched_transfer(g: GridResults) -> dict[str, Any] | None:
    """The transfer view's utility-matched entries for a grid that varies both what its
    methods simulate (their unlearn row labels) and the unlearning strength: every threat,
    the first safety metric against retain accuracy (else the first utility metric). None for
    one method under one threat (the frontier says that)."""
    from .evaluation.frontier import matched_transfer
    from .evaluation.report.table import metric_info, metric_roles

    safety, utility = metric_roles(metric_info(g.results))
    if not g.threats or not safety or not utility:
        return None
    x = _x_metrics(utility)[0]
    view = matched_transfer(g.results, g.groups, list(g.threats), safety[0], x, g.reference)
    # one method under one threat: that is the frontier's own sentence, not a transfer table
    if view is None or (len(view["rows"]) < 2 and len(view["threats"]) < 2):
        return None
    return view


def write_grid_frontier(
    g: GridResults, table: dict[str, Any], out: Path, threat: str | None
) -> list[str]:
    """The frontier of a grid's methods (see :func:`report_for_grid`); returns the sentences."""
    from .evaluation.frontier import build_frontier, write_frontier

    threats = list(table["threats"])
    if not threats:
        raise UserError(
            f"grid {g.name!r} has no threat: the frontier plots relearning under an attack",
            where=str(g.path),
            hint="add a threat to the template",
        )
    if threat is None:
        threat = threats[-1]
    elif threat not in threats:
        raise UserError(
            f"--threat {threat!r}: grid {g.name!r} has no such threat",
            where=str(g.path),
            hint=f"one of: {', '.join(threats)}",
        )
    from .evaluation.report.table import metric_roles

    safety, utility = metric_roles(table["metrics"])
    if not safety or not utility:
        raise UserError(
            f"grid {g.name!r}: the frontier needs a safety and a utility metric "
            f"(found safety {safety or 'none'}, utility {utility or 'none'})",
            where=str(g.path),
            hint="evaluate with concept_rate (it gives retain_accuracy and classifier_fid too)",
        )
    front = build_frontier(
        g.results, g.groups, threat, safety[0], _x_metrics(utility), reference=g.reference
    )
    return write_frontier(front, out)


def _x_metrics(utility: Sequence[str]) -> list[str]:
    """The utility axes a grid's methods are matched on: retain accuracy (else the first
    utility metric), then classifier FID when it was measured."""
    xms = ["retain_accuracy"] if "retain_accuracy" in utility else [utility[0]]
    if "classifier_fid" in utility and "classifier_fid" not in xms:
        xms.append("classifier_fid")
    return xms


__all__ = ["grid_results", "is_template", "report_for_grid", "report_for_spec"]
