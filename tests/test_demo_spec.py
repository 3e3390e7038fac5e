"""The shipped demo spec (specs/digits_demo.yaml), shrunk to seconds by overriding only its
sizes (model width, step counts, dataset sizes, images), runs end to end through the CLI and
the report has the three rows (original, resalign, plain) and both threats."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from resalign.cli import cli

DEMO = Path(__file__).resolve().parents[1] / "specs" / "digits_demo.yaml"


def shrink(spec: dict) -> dict:
    tiny = spec["model"]["tiny"]
    tiny.update(block_out_channels=[8, 16], cross_attention_dim=8, text_hidden_size=8)
    tiny["text_layers"] = 1
    tiny["pretrain"].update(steps=4, batch_size=8)
    for data in spec["datasets"].values():
        if data["type"] == "digits":
            data["limit"] = 16
    un = spec["unlearn"]
    un["steps"] = 2
    un["checkpoint_every"] = 1
    for config in un["resilience"]["meta"]["configs"].values():
        config.update(steps=2, batch_size=4)
    for threat in spec["threats"].values():
        threat["eval_at"] = [1, 2]
        threat.update(steps=2, seeds=[1])
    spec["evaluate"]["generation"].update(steps=2, images_per_prompt=1, batch_size=10)
    return spec


@pytest.mark.slow
def test_demo_spec_shrunk_runs_end_to_end(tmp_path: Path) -> None:
    spec = shrink(yaml.safe_load(DEMO.read_text()))
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    store = tmp_path / "runs"
    res = CliRunner().invoke(cli, ["run", str(path), "--store", str(store), "--no-tracking"])
    assert res.exit_code == 0, res.output
    rep = CliRunner().invoke(cli, ["report", str(path), "--store", str(store)])
    assert rep.exit_code == 0, rep.output
    rows = [line.split("|")[1].strip() for line in rep.output.splitlines() if line.startswith("| ")]
    assert {"original", "resalign", "plain"} <= set(rows)
    for threat in spec["threats"]:
        assert threat in rep.output
