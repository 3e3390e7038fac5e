"""The ``resalign`` command line: a thin click shell over the package.

Every command imports what it needs inside its function, so ``validate``, ``plan``, ``schema``
and ``--help`` load no torch, diffusers, peft or mlflow. A :class:`resalign.errors.UserError`
raised anywhere is printed without a traceback and exits with its code (2).
Each command lives in its own delimited block so that its owner can replace it alone.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from . import __version__
from .engine.options import DEFAULT_STORE, RunOptions
from .engine.run import run_spec
from .errors import UserError


class _Group(click.Group):
    """Renders user errors instead of tracebacks (also under click's CliRunner)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as err:
            click.echo(err.render(), err=True)
            ctx.exit(err.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="resalign")
def cli() -> None:
    """resalign: declarative experiments for resilient safety unlearning of text-to-image
    diffusion models (ResAlign).

    Write a YAML spec (see `resalign schema` and specs/), check it with `resalign validate`,
    see what would run with `resalign plan`, then `resalign run` it.
    """


def _sets() -> tuple[str, ...]:
    """The ``--set`` items of the running command (see :data:`_SET`)."""
    ctx = click.get_current_context(silent=True)
    return tuple(ctx.meta.get("resalign.sets", ())) if ctx is not None else ()


def _load(path: str, check_files: bool) -> Any:
    from .spec import load_spec

    return load_spec(path, check_files=check_files, sets=_sets())


def _keep_sets(ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]) -> None:
    ctx.meta["resalign.sets"] = value


# Not a function parameter (expose_value=False): commands read it through _sets()/_load().
_SET = click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="PATH=VALUE",
    expose_value=False,
    callback=_keep_sets,
    help="Override one value of the spec (repeat): PATH is dotted (unlearn.steps, "
    "threats.NAME.seeds, vars.digit), VALUE is YAML typed by the schema. Applied after "
    "extends:, before vars:; listed in the run's MLflow params as set.PATH.",
)


_STRICT = click.option(
    "--strict",
    is_flag=True,
    help="Make the warnings about step or trial counts above their sanity bound "
    "(resalign/graph/sanity.py) an error (exit 2).",
)


def _warn(line: str) -> None:
    click.echo(line, err=True)


_CHECK_FILES = click.option(
    "--check-files",
    is_flag=True,
    help="Also require every referenced data file, local model and metric weight file to "
    "exist (run always does).",
)


# ----------------------------------------------------------------------------- validate
@cli.command()
@click.argument("specs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@_CHECK_FILES
@_STRICT
@_SET
def validate(specs: tuple[str, ...], check_files: bool, strict: bool) -> None:
    """Check SPEC files: schema, references, meta-learning, and compile each to its graph.

    Prints `ok <file>: N nodes` per valid spec and every problem of the others (file:line:col,
    the text, the allowed values, a suggestion); exits 2 if any spec is invalid.
    """
    from .graph.compile import compile_spec
    from .graph.sanity import check_sanity

    failed = 0
    for path in specs:
        try:
            resolved = _load(path, check_files)
            graph = compile_spec(resolved)
            check_sanity(resolved, graph, strict=strict, warn=_warn)
        except UserError as err:
            failed += 1
            click.echo(err.render(), err=True)
            continue
        click.echo(f"ok {path}: {len(graph)} nodes")
    if failed:
        sys.exit(2)


# ----------------------------------------------------------------------------- plan
@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--mermaid", is_flag=True, help="Print a Mermaid flowchart instead of the tree.")
@click.option(
    "--store", default=DEFAULT_STORE, show_default=True, help="Store whose results count as cached."
)
@click.option(
    "--force", "force", multiple=True, help="Show NODE as forced ('all', a kind, name or glob)."
)
@click.option(
    "--estimate",
    is_flag=True,
    help="Predict the time of the nodes to run from the store's recorded nodes of each kind.",
)
@_CHECK_FILES
@_STRICT
@_SET
def plan(spec: str, mermaid: bool, store: str, force: tuple[str, ...], check_files: bool,
         estimate: bool, strict: bool) -> None:  # fmt: skip
    """Show the execution graph of SPEC: every node with its kind, name and content key, and
    whether it is cached or will run and why (new, parameter changed, upstream changed,
    forced). --estimate adds what the nodes to run will take, per kind and in total, scaled
    from the cost the store's finished nodes recorded (resalign.engine.estimate)."""
    from .engine.plan import changed_params
    from .engine.runner import plan_status
    from .graph.compile import compile_spec
    from .graph.plan import render_mermaid, render_plan
    from .graph.sanity import check_sanity

    resolved = _load(spec, check_files)
    graph = compile_spec(resolved)
    check_sanity(resolved, graph, strict=strict, warn=_warn)
    states = plan_status(graph, store, force)
    status = {name: st.describe() for name, st in states.items()}
    status.update(changed_params(graph, store, status))
    click.echo(render_mermaid(graph, status) if mermaid else render_plan(graph, status))
    if not mermaid:
        from .graph.compile import search_plans

        for sp in search_plans(resolved):  # issue 16: trials are asked at run time
            s = resolved.spec.threats[sp.threat].search
            pruned = f", pruned ({s.pruner.kind}) at {s.report_at}" if s.pruner is not None else ""
            click.echo(
                f"search {sp.name}  {sp.key[:12]}  {s.trials} trials ({s.sampler}, seed "
                f"{s.seed}{pruned}), each an attack per seed + its evaluation after the graph "
                "above"
            )
    if estimate:
        from .engine.estimate import plan_estimate_text

        to_run = [n for n, st in states.items() if st.state == "run"]
        click.echo(plan_estimate_text(resolved, graph, to_run, store))


# ----------------------------------------------------------------------------- schema
@cli.command()
@click.option(
    "--output", "-o", type=click.Path(dir_okay=False), help="Write to FILE instead of stdout."
)
def schema(output: str | None) -> None:
    """Print the JSON Schema of the spec. Point your editor at it with a first line
    `# yaml-language-server: $schema=<file>` for completion and checks."""
    import json
    from pathlib import Path

    from .atomic import atomic_write_text
    from .spec.json_schema import spec_json_schema

    text = json.dumps(spec_json_schema(), indent=2) + "\n"
    if output is None:
        click.echo(text, nl=False)
        return
    target = Path(output)
    try:
        atomic_write_text(target, text)
    except OSError as exc:
        raise UserError(f"cannot write '{output}': {exc.strerror}") from None
    click.echo(f"wrote {output}")


# ----------------------------------------------------------------------------- run
@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option(
    "--force",
    "force",
    multiple=True,
    help="Re-run NODE even if cached: 'all', a node kind, a node name or a glob (repeat).",
)
@click.option("--store", default=DEFAULT_STORE, show_default=True, help="Store folder.")
@click.option(
    "--tracking-uri",
    default=None,
    help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, the spec's tracking.uri, "
    "else SQLite at STORE/mlflow.db).",
)
@click.option("--no-tracking", is_flag=True, help="Do not log to MLflow.")
@click.option("--device", default=None, help="Override the spec's device (cpu, cuda, mps).")
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=1),
    default=None,
    help="Override every step's checkpoint interval (in its own steps).",
)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Local worker processes (1 = sequential in this process).")  # fmt: skip
@click.option("--nproc-per-node", type=click.IntRange(min=1), default=None,
              help="Run each unlearn node on N torchrun processes (one per GPU on CUDA), its "
              "J configs per outer step split over them (default: the spec's "
              "execution.nproc_per_node, 1). Not part of any cache key.")  # fmt: skip
@click.option("--verbose", "-v", is_flag=True, help="Print one line per logged step.")
@_SET
@click.option("--rehearse", is_flag=True,
              help="Rehearse SPEC: every node at toy size (random-weight model of the same "
              "family and layout, stand-in data for what is missing, capped steps) in "
              "STORE/rehearsal/, marked as a rehearsal. Finds what would fail before a GPU "
              "hour is spent.")  # fmt: skip
@click.option("--rehearse-profile", type=click.Choice(["toy", "full"]), default="toy",
              show_default=True, help="With --rehearse: toy (CPU) or full (published model "
              "widths, 64x64 latents: for an accelerator).")  # fmt: skip
@_STRICT
def run(spec: str, force: tuple[str, ...], store: str, tracking_uri: str | None,
        no_tracking: bool, device: str | None, checkpoint_every: int | None, workers: int,
        nproc_per_node: int | None, verbose: bool, rehearse: bool,
        rehearse_profile: str, strict: bool) -> None:  # fmt: skip
    """Run SPEC's graph: cached nodes are reused, interrupted nodes resume from their last
    checkpoint, everything is logged to MLflow. If a node fails, the last line printed is
    the command that resumes."""
    options = RunOptions(
        store=store, force=force, tracking=not no_tracking, tracking_uri=tracking_uri,
        device=device, checkpoint_every=checkpoint_every, workers=workers,
        nproc_per_node=nproc_per_node, verbose=verbose, sets=_sets(),
        rehearse=rehearse_profile if rehearse else None, strict=strict,
    )  # fmt: skip
    result = run_spec(spec, options)
    if not result.ok:  # the driver has printed the failures and, last, the resume command
        sys.exit(result.exit_code)


# ----------------------------------------------------------------------------- report
@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Report folder (default: <store>/reports/<spec name>).",
)
@click.option(
    "--store",
    type=click.Path(file_okay=False),
    default=DEFAULT_STORE,
    show_default=True,
    help="The store the runs were written to.",
)
@click.option(
    "--all-steps",
    is_flag=True,
    help="A column for every evaluation step of each threat (default: its last step).",
)
@click.option(
    "--frontier",
    is_flag=True,
    help="Grid templates: also frontier.png/.json, relearning against retain accuracy (and "
    "classifier FID) per method, and the utility-matched difference.",
)
@click.option(
    "--threat",
    default=None,
    help="With --frontier: the threat whose relearning is plotted (default: the last).",
)
@click.option("--cell", "cells", multiple=True,
              help="Grid templates: only this cell id (repeat), as `grid --run --cell`.")  # fmt: skip
@_SET
@click.option("--rehearse", is_flag=True,
              help="Report SPEC's rehearsal (run --rehearse) from STORE/rehearsal/.")  # fmt: skip
@click.option("--rehearse-profile", type=click.Choice(["toy", "full"]), default="toy",
              show_default=True, help="With --rehearse: which rehearsal.")  # fmt: skip
def report(spec: str, out: str | None, store: str, all_steps: bool, frontier: bool,
           threat: str | None, cells: tuple[str, ...], rehearse: bool,
           rehearse_profile: str) -> None:  # fmt: skip
    """Make the results table, curves and grids of a finished spec.

    Given a grid template (TEMPLATE.yaml.j2) instead: one table with a row per cell; with
    --frontier, the utility-matched frontier of its methods."""
    from pathlib import Path

    from .reporting import is_template, report_for_grid, report_for_spec

    if rehearse:
        from .rehearse import rehearsal_spec_path, rehearsal_store

        spec = str(rehearsal_spec_path(spec, store, rehearse_profile))
        store = str(rehearsal_store(store))

    target = Path(out) if out else None
    if target is None:
        from .engine.store import writable

        if Path(store).is_dir() and not writable(Path(store)):
            raise UserError(
                f"cannot write {Path(store) / 'reports'}: the store is read-only (the report "
                "goes into it by default)",
                where="--out",
                hint="pass --out DIR to write the report elsewhere; it reads the store only",
            )
    if is_template(spec):
        folder = report_for_grid(
            spec, Path(store), target, all_steps=all_steps, frontier=frontier, threat=threat,
            sets=_sets(), only=cells,
        )  # fmt: skip
    elif frontier or threat or cells:
        raise UserError(
            f"{spec}: --frontier, --threat and --cell need a grid template (TEMPLATE.yaml.j2)",
            hint="the frontier compares methods across the cells of a grid over unlearning "
            "strength, e.g. templates/frontier_digits.yaml.j2",
        )
    else:
        folder = report_for_spec(spec, Path(store), target, all_steps=all_steps, sets=_sets())
    click.echo((folder / "report.md").read_text(encoding="utf-8").split("\n## ")[0])
    if frontier:
        click.echo((folder / "frontier.md").read_text(encoding="utf-8").split("\n", 4)[-1])
    click.echo(f"report written to {folder}")


# ----------------------------------------------------------------------------- ui
@cli.command()
@click.option("--store", default=DEFAULT_STORE, show_default=True, help="Store folder.")
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
def ui(store: str, port: int) -> None:
    """Start the MLflow UI on 127.0.0.1 for the project's store (STORE/mlflow.db); prints the
    URL; Ctrl-C stops it and its worker processes."""
    from .engine.ui import serve_ui

    serve_ui(store, port=port)


# ----------------------------------------------------------------------------- sync
@cli.command()
@click.option("--store", default=DEFAULT_STORE, show_default=True, help="Store folder.")
@click.option("--tracking-uri", default=None, help="Only the runs that were logged to this URI.")
def sync(store: str, tracking_uri: str | None) -> None:
    """Upload to the tracking server what it missed while it was unreachable (idempotent:
    running it twice uploads nothing twice). Exits 1 if a server is still unreachable."""
    from .engine.tracking import sync as do_sync

    report = do_sync(store, uri=tracking_uri)
    click.echo(report.summary())
    if report.unreachable:
        sys.exit(1)


# ----------------------------------------------------------------------------- verify
@cli.command()
@click.option("--store", default=DEFAULT_STORE, show_default=True, help="Store folder.")
@click.option("--fix", is_flag=True, help="Remove the damaged nodes and the orphans found.")
def verify(store: str, fix: bool) -> None:
    """Check every node of the store against its DONE manifest (size and sha256 of each
    file) and against what its upstream nodes held when it read them, and list orphans
    (staging leftovers, locks and state no live process owns).

    A damaged node is never used: `run` recomputes it. --fix also removes every node
    derived from a damaged one (it may have read the damage). Exits 1 when problems remain (without
    --fix), 0 otherwise."""
    from pathlib import Path

    from .engine.verify import verify_store

    if not Path(store).is_dir():
        raise UserError(
            f"no store at {store}", where="--store", hint="pass the folder runs were written to"
        )
    rep = verify_store(store, fix=fix, echo=click.echo)
    derived = f", {len(rep.derived)} derived from them" if rep.derived else ""
    click.echo(
        f"{rep.checked} node(s) checked: {len(rep.damaged)} damaged{derived}, "
        f"{len(rep.orphans)} orphan(s)"
        + (
            f"; removed {len(rep.removed)}: {len(rep.damaged)} damaged node(s), "
            f"{len(rep.derived)} derived from them, {len(rep.orphans)} orphan(s)"
            if fix and rep.removed
            else "; removed nothing"
            if fix
            else ""
        )
    )
    if not rep.clean and not fix:
        click.echo(
            "run `resalign verify --fix` to remove them (damaged nodes and the nodes derived "
            "from them run again)"
        )
        sys.exit(1)


# ----------------------------------------------------------------------------- grid
@cli.command()
@click.argument("template", type=click.Path(dir_okay=False))
@click.option("--list", "list_", is_flag=True, help="List the cells (default action).")
@click.option(
    "--render",
    "render_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Render and validate every cell to DIR/<cell id>.yaml.",
)
@click.option("--run", "run_", is_flag=True, help="Validate every cell, then run them.")
@click.option(
    "--estimate",
    is_flag=True,
    help="With --list: each cell's predicted time and the grid's, from the store's records.",
)
@click.option("--cell", "cells", multiple=True, help="With --run: only this cell id (repeat).")
@click.option(
    "--executor",
    type=click.Choice(["local", "slurm"]),
    default="local",
    show_default=True,
    help="Where node tasks run.",
)
@click.option(
    "--workers",
    type=int,
    default=1,
    show_default=True,
    help="local: worker processes (1 = sequential in this process).",
)
@click.option("--store", default=DEFAULT_STORE, show_default=True, help="Store folder.")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI.")
@click.option("--no-tracking", is_flag=True, help="Do not log to MLflow.")
@click.option("--device", default=None, help="Override the spec's device.")
@click.option("--partition", default=None, help="slurm: partition.")
@click.option("--gpus", type=int, default=1, show_default=True, help="slurm: GPUs per job.")
@click.option(
    "--time",
    "time_min",
    type=int,
    default=240,
    show_default=True,
    help="slurm: time limit per job, minutes.",
)
@click.option(
    "--array-parallelism",
    type=int,
    default=8,
    show_default=True,
    help="slurm: jobs running at once.",
)
@click.option("--slurm-folder", default=None, help="slurm: submitit folder (default STORE/slurm).")
@click.option(
    "--slurm-cluster",
    type=click.Choice(["slurm", "local", "debug"]),
    default="slurm",
    help="slurm: submitit backend (local/debug run the job path on this machine).",
)
@_SET
def grid(template: str, list_: bool, render_dir: str | None, run_: bool, estimate: bool,
         cells: tuple[str, ...],
         executor: str, workers: int, store: str, tracking_uri: str | None, no_tracking: bool,
         device: str | None, partition: str | None, gpus: int, time_min: int,
         array_parallelism: int, slurm_folder: str | None, slurm_cluster: str) -> None:  # fmt: skip
    """List, render or run the grid of specs a Jinja2 TEMPLATE declares.

    The template's front matter declares axes (matrix/include/exclude); each cell gets an id
    like `hypergradient=moreau,meta=data`. Every cell is rendered and validated before
    anything runs. --run runs the cells under one MLflow grid run with a child run per cell.
    """
    from pathlib import Path

    from .spec.templates import load_template, render_grid, write_rendered

    if sum([list_, render_dir is not None, run_]) > 1:
        raise UserError("choose one of --list, --render DIR, --run")
    if render_dir is not None:
        rendered = render_grid(template, sets=_sets())
        for p in write_rendered(rendered, render_dir, base_dir=Path(template).parent):
            click.echo(f"wrote {p}")
        return
    if estimate and (run_ or render_dir is not None):
        raise UserError("--estimate goes with --list (the default action)", where="--estimate")
    if not run_:
        from .engine.grid import estimate_table, list_table

        click.echo(list_table(load_template(template)))
        if estimate:
            click.echo(estimate_table(template, store, sets=_sets()))
        return
    from .engine.executors import make_executor
    from .engine.grid import run_grid

    def build() -> Any:
        if executor == "slurm":
            return make_executor(
                "slurm", folder=slurm_folder or f"{store}/slurm", partition=partition, gpus=gpus,
                time=time_min, array_parallelism=array_parallelism, cluster=slurm_cluster,
            )  # fmt: skip
        return make_executor("local", workers=workers)

    options = RunOptions(
        store=store, tracking=not no_tracking, tracking_uri=tracking_uri, device=device,
        # the resume line as a user types it (sys.argv[0] is a path: .venv/bin/resalign)
        workers=workers, executor=build, command=["resalign", *sys.argv[1:]], sets=_sets(),
    )  # fmt: skip
    summary = run_grid(template, options, cells=cells or None)
    click.echo(
        f"grid {summary.name}: {len(summary.cells)} cells in {summary.seconds:.1f}s; "
        f"executed {summary.executed} nodes, {summary.cache_hits} cache hits"
        + (f"; MLflow grid run {summary.parent_run_id}" if summary.parent_run_id else "")
    )


# ----------------------------------------------------------------------------- bench
@cli.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Benchmarks: `bench hypergrad` (Moreau vs unrolled memory/time, HVP cost), `bench
    hypercheck` (the applied hypergradient against the true total derivative) and
    `bench sd --arch sd14|sdxl` (one outer step of the published configuration per memory
    lever, SD architecture with random weights). `bench NAME --help` lists their options."""
    if args[:1] in (("-h",), ("--help",)):
        # help_option_names is empty so that `bench NAME --help` reaches the benchmark.
        click.echo(click.get_current_context().get_help())
        return
    from .bench import main as bench_main

    raise SystemExit(bench_main(list(args)))


# ----------------------------------------------------------------------------- entry
def main() -> None:
    """Console entry point."""
    # Library chatter that says nothing to a user of this tool (MLflow's database migration
    # INFO lines, transformers' notes about image processors we never use). Set either
    # variable yourself to see everything again.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    cli(prog_name="resalign")


if __name__ == "__main__":
    main()
