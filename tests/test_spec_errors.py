"""Malformed specs through the real CLI: each names the file, the line, the problem; exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from resalign.cli import cli

# A small valid spec; line numbers below refer to it (appended lines start at 11).
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


def replace_line(n: int, text: str) -> str:
    lines = BASE.splitlines()
    lines[n - 1] = text
    return "\n".join(lines) + "\n"


def drop_line(n: int) -> str:
    lines = BASE.splitlines()
    del lines[n - 1]
    return "\n".join(lines) + "\n"


# (id, spec text, substrings the first line must contain, line number)
CASES = [
    ("top-typo", BASE + "seeed: 1\n", ["unknown key 'seeed'", "did you mean 'seed'"], 11),
    (
        "nested-typo",
        BASE + "unlearn:\n  stepz: 10\n",
        ["unknown key 'stepz' in unlearn", "did you mean 'steps'"],
        12,
    ),
    (
        "enum-typo",
        BASE + "unlearn:\n  method: resalgn\n",
        ["unlearn.method: 'resalgn'", "did you mean 'resalign'"],
        12,
    ),
    ("int-type", BASE + "unlearn:\n  steps: many\n", ["unlearn.steps", "integer"], 12),
    ("float-type", BASE + "unlearn:\n  optimizer: {lr: fast}\n", ["optimizer.lr", "number"], 12),
    (
        "negative-lr",
        BASE + "unlearn:\n  optimizer: {lr: -1e-4}\n",
        ["unlearn.optimizer.lr", "greater than 0"],
        12,
    ),
    (
        "gamma-zero",
        BASE + "unlearn:\n  resilience:\n    hypergradient: {gamma: 0}\n",
        ["hypergradient.gamma", "greater than 0"],
        13,
    ),
    (
        "damping-above-1",
        BASE + "unlearn:\n  resilience:\n    hypergradient: {damping: 2}\n",
        ["hypergradient.damping", "less than or equal to 1"],
        13,
    ),
    (
        "poison-ratio",
        replace_line(10, "  ft: {data: keep, steps: 10, poison: {data: harm, ratio: 1.5}}"),
        ["threats.ft.poison.ratio", "less than or equal to 1"],
        10,
    ),
    ("duplicate-top", BASE + "seed: 1\nseed: 2\n", ["duplicate key 'seed'", "line 11"], 12),
    (
        "duplicate-nested",
        BASE + "evaluate:\n  generation: {steps: 5, steps: 6}\n",
        ["duplicate key 'steps' in evaluate.generation"],
        12,
    ),
    ("yaml-syntax", BASE + "unlearn:\n  steps: 5\n bad: 3\n", ["YAML syntax error"], 13),
    ("yaml-unclosed", BASE + "seed: [1, 2\n", ["YAML syntax error"], 12),
    ("empty-file", "", ["the spec is empty"], 1),
    ("comments-only", "# nothing\n", ["the spec is empty"], 1),
    ("list-top", "- name: t\n- model: x\n", ["top level must be a mapping", "got a list"], 1),
    (
        "list-for-mapping",
        BASE + "unlearn: [resalign]\n",
        ["unlearn: expected a mapping", "got a list"],
        11,
    ),
    (
        "unknown-threat-data",
        replace_line(10, "  ft: {data: kep, steps: 10}"),
        ["threats.ft.data: unknown dataset 'kep'", "did you mean 'keep'"],
        10,
    ),
    (
        "unknown-harmful",
        replace_line(8, "  three: {harmful: [harmm], retain: [keep]}"),
        ["concepts.three.harmful[0]: unknown dataset 'harmm'", "did you mean 'harm'"],
        8,
    ),
    (
        "threat-data-prompts",
        replace_line(10, "  ft: {data: p, steps: 10}"),
        ["dataset 'p' is of type 'prompts'", "image–caption pairs"],
        10,
    ),
    (
        "metric-prompts-wrong-type",
        BASE + "evaluate:\n  metrics:\n    - {kind: nudenet_ip, prompts: keep}\n",
        ["evaluate.metrics[0].prompts", "needs a prompt list"],
        13,
    ),
    (
        "metric-kind-typo",
        BASE + "evaluate:\n  metrics:\n    - {kind: nudnet_ip, prompts: p}\n",
        ["unknown kind 'nudnet_ip'", "did you mean 'nudenet_ip'"],
        13,
    ),
    (
        "dataset-type-typo",
        replace_line(6, "  p: {type: prompt, path: p.txt}"),
        ["datasets.p.type: unknown type 'prompt'", "did you mean 'prompts'"],
        6,
    ),
    (
        "dataset-type-missing",
        replace_line(6, "  p: {path: p.txt}"),
        ["missing key 'type' in datasets.p"],
        6,
    ),
    (
        "missing-harmful",
        replace_line(8, "  three: {retain: [keep]}"),
        ["missing required key 'harmful' in concepts.three"],
        8,
    ),
    ("missing-name", drop_line(1), ["missing required key 'name'"], 1),
    (
        "eval-after-last-step",
        replace_line(10, "  ft: {data: keep, steps: 10, eval_at: [5, 20]}"),
        ["after the last step (10)"],
        10,
    ),
    (
        "meta-too-few-configs",
        BASE
        + "unlearn:\n  resilience:\n    meta:\n      samples_per_step: 5\n"
        + "      configs:\n        a: {lr: 1e-4}\n",
        ["samples 5 configurations", "only 1 exist"],
        14,
    ),
    (
        "meta-empty-axis",
        BASE + "unlearn:\n  resilience:\n    meta:\n      distribution: {lr: []}\n",
        ["meta.distribution.lr: empty axis"],
        14,
    ),
    (
        "meta-no-data",
        replace_line(8, "  three: {harmful: [harm]}"),
        ["simulated fine-tuning has no data"],
        7,
    ),
    (
        "baseline-enum-typo",
        BASE + "baselines:\n  esd_row: {method: esdd}\n",
        ["baselines.esd_row.method: 'esdd'", "did you mean 'esd'"],
        12,
    ),
    (
        "baseline-reserved-name",
        BASE + "baselines:\n  original: {method: plain}\n",
        ["row name 'original' is already used"],
        12,
    ),
    (
        "dataset-cycle",
        replace_line(6, "  p: {type: mix, base: p, poison: harm, ratio: 0.5}"),
        ["datasets form a cycle: p → p"],
        6,
    ),
    ("unsafe-tag", BASE + "seed: !!python/object/apply:os.system [ls]\n", ["cannot read"], 11),
    (
        "sd-without-pretrained",
        replace_line(2, "model: {family: sd}"),
        ["needs 'pretrained'"],
        2,
    ),
    (
        "bad-shard",
        replace_line(4, "  harm: {type: digits, digits: [3], shard: [3, 2]}"),
        ["shard [index, count] needs 0 <= index < count"],
        4,
    ),
    ("version", BASE + "version: 2\n", ["version: 2 is not one of the allowed values"], 11),
    (
        "trainable-kind-typo",
        replace_line(2, "model: {family: tiny, trainable: {kind: loras}}"),
        ["model.trainable.kind: 'loras'", "did you mean 'lora'"],
        2,
    ),
]


def test_enough_distinct_cases() -> None:
    assert len({c[0] for c in CASES}) == len(CASES) >= 25
    assert len({c[1] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case_id,text,needles,line", CASES, ids=[c[0] for c in CASES])
def test_malformed_spec(tmp_path: Path, case_id: str, text: str, needles: list[str], line: int):
    spec = tmp_path / "bad.yaml"
    spec.write_text(text, encoding="utf-8")
    result = CliRunner().invoke(cli, ["validate", str(spec)])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    first = [ln for ln in result.output.splitlines() if ln.startswith(str(spec))]
    matching = [ln for ln in first if all(n in ln for n in needles)]
    assert matching, f"no problem line with {needles} in:\n{result.output}"
    assert matching[0].startswith(f"{spec}:{line}:"), matching[0]


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    text = (
        replace_line(10, "  ft: {data: kep, steps: 10}") + "seeed: 1\nunlearn:\n  method: resalgn\n"
    )
    spec = tmp_path / "multi.yaml"
    spec.write_text(text)
    result = CliRunner().invoke(cli, ["validate", str(spec)])
    assert result.exit_code == 2
    heads = [ln for ln in result.output.splitlines() if ln.startswith(str(spec))]
    assert [h.split(":")[1] for h in heads] == ["10", "11", "13"], result.output
    assert "3 problems in" in result.output


def test_excerpt_and_allowed_values_are_shown(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(BASE + "unlearn:\n  method: resalgn\n")
    out = CliRunner().invoke(cli, ["validate", str(spec)]).output
    assert "   12 |   method: resalgn" in out
    assert "allowed: resalign, plain, esd, gradient_ascent, none" in out


def test_missing_spec_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "does not exist" in result.output


def _run_module(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "resalign", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.mark.parametrize("case_id", ["top-typo", "duplicate-top", "yaml-syntax", "list-top"])
def test_malformed_spec_subprocess(tmp_path: Path, case_id: str) -> None:
    _, text, needles, line = next(c for c in CASES if c[0] == case_id)
    (tmp_path / "bad.yaml").write_text(text)
    proc = _run_module(["validate", "bad.yaml"], tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    head = proc.stderr.splitlines()[0]
    assert head.startswith(f"bad.yaml:{line}:"), proc.stderr
    assert all(n in head for n in needles), head


def test_misspelt_key_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(BASE + "unlearn:\n  stpes: 3\n")
    proc = _run_module(["validate", "bad.yaml"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == (
        "bad.yaml:12:3: unknown key 'stpes' in unlearn; did you mean 'steps'?"
    )
