"""The tiny flow-matching model on the digits (``model.tiny.architecture: sd3``): the shipped
``specs/digits_flow.yaml``, shrunk to seconds by a child spec that overrides only sizes, runs
the demo's path (pretrain → unlearn with ResAlign and plain → attack → evaluate → report)
through the CLI, and its nodes are SD3-shaped and trained with flow matching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from resalign.cli import cli

SPECS = Path(__file__).resolve().parents[1] / "specs"


def shrunk_child(base: Path) -> dict:
    """A child of ``base`` that overrides only sizes (the names come from the demo it
    extends)."""
    demo = yaml.safe_load((SPECS / "digits_demo.yaml").read_text())
    configs = demo["unlearn"]["resilience"]["meta"]["configs"]
    return {
        "version": 1,
        "extends": str(base),
        "name": "digits_flow_shrunk",
        "model": {
            "tiny": {
                "cross_attention_dim": 16,
                "text_hidden_size": 8,
                "text_layers": 1,
                "pretrain": {"steps": 4, "batch_size": 8},
            }
        },
        "datasets": {
            n: {"limit": 16} for n, d in demo["datasets"].items() if d["type"] == "digits"
        },
        "unlearn": {
            "steps": 2,
            "checkpoint_every": 1,
            "resilience": {
                "meta": {"configs": {n: {"steps": 2, "batch_size": 4} for n in configs}}
            },
        },
        "threats": {n: {"eval_at": [1, 2], "steps": 2, "seeds": [1]} for n in demo["threats"]},
        "evaluate": {"generation": {"steps": 2, "images_per_prompt": 1, "batch_size": 10}},
    }


@pytest.mark.slow
def test_flow_demo_path_runs_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump(shrunk_child(SPECS / "digits_flow.yaml"), sort_keys=False))
    store = tmp_path / "runs"
    res = CliRunner().invoke(cli, ["run", str(path), "--store", str(store), "--no-tracking"])
    assert res.exit_code == 0, res.output
    rep = CliRunner().invoke(cli, ["report", str(path), "--store", str(store)])
    assert rep.exit_code == 0, rep.output
    rows = [line.split("|")[1].strip() for line in rep.output.splitlines() if line.startswith("| ")]
    assert {"original", "resalign", "plain"} <= set(rows)
    (model_dir,) = store.glob("model/*")
    info = json.loads((model_dir / "model.json").read_text())
    assert info["layout"] == "sd3" and info["objective"]["kind"] == "flow_match"
    assert info["objective"]["sampling"] == "logit_normal"
    index = json.loads((model_dir / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    stats = json.loads((model_dir / "stats.json").read_text())
    assert stats["pretrain_steps"] == 4
    # unlearning trained the transformer (full selection), saved as a merged SD3 transformer
    for un in store.glob("unlearn/*"):
        assert "SD3Transformer2DModel" in (un / "unet" / "config.json").read_text()
