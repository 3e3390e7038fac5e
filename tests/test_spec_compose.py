"""Specs that compose: ``extends:`` (deep merge, !override, !reset), ``--set`` and ``vars:``;
errors point at the file and line that wrote the value."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from resalign.cli import cli
from resalign.spec import SpecError, load_spec, load_spec_text

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "specs" / "digits_demo.yaml"

BASE = """\
name: base
model: {family: tiny, tiny: {pretrain: {dataset: train, steps: 5}}}
datasets:
  train: {type: digits}
  harmful: {type: digits, digits: [0]}
  retain: {type: digits, digits: [1, 2]}
  prompts: {type: prompts, path: data/prompts.txt}
concepts:
  c: {harmful: [harmful], retain: [retain], label: 0}
unlearn:
  method: plain
  steps: 7
  optimizer: {name: adam, lr: 1.0e-4}
baselines:
  ga: {method: gradient_ascent}
threats:
  t1: {data: retain, lr: 1.0e-3, steps: 4, seeds: [1]}
"""


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text(text)
    return p


def test_extends_deep_merges_and_keeps_base_paths_relative_to_the_base(tmp_path: Path) -> None:
    _write(tmp_path / "base", "base.yaml", BASE)
    child = _write(
        tmp_path / "exp",
        "child.yaml",
        "extends: ../base/base.yaml\nname: child\nunlearn: {steps: 9}\n"
        "threats: {t2: {data: retain, lr: 1.0e-4, steps: 2, seeds: [2]}}\n",
    )
    r = load_spec(child)
    assert r.name == "child"
    u = r.rows["plain"]
    assert u.steps == 9 and u.optimizer.lr == 1e-4  # merged: the base's optimizer kept
    assert set(r.spec.threats) == {"t1", "t2"}  # mappings merge key by key
    assert set(r.rows) == {"original", "plain", "ga"}
    # a relative path the base wrote is relative to the base's folder, not the child's
    assert r.spec.datasets["prompts"].path == str((tmp_path / "base/data/prompts.txt").resolve())


def test_override_replaces_and_reset_removes(tmp_path: Path) -> None:
    _write(tmp_path, "base.yaml", BASE)
    child = _write(
        tmp_path,
        "child.yaml",
        "extends: base.yaml\nthreats: !override\n  only: {data: retain, lr: 1.0e-3, steps: 2}\n"
        "baselines: !reset\nunlearn:\n  optimizer: !override {name: sgd}\n",
    )
    r = load_spec(child)
    assert list(r.spec.threats) == ["only"]
    assert set(r.rows) == {"original", "plain"}
    assert r.rows["plain"].optimizer.name == "sgd"
    assert r.rows["plain"].optimizer.lr != 1e-4  # replaced, so the schema default


def test_override_in_a_baseline_replaces_the_unlearn_blocks_mapping(tmp_path: Path) -> None:
    """A baseline is deep-merged into the unlearn block; its ``!override`` replaces the
    mapping there (its meta configs were merged into the unlearn block's before: a 'benign'
    row silently kept the poisoned configs), in a child spec and in a spec without extends."""
    meta = (
        "  resilience:\n    meta:\n      samples_per_step: 1\n      data: [retain]\n"
        "      configs:\n"
        "        a: {algorithm: full, optimizer: adam, lr: 1.0e-4, steps: 2, data: retain}\n"
    )
    base = BASE.replace("  method: plain\n", "  method: resalign\n" + meta)
    over = (
        "baselines:\n  other:\n    resilience:\n      meta:\n        configs: !override\n"
        "          b: {algorithm: full, optimizer: sgd, lr: 1.0e-3, steps: 3, data: harmful}\n"
        "  merged:\n    resilience:\n      meta:\n        configs:\n"
        "          b: {algorithm: full, optimizer: sgd, lr: 1.0e-3, steps: 3, data: harmful}\n"
    )
    _write(tmp_path, "base.yaml", base)
    child = _write(tmp_path, "child.yaml", "extends: base.yaml\n" + over)
    alone = _write(
        tmp_path, "alone.yaml", base.replace("baselines:\n  ga: {method: gradient_ascent}\n", over)
    )
    for path in (child, alone):
        r = load_spec(path)
        assert list(r.rows["resalign"].resilience.meta.configs) == ["a"]
        assert list(r.rows["other"].resilience.meta.configs) == ["b"]
        assert list(r.rows["merged"].resilience.meta.configs) == ["a", "b"]


def test_errors_point_at_the_file_that_wrote_the_value(tmp_path: Path) -> None:
    _write(tmp_path, "base.yaml", BASE.replace("steps: 4", "steps: -4"))
    child = _write(tmp_path, "child.yaml", "extends: base.yaml\nunlearn:\n  steps: 0\n")
    with pytest.raises(SpecError) as e:
        load_spec(child)
    where = sorted(i.where for i in e.value.issues)
    # the child's bad value at its line, the inherited bad value at the base's line
    assert where == [f"{tmp_path / 'base.yaml'}:17:41", f"{child}:3:10"]
    rendered = e.value.render()
    assert "threats.t1.steps" in rendered and "unlearn.steps" in rendered


def test_extends_cycle_and_missing_base_are_clear_errors(tmp_path: Path) -> None:
    a = _write(tmp_path, "a.yaml", "extends: b.yaml\nname: a\n")
    _write(tmp_path, "b.yaml", "extends: a.yaml\nname: b\n")
    with pytest.raises(SpecError, match="cycle: a.yaml → b.yaml → a.yaml"):
        load_spec(a)
    selfref = _write(tmp_path, "s.yaml", "extends: s.yaml\n")
    with pytest.raises(SpecError, match="cycle"):
        load_spec(selfref)
    c = _write(tmp_path, "c.yaml", "name: c\nextends: nope.yaml\n")
    with pytest.raises(SpecError) as e:
        load_spec(c)
    assert e.value.issues[0].where == f"{c}:2:10"
    assert "'nope.yaml' does not exist" in e.value.issues[0].message
    d = _write(tmp_path, "d.yaml", "extends: [a.yaml]\n")
    with pytest.raises(SpecError, match="expected the path of a spec file"):
        load_spec(d)


def test_set_is_typed_by_the_schema_and_listed(tmp_path: Path) -> None:
    p = _write(tmp_path, "s.yaml", BASE)
    r = load_spec(
        p,
        sets=[
            "unlearn.steps=11",
            "tracking.experiment=2024",  # text field: kept as written, not the int 2024
            "threats.t1.seeds=[3, 4]",
            "threats.t1.lr=1e-5",
        ],
    )
    assert r.rows["plain"].steps == 11
    assert r.spec.tracking.experiment == "2024"
    assert r.spec.threats["t1"].seeds == [3, 4] and r.spec.threats["t1"].lr == 1e-5
    assert r.overrides == {
        "unlearn.steps": "11",
        "tracking.experiment": "2024",
        "threats.t1.seeds": "[3, 4]",
        "threats.t1.lr": "1e-5",
    }
    from resalign.engine.tracking import curated_params

    params = curated_params(r)
    assert params["set.unlearn.steps"] == "11" and params["set.threats.t1.lr"] == "1e-5"


def test_set_errors_point_at_the_set(tmp_path: Path) -> None:
    p = _write(tmp_path, "s.yaml", BASE)
    with pytest.raises(SpecError) as e:
        load_spec(p, sets=["unlearn.steps=10", "unlearn.stepz=3", "unlearn.optimizer.name=sgdd"])
    assert [i.where for i in e.value.issues] == ["--set:2:1", "--set:3:24"]
    assert e.value.issues[0].suggestion == "steps"
    with pytest.raises(SpecError, match="expected PATH=VALUE"):
        load_spec(p, sets=["unlearn.steps"])
    with pytest.raises(SpecError, match="is a single value"):
        load_spec(p, sets=["name.x=1"])


def test_vars_whole_values_keep_their_type_and_expressions_work() -> None:
    text = DEMO.read_text()
    r = load_spec_text(text, base_dir=DEMO.parent, sets=["vars.digit=7"])
    ds = r.spec.datasets
    assert ds["harmful"].digits == [7] and ds["held_out"].digits == [7]
    assert ds["retain"].digits == [0, 1, 2, 3, 4, 5, 6, 8, 9] == ds["benign"].digits
    assert r.spec.concepts["digit"].label == 7
    assert r.overrides == {"vars.digit": "7"}


def test_vars_errors_and_splicing(tmp_path: Path) -> None:
    good = BASE.replace("name: base", "vars: {n: 3, tag: x}\nname: run-${n}-${tag}")
    good = good.replace("unlearn:", "description: costs $$${n * 2}\nunlearn:", 1)
    p = _write(tmp_path, "v.yaml", good.replace("steps: 7", "steps: $n"))
    r = load_spec(p)
    assert r.name == "run-3-x" and r.rows["plain"].steps == 3
    assert r.spec.description == "costs $6"
    bad = _write(tmp_path, "bad.yaml", BASE.replace("steps: 7", "steps: $nope"))
    with pytest.raises(SpecError) as e:
        load_spec(bad)
    assert e.value.issues[0].where == f"{bad}:12:10"
    assert "unknown variable 'nope'" in e.value.issues[0].message
    boom = _write(tmp_path, "boom.yaml", "vars: {s: \"${'x' * 10**9}\"}\n" + BASE)
    with pytest.raises(SpecError, match="more than a spec may hold"):
        load_spec(boom)
    sneaky = _write(tmp_path, "sn.yaml", "vars: {s: '${ [].__class__ }'}\n" + BASE)
    with pytest.raises(SpecError, match="cannot evaluate"):
        load_spec(sneaky)


def test_cli_set_on_validate_plan_and_grid(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["validate", str(DEMO), "--set", "unlearn.steps=abc"])
    assert res.exit_code == 2 and "--set:1:15: unlearn.steps" in res.output
    res = runner.invoke(cli, ["plan", str(DEMO), "--set", "vars.digit=3", "--store", str(tmp_path)])
    assert res.exit_code == 0, res.output
    tpl = ROOT / "templates" / "ablation_digits.yaml.j2"
    out = tmp_path / "cells"
    res = runner.invoke(cli, ["grid", str(tpl), "--render", str(out), "--set", "vars.digit=5"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["grid", str(tpl), "--render", str(out), "--set", "seed=x"])
    assert res.exit_code == 2 and "seed" in res.output and "Traceback" not in res.output


def test_bench_help_exits_0() -> None:
    res = CliRunner().invoke(cli, ["bench", "--help"])
    assert res.exit_code == 0 and "hypergrad" in res.output


def test_grid_cells_carry_their_set_items_to_the_run_params() -> None:
    from resalign.engine.grid import _cell_spec, prepare
    from resalign.engine.tracking import curated_params

    tpl = ROOT / "templates" / "ablation_digits.yaml.j2"
    _, prepared = prepare(tpl, sets=["vars.digit=4", "unlearn.steps=3"])
    for rc, _ in prepared:
        spec = _cell_spec(rc)
        assert spec.spec.tracking.run_name == rc.cell.id
        assert spec.spec.datasets["harmful"].digits == [4]
        params = curated_params(spec)
        assert params["set.vars.digit"] == "4" and params["set.unlearn.steps"] == "3"


def test_a_child_that_sets_a_base_var_keeps_the_base_order(tmp_path: Path) -> None:
    """vars are read in order and the demo's ``others`` uses ``digit``: a spec extending the
    demo with ``vars: {digit: 3}`` must keep ``digit`` first (it failed with "'digit' is
    undefined" while merged keys moved after the base's). Merged mappings keep the base's key
    order; keys new in the child follow."""
    child = _write(tmp_path, "d3.yaml", f"extends: {DEMO}\nname: d3\nvars: {{digit: 3}}\n"
                   "threats: {zz: {data: benign, steps: 2}, poison5_adam_3e-4: {lr: 1.0e-4}}\n")  # fmt: skip
    r = load_spec(child)
    assert r.spec.concepts["digit"].label == 3
    assert r.spec.datasets["harmful"].digits == [3]
    assert 3 not in r.spec.datasets["retain"].digits and 0 in r.spec.datasets["retain"].digits
    base = load_spec(DEMO)
    assert list(r.spec.threats) == [*base.spec.threats, "zz"]
