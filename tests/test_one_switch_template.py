"""templates/one_switch_digits.yaml.j2: each cell changes exactly one setting of the demo's
ResAlign row, runs under both threats, and shares its nodes with specs/digits_benign.yaml
where the settings agree (so the cache runs them once)."""

from __future__ import annotations

from pathlib import Path

from resalign.graph.compile import compile_spec
from resalign.spec import load_spec
from resalign.spec.templates import load_template, render_grid

ROOT = Path(__file__).resolve().parents[1]


def _cells():
    tpl = load_template(ROOT / "templates" / "one_switch_digits.yaml.j2")
    return {rc.cell.id.split("=")[1]: rc for rc in render_grid(tpl)}


def _diff(a, b, path=()):
    """Paths where two dumped mappings differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), (*path, k))
        return out
    return [] if a == b else [".".join(map(str, path))]


def test_each_cell_changes_one_setting_of_the_demo_row():
    cells = _cells()
    demo = cells["demo"].spec.rows["demo"].model_dump(mode="json")
    want = {
        "beta0": ["resilience.beta"],
        "hyper-none": ["resilience.hypergradient.kind"],
        "moreau-auto": ["resilience.hypergradient.gamma"],
        "unrolled": ["resilience.hypergradient.kind"],
        "meta-benign": ["resilience.meta.configs", "resilience.meta.data"],
        "samples-3": ["resilience.meta.configs", "resilience.meta.samples_per_step"],
        "inner-50": ["resilience.meta.configs"],
    }
    for switch, paths in want.items():
        row = cells[switch].spec.rows[switch].model_dump(mode="json")
        changed = [p for p in _diff(demo, row) if p != "label"]
        # a changed mapping shows as its changed leaves; compare their prefixes
        assert sorted({p for p in paths if any(c.startswith(p) for c in changed)}) == paths
        assert all(any(c.startswith(p) for p in paths) for c in changed), (switch, changed)
    assert cells["beta0"].spec.rows["beta0"].resilience.beta == 0.0
    assert list(cells["inner-50"].spec.rows["inner-50"].resilience.meta.configs) == [
        "poison_adam_3e-4_50"
    ]


def test_cells_run_both_threats_and_share_the_benign_studys_nodes():
    cells = _cells()
    benign = compile_spec(load_spec(ROOT / "specs" / "digits_benign.yaml"))
    for switch, rc in cells.items():
        assert list(rc.spec.spec.threats) == ["poison5_adam_3e-4", "benign_adam_3e-4"]
        assert rc.spec.rows[switch].seeds == [0, 1, 2, 3, 4]
    same = {"demo": "resalign", "meta-benign": "resalign_benign"}
    for switch, row in same.items():
        g = compile_spec(cells[switch].spec)
        slug = switch
        for u in range(5):
            for name in (
                f"unlearn/{{}}/seed{u}",
                f"attack/{{}}/seed{u}/benign_adam_3e-4/seed1/step200",  # attack seed 1 only
                f"evaluate/{{}}/seed{u}/benign_adam_3e-4/seed1/step100",
            ):
                assert g[name.format(slug)].key == benign[name.format(row)].key, name
        assert g["unlearn/plain/seed4"].key == benign["unlearn/plain/seed4"].key
    # the other cells unlearn differently: their own unlearn nodes
    g = compile_spec(cells["unrolled"].spec)
    assert g["unlearn/unrolled/seed0"].key != benign["unlearn/resalign/seed0"].key
