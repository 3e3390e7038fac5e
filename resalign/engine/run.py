"""One run entry point: :func:`run_spec` runs a spec with :class:`.options.RunOptions`.

``resalign run``, every cell of ``resalign grid --run`` and the tests go through it. It loads
the spec when given a path (its ``--set`` items, or its rehearsal: ``options.rehearse``),
plans the graph and its attacker searches from one compilation, checks the sanity bounds,
runs the graph (:func:`.runner.run_graph`), then the searches' trials
(:func:`.search.run_searches`, nested in MLflow under the graph's run, with the same options),
and returns a :class:`RunResult`: what ran, the studies, the exit code and the command that
resumes the invocation (built here, from the options, unless the caller gave its own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .options import RunOptions

if TYPE_CHECKING:
    from ..graph.nodes import Graph
    from .runner import RunSummary
    from .search import StudyRecord


@dataclass
class RunResult:
    """What :func:`run_spec` did.

    ``spec``/``graph``: the resolved spec and its graph (a rehearsal's, for a rehearsal);
    ``store``: where it ran; ``summary``: the graph's run (None when it failed);
    ``studies``: the searches' studies (empty without searches, or when the run failed
    before them); ``exit_code``: 0, or the failure's (1 a crash, 2 the user's to fix, 130 /
    128 + signal interrupted); ``failed``: the nodes that failed; ``resume_command``: the
    line that resumes a failed run (the driver has printed it last), None after success."""

    spec: Any
    graph: Graph
    store: Path
    resume_command: str | None = None
    summary: RunSummary | None = None
    studies: list[StudyRecord] = field(default_factory=list)
    exit_code: int = 0
    failed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def run_spec(spec: str | Path | Any, options: RunOptions | None = None) -> RunResult:
    """Run ``spec`` (a spec file, or a :class:`resalign.spec.ResolvedSpec`) with
    ``options``: its graph, then its searches. A failed node or trial is reported in the
    result (the driver has printed why and, last, the resume command); a bad spec or store
    raises :class:`resalign.errors.UserError` before anything runs."""
    from ..graph.compile import compile_with_searches
    from ..graph.sanity import check_sanity
    from .runner import RunFailed, run_graph
    from .search import run_searches

    o = options or RunOptions()
    o = o.replace(ui=o.progress())  # one display for the graph and every search round
    if isinstance(spec, str | Path):
        if o.command is None:
            o = o.replace(command=o.run_argv(spec))
        resolved, o = _load(spec, o)
    else:
        resolved = spec
    graph, plans = compile_with_searches(resolved)
    check_sanity(resolved, graph, strict=o.strict, warn=o.ui.line)
    result = RunResult(resolved, graph, Path(o.store))
    try:
        result.summary = run_graph(graph, resolved, o)
        # threats with `search`: their trials, after the graph they attack (issue 16)
        searches = o.replace(parent_run_id=result.summary.parent_run_id)
        result.studies = run_searches(resolved, graph, searches, plans)
    except RunFailed as failed:
        result.exit_code = failed.exit_code
        result.failed = list(failed.failed)
        result.resume_command = failed.resume_command
    return result


def _load(path: str | Path, o: RunOptions) -> tuple[Any, RunOptions]:
    """The resolved spec at ``path`` (files checked), and the options to run it with: for a
    rehearsal (``o.rehearse``), its rewritten spec, its store and its tag."""
    from ..spec import load_spec

    if o.rehearse is None:
        return load_spec(path, check_files=True, sets=o.sets), o
    from ..rehearse import TAG, prepare_rehearsal, rehearsal_store

    rehearsal = prepare_rehearsal(path, o.store, o.rehearse, sets=o.sets)
    o = o.replace(store=rehearsal_store(o.store), tags={**o.tags, TAG: o.rehearse})
    assert o.ui is not None
    o.ui.line(f"rehearsal spec {rehearsal}, store {o.store}")
    # the rehearsal spec is written with the --set items already applied
    return load_spec(rehearsal, check_files=True), o
