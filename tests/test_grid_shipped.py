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


ROOT = Path(__file__).resolve().parents[1] / "templates"


def test_every_paper_template_has_a_cpu_variant_with_the_same_cells():
    from resalign.spec.templates import load_template

    for name in ("ablation", "baselines", "attack_budget"):
        paper = load_template(ROOT / f"{name}.yaml.j2")
        cpu = load_template(ROOT / f"{name}_digits.yaml.j2")
        assert cpu.axes == paper.axes and len(cpu.cells) == len(paper.cells)
        if name != "attack_budget":  # the attack budget's lr/steps values are CPU-scaled
            assert [c.id for c in cpu.cells] == [c.id for c in paper.cells]
    # the CPU variants run on the built-in demo: tiny model, no files to provide
    for path in ROOT.glob("*_digits.yaml.j2"):
        _, prepared = prepare(path, check_files=True)
        assert all(rc.spec.spec.model.family == "tiny" for rc, _ in prepared)


def _rows(path):
    _, prepared = prepare(path)
    return {rc.cell.id: (rc, g) for rc, g in prepared}


@pytest.mark.parametrize("name", ["ablation", "ablation_digits"])
def test_ablation_rows_mean_what_the_paper_rows_say(name):
    from resalign.algorithms.methods import candidate_configs

    cells = _rows(ROOT / f"{name}.yaml.j2")

    def unlearn(cid):
        rc, _ = cells[cid]
        return rc.spec.rows[rc.cell.slug]

    assert unlearn("hypergradient=none,meta=none").method == "plain"
    for cid in list(cells)[1:]:
        u = unlearn(cid)
        assert u.method == "resalign" and u.resilience.hypergradient.kind == "moreau"
    one = unlearn("hypergradient=moreau,meta=none").resilience.meta
    # + hypergradient: one fixed simulated fine-tuning on one data set
    assert one.samples_per_step == 1 and len(candidate_configs(one)) == 1
    assert candidate_configs(one)[0].data is not None
    data = unlearn("hypergradient=moreau,meta=data").resilience.meta
    # + meta over data: the first config only, J > 1 runs, its data set drawn from meta.data
    assert data.over == "data" and data.samples_per_step > 1 and len(data.data) > 1
    assert candidate_configs(data)[0].data is None
    both = unlearn("hypergradient=moreau,meta=data_and_configs").resilience.meta
    cands = candidate_configs(both)
    assert both.over == "data_and_configs" and 1 < both.samples_per_step <= len(cands)
    assert len({(c.optimizer, c.lr, c.steps, c.algorithm) for c in cands}) == len(cands)


@pytest.mark.parametrize("name", ["baselines", "baselines_digits"])
def test_baselines_one_method_per_cell_on_one_model(name):
    cells = _rows(ROOT / f"{name}.yaml.j2")
    methods = [rc.spec.rows[rc.cell.slug].method for rc, _ in cells.values()]
    assert methods == ["none", "plain", "esd", "gradient_ascent", "resalign"]
    assert len({g["model"].key for _, g in cells.values()}) == 1
    # no unlearning: the none cell's row reuses the original's attack nodes
    rc, g = cells["method=none"]
    assert not g.of_kind("unlearn")
    own = {n.key for n in g.of_kind("attack") if f"/{rc.cell.slug}/" in n.name}
    orig = {n.key for n in g.of_kind("attack") if n.name.startswith("attack/original/")}
    assert own and own == orig


@pytest.mark.parametrize("name", ["attack_budget", "attack_budget_digits"])
def test_attack_budget_varies_the_attack_against_one_unlearned_model(name):
    cells = _rows(ROOT / f"{name}.yaml.j2")
    assert len(cells) == 8
    unlearn = {n.key for _, g in cells.values() for n in g.of_kind("unlearn")}
    assert len(unlearn) == 1  # one fixed unlearned model, computed once
    attacks = [
        (t.lr, t.steps, t.algorithm)
        for rc, _ in cells.values()
        for t in rc.spec.spec.threats.values()
    ]
    assert len(set(attacks)) == 8
    for rc, _ in cells.values():
        (tname,) = rc.spec.spec.threats
        assert tname == f"attack_s{rc.cell.axes['steps']}"


def test_attack_budget_digits_attacks_the_ablations_resalign_row():
    ab = _rows(ROOT / "attack_budget_digits.yaml.j2")
    abl = _rows(ROOT / "ablation_digits.yaml.j2")
    (_, g4) = abl["hypergradient=moreau,meta=data_and_configs"]
    key = g4.of_kind("unlearn")[0].key
    assert all(g.of_kind("unlearn")[0].key == key for _, g in ab.values())


@pytest.mark.parametrize("path", sorted(ROOT.glob("*_digits.yaml.j2")), ids=lambda p: p.name)
def test_digits_templates_extend_the_demo_and_share_its_model_node(path):
    """Each *_digits template extends specs/digits_demo.yaml instead of copying it (a copy
    drifted: max_length 32, pretrain lr 2e-3, no trained text encoder), so every cell's model
    node is the demo's node: same key, cached once for the demo and every grid."""
    from resalign.graph.compile import compile_spec
    from resalign.spec import load_spec

    assert "extends: ../specs/digits_demo.yaml" in path.read_text()
    demo = load_spec(ROOT.parent / "specs" / "digits_demo.yaml")
    demo_model = compile_spec(demo)["model"].key
    _, prepared = prepare(path)
    assert prepared and all(g["model"].key == demo_model for _, g in prepared)
    # and the cells keep the demo's unlearning lr and evaluation, unless the cell's attempt
    # says it changes the lr (plain_attempts' attempt=lora_lr1e-3)
    for rc, _ in prepared:
        spec = rc.spec.spec
        if "_lr" not in str(rc.cell.axes.get("attempt", "")):
            assert spec.unlearn.optimizer.lr == demo.spec.unlearn.optimizer.lr
        else:
            assert spec.unlearn.optimizer.lr != demo.spec.unlearn.optimizer.lr
        assert spec.evaluate.generation == demo.spec.evaluate.generation.model_copy(
            update={"images_per_prompt": spec.evaluate.generation.images_per_prompt}
        )


def test_baselines_digits_resalign_cell_is_the_ablations_full_row():
    base = _rows(ROOT / "baselines_digits.yaml.j2")["method=resalign"][0]
    abl = _rows(ROOT / "ablation_digits.yaml.j2")["hypergradient=moreau,meta=data_and_configs"][0]
    a = base.spec.rows[base.cell.slug].model_dump(exclude={"label"})
    b = abl.spec.rows[abl.cell.slug].model_dump(exclude={"label"})
    assert a == b
    assert base.spec.spec.threats == abl.spec.spec.threats
