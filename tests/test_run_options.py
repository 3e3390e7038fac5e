"""RunOptions (issue 22): the resume command of `resalign run` is spelt in one place
(``RunOptions.run_argv``); parsed back by the CLI it gives the same options, without
``--force``, so a flag added to one side and not the other fails here."""

from __future__ import annotations

import dataclasses

from resalign.cli import run
from resalign.engine.options import RunOptions


def _parsed(argv: list[str]) -> RunOptions:
    """The options `resalign run` builds from ``argv`` (its own parser, nothing run)."""
    assert argv[:2] == ["resalign", "run"]
    ctx = run.make_context("run", argv[2:])
    p = ctx.params
    return RunOptions(
        store=p["store"], force=p["force"], tracking=not p["no_tracking"],
        tracking_uri=p["tracking_uri"], device=p["device"],
        checkpoint_every=p["checkpoint_every"], workers=p["workers"],
        nproc_per_node=p["nproc_per_node"], verbose=p["verbose"],
        sets=ctx.meta.get("resalign.sets", ()),
        rehearse=p["rehearse_profile"] if p["rehearse"] else None, strict=p["strict"],
    )  # fmt: skip


def test_the_resume_command_parses_back_to_the_same_options_without_force() -> None:
    every = RunOptions(
        store="/tmp/a store", force=("all", "unlearn/*"), tracking=False,
        tracking_uri="sqlite:////tmp/m.db", device="cpu", checkpoint_every=3, workers=2,
        nproc_per_node=2, verbose=True, sets=("vars.digit=3", "unlearn.steps=5"),
        rehearse="full", strict=True,
    )  # fmt: skip
    argv = every.run_argv("specs/my spec.yaml")
    assert argv[2] == "specs/my spec.yaml"
    assert _parsed(argv) == dataclasses.replace(every, force=())
    # the defaults: the bare command, and it parses to the defaults
    assert RunOptions().run_argv("s.yaml") == ["resalign", "run", "s.yaml"]
    assert _parsed(RunOptions().run_argv("s.yaml")) == RunOptions()


def test_options_keep_their_own_copies() -> None:
    tags = {"grid.cell": "a"}
    o = RunOptions(tags=tags, force=["x"], command=["resalign", "run", "s.yaml"])
    tags["grid.cell"] = "b"
    assert o.tags == {"grid.cell": "a"} and o.force == ("x",)
    assert o.command == ("resalign", "run", "s.yaml")
    assert o.replace(device="cpu").tags == {"grid.cell": "a"}
