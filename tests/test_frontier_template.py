"""templates/frontier_digits.yaml.j2: the demo's model, data and rows at several unlearning
strengths, with unlearning seeds and only the poisoned threat; the demo's own cell (50 steps)
reuses the demo's nodes."""

from __future__ import annotations

from pathlib import Path

from resalign.graph.compile import compile_spec
from resalign.spec import load_spec
from resalign.spec.templates import load_template, render_grid

ROOT = Path(__file__).resolve().parents[1]


def test_frontier_template_cells():
    cells = list(render_grid(load_template(ROOT / "templates" / "frontier_digits.yaml.j2")))
    assert [c.cell.id for c in cells] == ["steps=50", "steps=100"]
    demo = compile_spec(load_spec(ROOT / "specs" / "digits_demo.yaml"))
    for rc in cells:
        steps = int(rc.cell.id.split("=")[1])
        assert list(rc.spec.rows) == ["original", "resalign", "plain"]
        for row in ("resalign", "plain"):
            assert rc.spec.rows[row].steps == steps and rc.spec.rows[row].seeds == [0, 1, 2]
        assert list(rc.spec.spec.threats) == ["poison5_adam_3e-4"]
        g = compile_spec(rc.spec)
        assert g["model"].key == demo["model"].key
        # 8 attacked models (original, oracle, 2 rows x 3 seeds) x 2 attack seeds x 3 segments
        assert len(g.of_kind("unlearn")) == 6 and len(g.of_kind("attack")) == 8 * 2 * 3
        assert g["report"].params["rows"] == ["original", "oracle", "resalign", "plain"]
    g50 = compile_spec(cells[0].spec)
    # the oracle control: the same nodes (keys) in both cells, so they run once
    g100 = compile_spec(cells[1].spec)
    oracle = [n.name for n in g50 if n.name == "model/oracle" or n.row == "oracle"]
    assert len(oracle) == 1 + 2 * 3 * 2 + 1
    assert all(g50[n].key == g100[n].key for n in oracle)
    for name in (
        "unlearn/resalign/seed0",
        "unlearn/plain/seed0",
        "attack/plain/seed0/poison5_adam_3e-4/seed2/step50",
        "evaluate/resalign/seed0/poison5_adam_3e-4/seed1/step100",
    ):
        assert g50[name].key == demo[name].key, name
