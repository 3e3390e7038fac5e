"""The YAML loader (positions, floats, duplicates) and the resolve pass (rows, harvests, paths)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from resalign.spec import SpecError, load_spec, load_spec_text, load_yaml_text
from resalign.spec.resolve import ORIGINAL_ROW

BASE = """\
name: t
model: {family: tiny}
datasets:
  harm: {type: digits, digits: [3]}
  keep: {type: digits, digits: [0, 1]}
  p: {type: prompts, path: p.txt}
concepts:
  three: {harmful: [harm], retain: [keep]}
threats:
  ft: {data: keep, steps: 10}
"""


@pytest.mark.parametrize(
    "text,value",
    [("1e-5", 1e-5), ("1E-5", 1e-5), (".5e3", 500.0), ("-2e+3", -2000.0), ("3.0", 3.0)],
)
def test_scientific_notation_is_float(text: str, value: float) -> None:
    data, _ = load_yaml_text(f"x: {text}\n", "f.yaml")
    assert isinstance(data["x"], float) and data["x"] == value
    # PyYAML's YAML 1.1 resolver reads some of these as strings; we do not.
    assert yaml.safe_load(f"x: {text}\n")["x"] in (value, text)


@pytest.mark.parametrize("text,value", [("10", 10), ("0x10", 16), ("true", True), ("~", None)])
def test_other_scalars_as_safe_load(text: str, value: object) -> None:
    data, _ = load_yaml_text(f"x: {text}\n", "f.yaml")
    assert data["x"] == value == yaml.safe_load(f"x: {text}\n")["x"]
    assert type(data["x"]) is type(value)


def test_loader_does_not_change_pyyaml() -> None:
    load_yaml_text("x: 1e-5\n", "f.yaml")
    assert yaml.safe_load("x: 1e-5\n")["x"] == "1e-5"


def test_positions_of_keys_and_values() -> None:
    text = "a:\n  b: [1, 2]\n  c:\n    d: x\n"
    data, smap = load_yaml_text(text, "f.yaml")
    assert data == {"a": {"b": [1, 2], "c": {"d": "x"}}}
    assert smap.keys[("a", "b")] == (2, 3)
    assert smap.values[("a", "b", 1)] == (2, 10)
    assert smap.keys[("a", "c", "d")] == (4, 5)
    assert smap.position(("a", "c", "d", "missing")) == (4, 8)


def test_keys_taken_as_written_and_merges() -> None:
    text = "base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  y: 3\non: 1\n"
    data, _ = load_yaml_text(text, "f.yaml")
    assert data["other"] == {"x": 1, "y": 3}
    assert data["on"] == 1


def test_several_documents_are_an_error() -> None:
    with pytest.raises(SpecError) as exc:
        load_yaml_text("a: 1\n---\nb: 2\n", "f.yaml")
    assert "YAML syntax error" in exc.value.render()


def test_rows_and_seeds(tmp_path: Path) -> None:
    text = BASE + "seed: 7\nunlearn: {label: ours, steps: 5}\nbaselines:\n"
    text += "  plain_row: {method: plain}\n  esd_row: {method: esd, seed: 3}\n"
    r = load_spec_text(text, filename="t.yaml", base_dir=tmp_path)
    assert list(r.rows) == [ORIGINAL_ROW, "ours", "plain_row", "esd_row"]
    assert r.rows[ORIGINAL_ROW].method == "none"
    assert [u.seed for u in r.rows.values()] == [7, 7, 7, 3]
    # baselines inherit the user's unlearn block (steps) and are validated on their own
    assert r.rows["plain_row"].steps == 5 and r.rows["plain_row"].method == "plain"
    assert r.rows["esd_row"].harmful_loss.kind == "esd"
    assert r.spec.unlearn.seed == 7 and r.spec.unlearn.label == "ours"


def test_meta_defaults(tmp_path: Path) -> None:
    r = load_spec_text(BASE, filename="t.yaml", base_dir=tmp_path)
    meta = r.rows["resalign"].resilience.meta
    assert meta.data == ["keep"]  # the concepts' retain datasets
    assert meta.distribution is not None and meta.distribution.lr == [1e-4, 1e-5, 1e-6]


def test_implied_harvest_and_absolute_paths(tmp_path: Path) -> None:
    text = BASE.replace("harmful: [harm]", "harmful: [p]")
    r = load_spec_text(text, filename="t.yaml", base_dir=tmp_path)
    assert r.spec.concepts["three"].harmful == ["p__harvest"]
    assert r.implied_harvests == {"p__harvest": "p"}
    assert r.spec.datasets["p__harvest"].type == "harvest"
    assert r.spec.datasets["p"].path == str((tmp_path / "p.txt").resolve())


def test_hub_id_stays_an_id(tmp_path: Path) -> None:
    text = BASE.replace("model: {family: tiny}", "model: {family: sd, pretrained: org/model}")
    r = load_spec_text(text, filename="t.yaml", base_dir=tmp_path)
    assert r.spec.model.pretrained == "org/model"
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "model").mkdir()
    r = load_spec_text(text, filename="t.yaml", base_dir=tmp_path)
    assert r.spec.model.pretrained == str(tmp_path / "org" / "model")


def test_check_files_names_missing_data_and_weights(tmp_path: Path) -> None:
    text = BASE + (
        "evaluate:\n  metrics:\n"
        "    - {kind: fid, prompts: p, reference: keep, inception_path: w/inc.pth}\n"
    )
    load_spec_text(text, filename="t.yaml", base_dir=tmp_path)  # no file checks by default
    with pytest.raises(SpecError) as exc:
        load_spec_text(text, filename="t.yaml", base_dir=tmp_path, check_files=True)
    lines = [i.headline() for i in exc.value.issues]
    assert lines[0].startswith("t.yaml:6:") and "p.txt" in lines[0] and "does not exist" in lines[0]
    assert lines[1].startswith("t.yaml:13:") and "inc.pth" in lines[1]
    assert "FID Inception-v3 weights" in lines[1]
    (tmp_path / "p.txt").write_text("a prompt\n")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "inc.pth").write_bytes(b"x")
    load_spec_text(text, filename="t.yaml", base_dir=tmp_path, check_files=True)


def test_load_spec_relative_to_file(tmp_path: Path) -> None:
    sub = tmp_path / "specs"
    sub.mkdir()
    (sub / "s.yaml").write_text(BASE.replace("path: p.txt", "path: ../data/p.txt"))
    r = load_spec(sub / "s.yaml")
    assert r.spec.datasets["p"].path == str((tmp_path / "data" / "p.txt").resolve())
