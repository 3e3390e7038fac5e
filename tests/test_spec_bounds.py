"""Bounded YAML (issue 15): alias expansion, nesting depth and size limits, each a clear
``file:line:col`` error with exit 2 in well under a second; the same for grid templates."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from resalign.cli import cli
from resalign.errors import UserError
from resalign.spec import SpecError, load_spec
from resalign.spec.source import MAX_DEPTH, MAX_SPEC_BYTES, MAX_VALUES
from resalign.spec.templates import load_template, render_grid

ROOT = Path(__file__).resolve().parents[1]

# The issue's 9-line "billion laughs": 9**9 = 387,420,489 strings once expanded.
LAUGHS = '\na: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{n}: &{n} [{','.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi")
)


def _timed_load(path: Path) -> tuple[SpecError, float]:
    t = time.perf_counter()
    with pytest.raises(SpecError) as e:
        load_spec(path)
    return e.value, time.perf_counter() - t


def test_billion_laughs_is_refused_fast_at_the_alias(tmp_path: Path) -> None:
    p = tmp_path / "laughs.yaml"
    p.write_text("name: x" + LAUGHS)
    err, seconds = _timed_load(p)
    # 9**5 * 9 values is the first block over the limit: anchor f on line 7
    (issue,) = err.issues
    assert issue.where == f"{p}:7:4" and f"more than the {MAX_VALUES:,}" in issue.message
    assert seconds < 0.5, seconds  # measured 0.01 s on an idle core


def test_recursive_alias_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "rec.yaml"
    p.write_text("name: x\nmodel: &m\n  tiny: *m\n")
    err, _ = _timed_load(p)
    assert "recursive alias" in err.issues[0].message and err.issues[0].line == 2


@pytest.mark.parametrize("closed", [True, False], ids=["balanced", "unclosed"])
def test_deep_nesting_is_refused_at_the_limit(tmp_path: Path, closed: bool) -> None:
    p = tmp_path / "deep.yaml"
    p.write_text("name: x\nmodel: " + "[" * 5000 + ("]" * 5000 if closed else "") + "\n")
    err, seconds = _timed_load(p)
    (issue,) = err.issues
    # on the line of the brackets, past the limit (libyaml's scanner, reading ahead of the
    # composer, may meet its own 1,000-level bound first; the message is the same)
    assert issue.file == str(p) and issue.line == 2 and issue.col > 8 + MAX_DEPTH - 2
    assert f"deeper than {MAX_DEPTH} levels" in issue.message
    assert seconds < 0.5, seconds
    assert len(err.render().splitlines()[1]) < 130  # the excerpt is a window, not 5,000 chars


def test_deep_block_nesting_and_deep_aliases(tmp_path: Path) -> None:
    p = tmp_path / "block.yaml"
    p.write_text("name: x\n" + "".join(" " * i + f"k{i}:\n" for i in range(200)))
    err, _ = _timed_load(p)
    assert "deeper than" in err.issues[0].message and err.issues[0].line == MAX_DEPTH + 1
    # 40 levels, aliased into itself twice: each copy is shallow, the expansion is not
    inner = "[" * 40 + "1" + "]" * 40
    q = tmp_path / "alias_depth.yaml"
    q.write_text(f"a: &a {inner}\nb: &b [{'[' * 30}*a{']' * 30}]\n")
    err, _ = _timed_load(q)
    assert "with its aliases expanded the spec nests deeper" in err.issues[0].message


def test_document_size_is_bounded_before_reading_it_whole(tmp_path: Path) -> None:
    p = tmp_path / "big.yaml"
    line = "#" + "x" * 98 + "\n"  # 100 bytes a line
    p.write_text("name: x\n" + line * (MAX_SPEC_BYTES // 100 + 10))
    err, seconds = _timed_load(p)
    (issue,) = err.issues
    assert issue.file == str(p) and issue.line == MAX_SPEC_BYTES // 100 + 1
    assert "bytes a spec may have" in issue.message and seconds < 0.5


def test_a_huge_integer_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    p = tmp_path / "int.yaml"
    p.write_text("name: x\nseed: " + "9" * 5000 + "\n")
    err, _ = _timed_load(p)
    assert err.issues[0].where == f"{p}:2:7" and "cannot read this value" in err.issues[0].message


def test_cli_exit_2_in_under_a_second_without_traceback(tmp_path: Path) -> None:
    laughs = tmp_path / "laughs.yaml"
    laughs.write_text("name: x" + LAUGHS)
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: x\nmodel: " + "[" * 5000 + "]" * 5000 + "\n")
    for p in (laughs, deep):
        res = CliRunner().invoke(cli, ["validate", str(p)])
        assert res.exit_code == 2 and "Traceback" not in res.output
        assert f"{p}:" in res.output
    # the whole command, interpreter start included (the issue: 3.3 GB and no answer in 30 s)
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "resalign", "validate", str(laughs)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert time.perf_counter() - t < 5  # 0.5 s on an idle core, mostly interpreter start


TEMPLATE = """---
matrix: {x: [a, b]}
vars: {n: 1}
---
name: t-{{ cell.slug }}
"""


def test_template_front_matter_is_bounded(tmp_path: Path) -> None:
    p = tmp_path / "t.yaml.j2"
    p.write_text(TEMPLATE.replace("vars: {n: 1}", "vars:\n  big:" + LAUGHS.replace("\n", "\n   ")))
    with pytest.raises(UserError, match="more than the"):
        load_template(p)
    p.write_text(TEMPLATE.replace("{n: 1}", "[" * 3000 + "]" * 3000))
    with pytest.raises(UserError, match="deeper than"):
        load_template(p)


def test_rendered_cells_are_bounded(tmp_path: Path) -> None:
    p = tmp_path / "t.yaml.j2"
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}# filler line\n"
    p.write_text(TEMPLATE + loop + "{% endfor %}{% endfor %}")
    t = time.perf_counter()
    with pytest.raises(UserError, match="renders to more than"):
        render_grid(p, validate=None)
    assert time.perf_counter() - t < 5
    p.write_text(TEMPLATE + "description: {{ 'x' * 10**9 }}\n")
    with pytest.raises(UserError, match="more than a spec may hold"):
        render_grid(p, validate=None)
    # a cell's rendered YAML passes through the same loader bounds
    p.write_text(TEMPLATE + "model: " + "[" * 200 + "]" * 200 + "\n")
    with pytest.raises(UserError, match="deeper than"):
        render_grid(p)


TINY = Path(__file__).resolve().parent / "specs" / "tiny.yaml"


@pytest.mark.parametrize(
    "where,literal",
    [("threats.benign.lr", ".inf"), ("unlearn.optimizer.lr", ".inf"),
     ("unlearn.resilience.beta", "-.inf"), ("threats.benign.lr", ".nan")],
)  # fmt: skip
def test_non_finite_numbers_are_refused_where_a_bound_is(where: str, literal: str) -> None:
    """``lr: .inf`` passed ``gt=0`` and failed only in the run (issue 24)."""
    res = CliRunner().invoke(cli, ["validate", str(TINY), "--set", f"{where}={literal}"])
    assert res.exit_code == 2, res.output
    assert f"{where}: input should be a finite number" in res.output
    assert "Traceback" not in res.output


def test_step_and_trial_counts_above_the_sanity_bound_warn_and_strict_refuses() -> None:
    big = ["--set", "unlearn.steps=1000000000000"]
    for cmd in (["validate", str(TINY)], ["plan", str(TINY), "--store", "/nonexistent"]):
        res = CliRunner().invoke(cli, cmd + big)
        assert res.exit_code == 0, res.output
        assert re.search(
            r"warning: .*unlearn\.steps = 1,000,000,000,000 is above the sanity bound of "
            r"1,000,000 steps; the run has an estimated 13 node\(s\)",
            res.output,
        ), res.output
        res = CliRunner().invoke(cli, [*cmd, "--strict", *big])
        assert res.exit_code == 2, res.output
        assert "unlearn.steps = 1,000,000,000,000 is above the sanity bound" in res.output
    res = CliRunner().invoke(cli, ["validate", str(TINY), "--strict"])
    assert res.exit_code == 0 and "warning" not in res.output, res.output
    # trials: the estimate counts what the searches add (2 rows x 50,000 trials x an attack
    # and an evaluation for its one attack seed, plus the graph's 5 nodes)
    search = TINY.with_name("tiny_search.yaml")
    args = ["validate", str(search), "--set", "threats.poison.search.trials=50000"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert (
        "threats.poison.search.trials = 50,000 is above the sanity bound of 10,000 trials; "
        "the run has an estimated 200,005 node(s)" in res.output
    )
    assert CliRunner().invoke(cli, [*args, "--strict"]).exit_code == 2
