"""The report's outer-step section (resalign.evaluation.dynamics): medians and totals per
model from steps.jsonl, medians and ranges per row, damaged files named by line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from resalign.errors import UserError
from resalign.evaluation.dynamics import (
    dynamics_from_dirs,
    dynamics_markdown,
    dynamics_table,
    read_dynamics,
)


def _write(folder, records, extra=""):
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + extra
    (folder / "steps.jsonl").write_text(text)
    return folder


def _steps(rng, n, resilience=True):
    out = []
    for i in range(n):
        r = {"step": i + 1, "direct_grad_norm": float(rng.uniform(0.1, 2)), "fallbacks": 0.0}
        if resilience:
            r |= {
                "resilience_ratio": float(rng.uniform(0, 3)),
                "resilience_cosine": float(rng.uniform(-1, 1)),
                "cosine": float(rng.uniform(-1, 1)),
                "hypergrad_norm": float(rng.uniform(0, 5)),
                "fallbacks": float(i % 3 == 0),
                "meta0.config": "benign",  # a string: not a statistic
            }
        out.append(r)
    return out


def test_medians_per_model_and_per_row_match_numpy(tmp_path):
    rng = np.random.default_rng(0)
    recs = {s: _steps(rng, n) for s, n in ((0, 7), (1, 4), (2, 9))}
    dirs = {f"unlearn/res/seed{s}": _write(tmp_path / f"r{s}", r) for s, r in recs.items()}
    dirs["unlearn/plain/seed0"] = _write(tmp_path / "p0", _steps(rng, 5, resilience=False))
    models = dynamics_from_dirs(dirs)  # no node.json: located by their names
    assert {(m.row, m.unlearn_seed) for m in models} == {
        ("res", 0), ("res", 1), ("res", 2), ("plain", 0)}  # fmt: skip
    table = dynamics_table(models, rows=["original", "plain", "res"])
    assert table is not None
    (line,) = table["rows"]  # plain has no resilience statistic: no line
    assert line["row"] == "res" and line["models"] == 3 and line["steps"] == 20
    for k in ("resilience_ratio", "resilience_cosine", "cosine", "hypergrad_norm"):
        per_model = [np.median([r[k] for r in recs[s]]) for s in (0, 1, 2)]
        assert line[k]["median"] == pytest.approx(np.median(per_model), rel=1e-12)
        assert line[k]["lo"] == pytest.approx(min(per_model), rel=1e-12)
        assert line[k]["hi"] == pytest.approx(max(per_model), rel=1e-12)
        assert line[k]["n"] == 3
    totals = [sum(r["fallbacks"] for r in recs[s]) for s in (0, 1, 2)]
    assert line["fallbacks"]["median"] == np.median(totals)
    assert [c["key"] for c in table["columns"]] == [
        "resilience_ratio", "resilience_cosine", "cosine", "hypergrad_norm",
        "direct_grad_norm", "fallbacks"]  # fmt: skip
    md = dynamics_markdown(table)
    assert len({ln.count("|") for ln in md.splitlines()}) == 1  # no "|" inside a cell
    assert md.splitlines()[0].startswith("| row | models | resilience / direct |")
    assert f"| res | 3 | {line['resilience_ratio']['median']:.3g} (" in md


def test_models_unlearned_before_the_new_statistics_show_a_dash(tmp_path):
    rng = np.random.default_rng(1)
    old = [{k: v for k, v in r.items() if not k.startswith("resilience_")} for r in _steps(rng, 3)]
    models = [read_dynamics("unlearn/res/seed0", "res", 0, _write(tmp_path / "a", old))]
    table = dynamics_table(models)
    assert table is not None and "resilience_ratio" not in table["rows"][0]
    assert "resilience_ratio" not in [c["key"] for c in table["columns"]]
    assert dynamics_table([]) is None


def test_non_finite_values_are_left_out_of_the_median(tmp_path):
    recs = [{"hypergrad_norm": v} for v in (1.0, float("nan"), 3.0, float("inf"), 2.0)]
    m = read_dynamics("u", "res", 0, _write(tmp_path / "a", recs))
    assert m.steps == 5 and m.values["hypergrad_norm"] == 2.0


@pytest.mark.parametrize("bad", ["{not json\n", "[1, 2]\n"])
def test_a_damaged_line_is_a_user_error_naming_file_and_line(tmp_path, bad):
    folder = _write(tmp_path / "a", [{"hypergrad_norm": 1.0}, {"hypergrad_norm": 2.0}], bad)
    with pytest.raises(UserError) as e:
        read_dynamics("unlearn/res/seed0", "res", 0, folder)
    assert "line 3" in e.value.message and str(folder / "steps.jsonl") in e.value.message
    assert e.value.where == f"{folder / 'steps.jsonl'}:3"


def test_a_model_without_its_steps_file_is_left_out_not_an_error(tmp_path):
    (tmp_path / "none").mkdir()
    kept = _write(tmp_path / "a", [{"hypergrad_norm": 1.0, "resilience_ratio": 0.5}])
    models = dynamics_from_dirs({"unlearn/res/seed0": kept, "unlearn/res/seed1": tmp_path / "none"})
    assert [(m.row, m.unlearn_seed) for m in models] == [("res", 0)]
