"""Bad data through the CLI: `resalign run` stops with exit code 2, the file named, no traceback."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

SPEC = """
name: bad-data
model:
  family: tiny
  tiny: {{block_out_channels: [16], cross_attention_dim: 16, text_hidden_size: 16,
         text_layers: 1, max_length: 32}}
datasets:
  harm: {{type: digits, digits: [0], limit: 2}}
  benign: {{type: imagefolder, path: {folder}}}
concepts:
  digit: {{harmful: [harm], retain: [harm], label: 0}}
unlearn: {{method: none}}
threats:
  t: {{data: benign, steps: 1, batch_size: 1, grad_accumulation: 1, precision: fp32}}
tracking: {{enabled: false}}
"""


def _folder(tmp_path, column="text"):
    folder = tmp_path / "benign"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / f"{i}.png")
    rows = [{"file_name": f"{i}.png", column: "a handwritten digit one"} for i in range(2)]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store for all cases: the (identical) model node is built once and then cached."""
    return tmp_path_factory.mktemp("store")


@pytest.mark.parametrize(
    "breakage, expected",
    [
        ("caption_column", ["no column 'text'", "metadata.jsonl", "caption_column"]),
        ("unreadable", ["cannot read image", "1.png"]),
        ("missing_image", ["does not exist", "1.png"]),
        ("empty", ["no items"]),
        ("missing_folder", ["nowhere"]),
    ],
)
def test_bad_data_through_cli(tmp_path, store, breakage, expected):
    from resalign.cli import cli

    folder = _folder(tmp_path, column="caption" if breakage == "caption_column" else "text")
    if breakage == "unreadable":
        (folder / "1.png").write_bytes(b"garbage")
    elif breakage == "missing_image":
        (folder / "1.png").unlink()
    elif breakage == "empty":
        (folder / "metadata.jsonl").write_text("")
    elif breakage == "missing_folder":
        folder = tmp_path / "nowhere"
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(folder=folder))
    res = CliRunner().invoke(cli, ["run", str(spec), "--store", str(store), "--no-tracking"])
    # A missing folder is caught before anything runs; bad data found while a node runs fails
    # that node. Either way it is the user's to fix: exit 2, no traceback.
    assert res.exit_code == 2, res.output
    if breakage != "missing_folder":
        assert "FAILED attack/original/t" in res.output, res.output
    assert "Traceback" not in res.output
    for text in expected:
        assert text in res.output, res.output
