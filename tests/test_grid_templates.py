"""Grid templates: front matter → cells, sandboxed strict rendering, errors with cell and line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from resalign.errors import UserError
from resalign.spec.templates import GridError, load_template, render_grid, write_rendered


def _tpl(tmp_path: Path, text: str, name: str = "g.yaml.j2") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return p


ABLATION_LIKE = """
    # leading comment
    ---
    matrix:
      hypergradient: [none, moreau]
      meta: [none, data, data_and_configs]
    exclude:
      - {hypergradient: none, meta: data}
      - {hypergradient: none, meta: data_and_configs}
    vars:
      steps: 4
    ---
    name: g-{{ cell.slug }}
    method: {{ 'plain' if hypergradient == 'none' else 'resalign' }}
    steps: {{ steps }}
    """


def test_matrix_exclude_ids_in_axis_order(tmp_path):
    t = load_template(_tpl(tmp_path, ABLATION_LIKE))
    assert t.axes == ["hypergradient", "meta"]
    assert [c.id for c in t.cells] == [
        "hypergradient=none,meta=none",
        "hypergradient=moreau,meta=none",
        "hypergradient=moreau,meta=data",
        "hypergradient=moreau,meta=data_and_configs",
    ]
    assert t.cells[2].tags == {
        "grid.cell": "hypergradient=moreau,meta=data",
        "grid.axis.hypergradient": "moreau",
        "grid.axis.meta": "data",
    }
    # Reordering the front matter's axes reorders the ids: the id follows declared order.
    swapped = ABLATION_LIKE.replace(
        "  hypergradient: [none, moreau]\n      meta: [none, data, data_and_configs]",
        "  meta: [none, data, data_and_configs]\n      hypergradient: [none, moreau]",
    )
    t2 = load_template(_tpl(tmp_path, swapped, "s.yaml.j2"))
    assert t2.cells[0].id == "meta=none,hypergradient=none"


def test_render_substitutes_and_keeps_template_lines(tmp_path):
    p = _tpl(tmp_path, ABLATION_LIKE)
    cells = render_grid(p, validate=None)
    assert len(cells) == 4
    texts = {rc.cell.id: rc.text for rc in cells}
    plain = texts["hypergradient=none,meta=none"]
    assert "name: g-hypergradient-none__meta-none\nmethod: plain\nsteps: 4\n" in plain
    assert "method: resalign" in texts["hypergradient=moreau,meta=data"]
    rc = cells[0]
    # rendered line 3 is 'method: ...' which is line 14 of the template file
    assert rc.text.splitlines()[2].startswith("method:")
    method_line = 1 + next(
        i for i, x in enumerate(p.read_text().splitlines()) if x.startswith("method:")
    )
    assert rc.template_line(3) == method_line
    written = write_rendered(cells, tmp_path / "out")
    assert [w.name for w in written] == [f"{c.cell.id}.yaml" for c in cells]
    assert written[0].read_text() == plain


def test_include_extends_matching_cells_and_adds_new_ones(tmp_path):
    p = _tpl(
        tmp_path,
        """
        ---
        matrix:
          lr: [1e-5, 1e-4]
          steps: [50, 200]
        include:
          - {lr: 1e-4, rank: 8}
          - {lr: 1e-3, steps: 10, algorithm: lora}
        ---
        lr: {{ lr }}
        rank: {{ rank | default(4) }}
        """,
    )
    t = load_template(p)
    ids = [c.id for c in t.cells]
    assert ids == [
        "lr=1e-5,steps=50",
        "lr=1e-5,steps=200",
        "lr=1e-4,steps=50",
        "lr=1e-4,steps=200",
        "lr=1e-3,steps=10,algorithm=lora",
    ]
    assert isinstance(t.cells[0].axes["lr"], float)
    assert t.cells[2].extras == {"rank": 8} and t.cells[0].extras == {}
    out = {rc.cell.id: rc.text for rc in render_grid(t, validate=None)}
    assert "rank: 8" in out["lr=1e-4,steps=50"] and "rank: 4" in out["lr=1e-5,steps=50"]


def test_undefined_variable_names_variable_cell_and_line(tmp_path):
    p = _tpl(
        tmp_path,
        """
        ---
        matrix: {a: [x, y]}
        ---
        name: n-{{ cell.slug }}
        value: {{ a }}
        other: {{ b if a == 'y' else 1 }}
        """,
    )
    validated = []
    with pytest.raises(GridError) as ei:
        render_grid(p, validate=lambda text, src: validated.append(src))
    # The cell that rendered is still validated (all problems at once); the error names the
    # other one and nothing is returned for running.
    assert validated == [f"{p}[a=x]"]
    msg = ei.value.render()
    assert f"{p}:6:" in msg
    assert "cell a=y: 'b' is undefined" in msg
    assert "a=x" not in msg.split("\n")[0]
    assert "no cell was run" in msg


@pytest.mark.parametrize(
    "expr",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ cell.__class__ }}",
        "{{ (1).__class__.__base__.__subclasses__() }}",
        "{{ ''|attr('__class__') }}",
        "{{ cycler.__init__.__globals__ }}",
    ],
)
def test_sandbox_blocks_python_internals(tmp_path, expr):
    p = _tpl(tmp_path, f"---\nmatrix: {{a: [x]}}\n---\nname: n\nleak: {expr}\n")
    with pytest.raises(GridError) as ei:
        render_grid(p, validate=None)
    msg = ei.value.render()
    assert "sandbox forbids" in msg and f"{p}:5" in msg


def test_templates_cannot_read_files(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    p = _tpl(tmp_path, f"---\nmatrix: {{a: [x]}}\n---\nname: n\n{{% include '{secret}' %}}\n")
    with pytest.raises(GridError) as ei:
        render_grid(p, validate=None)
    assert "cannot include or import" in ei.value.render()
    assert "TOPSECRET" not in ei.value.render()


@pytest.mark.parametrize(
    "front, expect, line",
    [
        (
            "matrix: {a: [x, y]}\nexclude: [{b: x}]",
            "exclude names 'b', which is not a matrix axis",
            3,
        ),
        ("matrix: {a: [x, y]}\nexclude: [{a: z}]", "not a value of axis 'a'", 3),
        ("matrics: {a: [x]}", "did you mean 'matrix'", 2),
        ("matrix: {a: []}", "non-empty list", 2),
        ("matrix: {a: [x, x]}", "lists 'x' twice", 2),
        ("matrix: {a: ['x y']}", "cannot appear in a cell id", 2),
        ("matrix: {cell: [x]}", "reserved", 2),
        ("matrix: {a: [x]}\nmatrix: {b: [y]}", "duplicate key 'matrix'", 3),
        ("matrix: {a: [x]}\nexclude: [{a: x}]", "the grid has no cells", 2),
        ("matrix:\n  a: [x}", "not valid YAML", 3),
        ("include: [{b: 1}, {b: 1}]", "same id 'b=1'", 2),
    ],
)
def test_front_matter_errors(tmp_path, front, expect, line):
    p = _tpl(tmp_path, f"---\n{front}\n---\nname: n\n")
    with pytest.raises(UserError) as ei:
        load_template(p)
    assert expect in ei.value.render()
    assert ei.value.where.startswith(f"{p}:{line}")


def test_missing_front_matter_and_syntax_error(tmp_path):
    with pytest.raises(UserError, match="must begin with a front matter"):
        load_template(_tpl(tmp_path, "name: n\n"))
    p = _tpl(tmp_path, "---\nmatrix: {a: [x]}\n---\nname: n\nx: {{ a \n", "b.yaml.j2")
    with pytest.raises(UserError) as ei:
        render_grid(p, validate=None)
    assert ei.value.where.startswith(f"{p}:5") and "syntax error" in ei.value.render()


def test_invalid_spec_cell_is_reported_at_template_line_through_spec_loader(tmp_path):
    p = _tpl(
        tmp_path,
        """
        ---
        matrix:
          lr: [1e-5, 1e-4]
          beta: [0.8, -1]
        ---
        name: t-{{ cell.slug }}
        model: {family: tiny}
        datasets:
          harm: {type: digits, digits: [0]}
          keep: {type: digits, digits: [1, 2]}
        concepts:
          zero: {harmful: [harm], retain: [keep]}
        unlearn:
          optimizer: {lr: {{ lr }}}
          resilience:
            beta: {{ beta }}
        """,
    )
    with pytest.raises(GridError) as ei:
        render_grid(p)
    msg = ei.value.render()
    lines = msg.splitlines()
    assert lines[0] == (
        f"{p}:16:11: cell lr=1e-5,beta=-1: unlearn.resilience.beta: "
        "input should be greater than or equal to 0 (got -1)"
    )
    assert "cell lr=1e-4,beta=-1" in msg and "beta=0.8" not in msg
    assert lines[-1].endswith("(2 of 4 cells); no cell was run")
    # The valid cells alone validate into resolved specs with distinct names and float lr.
    fixed = tmp_path / "ok.yaml.j2"
    fixed.write_text(p.read_text().replace("[0.8, -1]", "[0.8]"))
    ok = render_grid(fixed)
    assert [rc.spec.name for rc in ok] == ["t-lr-1e-5__beta-0.8", "t-lr-1e-4__beta-0.8"]
    assert ok[0].spec.spec.unlearn.optimizer.lr == 1e-5


def test_a_cell_rendered_to_another_folder_still_extends_its_base(tmp_path):
    """``grid --render /elsewhere``: a relative ``extends:`` is relative to the template's
    folder, so the written cell names its base from the folder it is written to (it named a
    missing file before) and compiles to the same node keys as the cell rendered in place."""
    from click.testing import CliRunner

    from resalign.cli import cli
    from resalign.graph.compile import compile_spec
    from resalign.spec import load_spec

    root = Path(__file__).resolve().parents[1]
    tpl = root / "templates" / "esd_benign_digits.yaml.j2"
    out = tmp_path / "deep" / "cells"
    res = CliRunner().invoke(cli, ["grid", str(tpl), "--render", str(out)])
    assert res.exit_code == 0, res.output
    cell = out / "steps=10.yaml"
    text = cell.read_text()
    extends = next(ln for ln in text.splitlines() if ln.startswith("extends:"))
    assert extends != "extends: ../specs/digits_demo.yaml"
    assert (out / extends.split(":", 1)[1].strip()).resolve() == root / "specs/digits_demo.yaml"
    (cell_in_place,) = [rc for rc in render_grid(tpl) if rc.cell.id == "steps=10"]
    moved = {n.name: n.key for n in compile_spec(load_spec(cell))}
    assert moved == {n.name: n.key for n in compile_spec(cell_in_place.spec)}
