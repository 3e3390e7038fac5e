"""Issue 20's resurgence studies run end to end at toy size: the attempts grid (fewer steps,
LoRA), the larger-UNet and shared-word specs, ResAlign on ESD's loss, and ResAlign where
plain resurges (fewer steps; the larger UNet). Each is shrunk by ``--set`` items only (model
width, data, steps, images); rows, threats, seeds and the simulated fine-tunes' shape stay as
shipped, and each report is written and holds every row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ("digits_train", "harmful", "held_out", "retain", "meta", "benign")
SHRINK = [
    "model.tiny.pretrain.steps=2",
    "model.tiny.block_out_channels=[8,16]",
    "model.tiny.cross_attention_dim=8",
    "model.tiny.text_hidden_size=8",
    "model.tiny.text_layers=1",
    *[f"datasets.{d}.limit=8" for d in DATA],
    "unlearn.steps=1",
    "evaluate.generation.steps=2",
    "evaluate.generation.images_per_prompt=1",
    "evaluate.generation.batch_size=20",
]


def _threat(name: str) -> list[str]:
    return [
        f"threats.{name}.steps=2",
        f"threats.{name}.eval_at=[1,2]",
        f"threats.{name}.batch_size=4",
        f"threats.{name}.grad_accumulation=1",
        f"threats.{name}.seeds=[1]",
    ]


BENIGN = [*SHRINK, *_threat("benign_adam_3e-4"), "unlearn.seeds=[0]"]
SIMULATED = [
    "unlearn.resilience.meta.configs.benign_adam_3e-4_10.steps=1",
    "unlearn.resilience.meta.configs.benign_adam_3e-4_20.steps=1",
    "unlearn.resilience.hypergradient.iterations=1",
]


def _report(store: Path) -> dict:
    (table,) = (store / "report").glob("*/table.json")
    return json.loads(table.read_text())


def _every_row_has_its_values(report: dict, rows: set[str]) -> None:
    assert set(report["rows"]) == rows
    for r in report["table"]:
        pre = r["cells"]["concept_rate/pre"]
        assert pre["n"] >= 1 and 0.0 <= pre["mean"] <= 1.0  # rates stay inside [0, 1]


@pytest.fixture()
def options(tmp_path, monkeypatch):
    from resalign.engine.options import RunOptions

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def make(sets: list[str]) -> RunOptions:
        return RunOptions(store=tmp_path / "runs", tracking=False, sets=sets)

    return make


@pytest.mark.slow
@pytest.mark.parametrize(
    "template,cell,sets,rows",
    [
        ("plain_attempts_digits", "attempt=lora", BENIGN, {"original", "plain"}),
        (
            "fewer_steps_benign_digits",
            "steps=25",
            [*BENIGN, *SIMULATED],
            {"original", "resalign_benign", "plain"},
        ),
        (
            "larger_unet_benign",
            "steps=25",
            [*BENIGN, *SIMULATED],
            {"original", "resalign_benign", "plain"},
        ),
        (
            "lora_benign",
            "beta=0.1,steps=25",
            [*BENIGN, *SIMULATED],
            {"original", "resalign_beta0.1", "plain"},
        ),
        (
            "lora_direct_part",
            "beta=0.5,steps=25",
            [*SHRINK, "unlearn.seeds=[0]"],  # no threat: evaluated before fine-tuning only
            {"original", "plain_as_beta0.5"},
        ),
        (
            "esd_benign_digits",
            "steps=10",
            [*SHRINK, *_threat("benign_esd_worst"), *SIMULATED, "unlearn.seeds=[0]"],
            {"original", "resalign_esd", "esd"},
        ),
    ],
)
def test_resurgence_templates_run_at_toy_size(template, cell, sets, rows, options) -> None:
    from resalign.engine.grid import run_grid

    o = options(sets)
    run_grid(ROOT / "templates" / f"{template}.yaml.j2", o, cells=[cell])
    _every_row_has_its_values(_report(o.store), rows)


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec,sets",
    [
        ("digits_benign_larger_resalign", [*BENIGN, *SIMULATED]),
        ("digits_benign_shared", BENIGN),
    ],
)
def test_resurgence_specs_run_at_toy_size(spec, sets, options) -> None:
    rows = {"original", "plain"} | ({"resalign_benign"} if "resalign" in spec else set())
    from resalign.engine.run import run_spec

    o = options(sets)
    run_spec(ROOT / "specs" / f"{spec}.yaml", o)
    _every_row_has_its_values(_report(o.store), rows)


@pytest.mark.slow
def test_the_larger_unet_transfer_grid_runs_at_toy_size_and_reports_matched_entries(
    options, tmp_path
) -> None:
    """One row of templates/transfer_larger_unet.yaml.j2 (both strengths, so the row has a
    curve) against both attacks: the report's transfer section holds its utility-matched
    entry per attack. The strengths stay as shipped (25 and 50 steps: a toy model takes
    seconds), so the two cells are different models."""
    from resalign.engine.grid import run_grid
    from resalign.reporting import report_for_grid

    sets = [
        *[s for s in SHRINK if not s.startswith("unlearn.steps")],
        *_threat("benign_adam_3e-4"),
        *_threat("benign_lora_1e-3"),
        "unlearn.seeds=[0]",
        "unlearn.resilience.meta.configs.benign_adam_3e-4_50.steps=1",
        "unlearn.resilience.hypergradient.iterations=1",
    ]
    o = options(sets)
    tpl = ROOT / "templates" / "transfer_larger_unet.yaml.j2"
    cells = ["sim=benign_long,steps=25", "sim=benign_long,steps=50"]
    run_grid(tpl, o, cells=cells)
    out = report_for_grid(str(tpl), o.store, tmp_path / "report", sets=sets, only=cells)
    table = json.loads((out / "table.json").read_text())
    matched = table["transfer"]["matched"]
    assert matched["x_metric"] == "retain_accuracy"
    (row,) = matched["rows"]
    assert row["row"] == "sim-benign_long" and row["reference"] == "plain"
    assert set(row["matched"]) == {"benign_adam_3e-4", "benign_lora_1e-3"}
    for d in row["matched"].values():
        assert d["n"] + d["pairs_without_common_range"] == 1  # one unlearning x attack seed
    assert "equal retain_accuracy" in (out / "report.md").read_text()
    # the outer-step section: one line per cell's ResAlign row, under the cell's row name, each
    # from its own model's steps (25 and 50 outer steps); plain has no resilience term
    steps = {r["row"]: r for r in table["dynamics"]["rows"]}
    assert set(steps) == {f"{c}/sim-benign_long" for c in cells}
    assert [steps[f"{c}/sim-benign_long"]["steps"] for c in cells] == [25, 50]
    assert all(0.0 < r["resilience_ratio"]["median"] for r in steps.values())
