"""The shipped grid templates: each lists, renders, validates and compiles; cells share the
nodes they have in common (same keys), which is what lets the cache run them once."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from resalign.cli import cli
from resalign.engine.grid import prepare

TEMPLATES = sorted((Path(__file__).resolve().parents[1] / "templates").glob("*.yaml.j2"))


def test_ablation_lists_the_four_paper_rows():
    root = Path(__file__).resolve().parents[1]
    r = CliRunner().invoke(cli, ["grid", str(root / "templates/ablation.yaml.j2"), "--list"])
    assert r.exit_code == 0, r.output
    ids = [line.split()[0] for line in r.output.splitlines()[1:-1]]
    assert ids == [
        "hypergradient=none,meta=none",
        "hypergradient=moreau,meta=none",
        "hypergradient=moreau,meta=data",
        "hypergradient=moreau,meta=data_and_configs",
    ]


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_shipped_template_cells_validate_compile_and_share_nodes(path):
    tpl, prepared = prepare(path)
    assert len(prepared) == len(tpl.cells) >= 2
    keys = [{n.key for n in g} for _, g in prepared]
    shared = set.intersection(*keys)
    # the model node (and, with an original row, its attacks/evaluations) is common to all
    assert any(g["model"].key in shared for _, g in prepared)
    # and each cell has nodes of its own
    assert all(k - shared for k in keys)
