"""The shipped hypergradient ablation (templates/hypergrad_ablation_digits.yaml.j2): five cells
on the demo's setting that differ in the hypergradient only."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from resalign.cli import cli
from resalign.engine.grid import prepare

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "templates" / "hypergrad_ablation_digits.yaml.j2"


def test_lists_the_five_rows():
    r = CliRunner().invoke(cli, ["grid", str(TEMPLATE), "--list"])
    assert r.exit_code == 0, r.output
    ids = [line.split()[0] for line in r.output.splitlines()[1:-1]]
    assert ids == [
        "hypergradient=none",
        "hypergradient=moreau-0.01",
        "hypergradient=moreau-1",
        "hypergradient=moreau-auto",
        "hypergradient=unrolled",
    ]


def test_cells_are_the_demo_with_only_the_hypergradient_changed():
    from resalign.graph.compile import compile_spec
    from resalign.spec import load_spec

    demo = load_spec(ROOT / "specs" / "digits_demo.yaml")
    demo_row = demo.rows["resalign"]
    _, prepared = prepare(TEMPLATE, check_files=True)
    want = {
        "none": ("none", None),
        "moreau-0.01": ("moreau", 0.01),
        "moreau-1": ("moreau", 1.0),
        "moreau-auto": ("moreau", "auto"),
        "unrolled": ("unrolled", None),
    }
    plain_keys, seeds = set(), set()
    for rc, g in prepared:
        row = rc.spec.rows[rc.cell.slug]
        kind, gamma = want[rc.cell.axes["hypergradient"]]
        h = row.resilience.hypergradient
        assert row.method == "resalign" and h.kind == kind
        if gamma is not None:
            assert h.gamma == gamma and h.iterations == 5 and h.max_norm is None
        # everything else is the demo's ResAlign row
        skip = {"label", "seeds", "seed", "resilience"}
        assert row.model_dump(exclude=skip) == demo_row.model_dump(exclude=skip)
        assert row.resilience.meta == demo_row.resilience.meta
        assert row.resilience.beta == demo_row.resilience.beta
        assert rc.spec.spec.threats == demo.spec.threats
        assert rc.spec.spec.evaluate == demo.spec.evaluate
        seeds.add(tuple(row.seeds or [row.seed]))
        assert row.seeds == demo_row.seeds
        # the plain baseline is one node shared by every cell (and by the demo)
        plain_keys |= {n.key for n in g.of_kind("unlearn") if n.row == "plain"}
    assert len(seeds) == 1
    demo_plain = {n.key for n in compile_spec(demo).of_kind("unlearn") if n.row == "plain"}
    assert plain_keys == demo_plain and len(plain_keys) == len(demo_row.seeds or [0])
