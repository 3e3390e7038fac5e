"""Node keys: stable under formatting, unrelated sections and moves; changed by what is used."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from resalign.graph.compile import compile_spec
from resalign.graph.keys import fingerprint, key_view, node_key, step_version
from resalign.spec import load_spec, load_spec_text
from resalign.steps.base import STEPS, Step

SPEC = """\
name: keys
seed: 0
model:
  family: tiny
  device: cpu
  tiny: {pretrain: {dataset: all, steps: 50}}
datasets:
  all: {type: digits}
  harm: {type: digits, digits: [3]}
  keep: {type: digits, digits: [0, 1]}
  bench: {type: imagefolder, path: data/bench}
  p: {type: prompts, path: data/p.txt}
concepts:
  three: {harmful: [harm], retain: [keep]}
unlearn:
  steps: 20
  optimizer: {lr: 1e-3}
threats:
  ft: {data: bench, steps: 10, lr: 1e-4, eval_at: [5, 10]}
evaluate:
  generation: {steps: 4}
  metrics:
    - {kind: nudenet_ip, prompts: p}
tracking:
  uri: file:///somewhere
"""

# The same spec with keys reordered, comments, other formatting and an unrelated section changed.
SPEC_REORDERED = """\
# a comment
tracking: {uri: http://127.0.0.1:5000, experiment: other}   # volatile
evaluate:
  metrics:
    - prompts: p
      kind: nudenet_ip
  generation:
    steps: 4
threats:
  ft:
    eval_at: [5, 10]
    lr: 0.0001
    steps: 10
    data: bench
concepts:
  three: {retain: [keep], harmful: [harm]}
unlearn:
  optimizer: {lr: 0.001}
  steps: 20
datasets:
  p: {path: data/p.txt, type: prompts}
  bench: {path: data/bench, type: imagefolder}
  keep: {digits: [0, 1], type: digits}
  harm: {type: digits, digits: [3]}
  all: {type: digits}
model:
  device: auto
  tiny: {pretrain: {steps: 50, dataset: all}}
  family: tiny
seed: 0
name: keys
description: "an unrelated description"
"""


def _data(root: Path) -> None:
    (root / "data" / "bench").mkdir(parents=True)
    (root / "data" / "bench" / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n')
    (root / "data" / "bench" / "a.png").write_bytes(b"\x89PNG fake")
    (root / "data" / "p.txt").write_text("a prompt\nanother\n")


def keys_of(text: str, root: Path) -> dict[str, str]:
    graph = compile_spec(load_spec_text(text, filename="s.yaml", base_dir=root))
    return {n.name: n.key for n in graph}


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    _data(tmp_path)
    return tmp_path


@pytest.fixture()
def base(root: Path) -> dict[str, str]:
    return keys_of(SPEC, root)


def test_keys_unchanged_by_order_comments_and_unrelated(root: Path, base: dict[str, str]) -> None:
    assert keys_of(SPEC_REORDERED, root) == base
    assert len(set(base.values())) == len(base)  # no two nodes share a key in one spec


def test_keys_unchanged_when_project_moves(root: Path, base: dict[str, str], tmp_path_factory):
    moved = tmp_path_factory.mktemp("elsewhere") / "proj"
    shutil.copytree(root, moved)
    (moved / "spec.yaml").write_text(SPEC)
    graph = compile_spec(load_spec(moved / "spec.yaml"))
    assert {n.name: n.key for n in graph} == base
    assert (
        str(moved) in graph["attack/original/ft/seed42/step5"].params["datasets"]["bench"]["path"]
    )


def _changed(base: dict[str, str], new: dict[str, str]) -> set[str]:
    assert set(base) == set(new)
    return {n for n in base if base[n] != new[n]}


ALL_ROWS = {"original", "resalign"}
# node-name prefix of each row: rows that unlearn carry their unlearning seed
PREFIX = {"original": "original", "resalign": "resalign/seed0"}


def _evals(rows: set[str], pre: bool = True, post: bool = True) -> set[str]:
    out = set()
    for r in rows:
        if pre:
            out.add(f"evaluate/{PREFIX[r]}/pre/step0")
        if post:
            out |= {f"evaluate/{PREFIX[r]}/ft/seed42/step{s}" for s in (5, 10)}
    return out


def _attacks(rows: set[str]) -> set[str]:
    return {f"attack/{PREFIX[r]}/ft/seed42/step{s}" for r in rows for s in (5, 10)}


UNLEARN_DOWN = (
    {"unlearn/resalign/seed0"} | _attacks({"resalign"}) | _evals({"resalign"}) | {"report"}
)


@pytest.mark.parametrize(
    "old,new,expected",
    [
        ("  steps: 20\n", "  steps: 21\n", UNLEARN_DOWN),
        ("optimizer: {lr: 1e-3}", "optimizer: {lr: 2e-3}", UNLEARN_DOWN),
        (
            "lr: 1e-4, eval_at",
            "lr: 2e-4, eval_at",
            _attacks(ALL_ROWS) | _evals(ALL_ROWS, pre=False) | {"report"},
        ),
        (
            "generation: {steps: 4}",
            "generation: {steps: 5}",
            _evals(ALL_ROWS) | {"report"},
        ),
        (
            "keep: {type: digits, digits: [0, 1]}",
            "keep: {type: digits, digits: [0, 2]}",
            UNLEARN_DOWN,
        ),
        ("pretrain: {dataset: all, steps: 50}", "pretrain: {dataset: all, steps: 60}", "all"),
        ("family: tiny\n  device: cpu", "family: tiny\n  device: cpu\n  dtype: float16", "all"),
    ],
    ids=[
        "unlearn-steps",
        "outer-lr",
        "threat-lr",
        "generation",
        "retain-data",
        "pretrain",
        "dtype",
    ],
)
def test_keys_change_exactly_downstream_of_a_used_param(root, base, old, new, expected) -> None:
    assert old in SPEC
    changed = _changed(base, keys_of(SPEC.replace(old, new), root))
    assert changed == (set(base) if expected == "all" else expected)


def test_an_eval_step_adds_one_segment_and_one_evaluation(root: Path, base: dict[str, str]) -> None:
    new = keys_of(SPEC.replace("eval_at: [5, 10]", "eval_at: [5, 8, 10]"), root)
    assert {n for n in new if n not in base} == {
        "attack/original/ft/seed42/step8",
        "evaluate/original/ft/seed42/step8",
        "attack/resalign/seed0/ft/seed42/step8",
        "evaluate/resalign/seed0/ft/seed42/step8",
    }
    # the segment to step 10 now continues from step 8, and keeps its key (issue 14)
    assert {n for n in base if new[n] != base[n]} == {"report"}
    removed = keys_of(SPEC.replace("eval_at: [5, 10]", "eval_at: [10]"), root)
    assert {n for n in removed if removed[n] != base.get(n)} == {"report"}


def test_data_content_changes_keys_of_readers(root: Path, base: dict[str, str]) -> None:
    (root / "data" / "p.txt").write_text("a different prompt\n")
    changed = _changed(base, keys_of(SPEC, root))
    assert changed == _evals(ALL_ROWS) | {"report"}
    (root / "data" / "bench" / "b.png").write_bytes(b"more")
    changed = _changed(base, keys_of(SPEC, root))
    assert changed == _evals(ALL_ROWS) | _attacks(ALL_ROWS) | {"report"}


def test_step_version_enters_the_key(root: Path, base: dict[str, str], monkeypatch) -> None:
    class AttackV9(Step):
        kind = "attack"
        version = "9"

    monkeypatch.setitem(STEPS, "attack", AttackV9)
    changed = _changed(base, keys_of(SPEC, root))
    assert changed == _attacks(ALL_ROWS) | _evals(ALL_ROWS, pre=False) | {"report"}


def test_shared_prefix_shares_nodes(root: Path, base: dict[str, str]) -> None:
    other = SPEC.replace("name: keys", "name: other").replace(
        "  ft: {", "  ft2: {data: bench, steps: 3}\n  ft: {"
    )
    new = keys_of(other, root)
    for name in ("model", "unlearn/resalign/seed0", "attack/resalign/seed0/ft/seed42/step10"):
        assert new[name] == base[name]


def test_spec_seed_is_the_default_unlearning_seed(root, base) -> None:
    new = keys_of(SPEC.replace("seed: 0\nmodel", "seed: 1\nmodel"), root)
    renamed = {n.replace("resalign/seed0", "resalign/seed1") for n in UNLEARN_DOWN}
    assert set(new) == (set(base) - UNLEARN_DOWN) | renamed
    for n in UNLEARN_DOWN - {"report"}:
        assert new[n.replace("resalign/seed0", "resalign/seed1")] != base[n]
    assert all(new[n] == base[n] for n in set(base) - UNLEARN_DOWN)


def test_adding_an_unlearning_seed_adds_nodes_and_changes_no_key(root, base) -> None:
    new = keys_of(SPEC.replace("  steps: 20\n", "  steps: 20\n  seeds: [0, 7]\n"), root)
    added = {n for n in new if n not in base}
    assert added == {
        "unlearn/resalign/seed7",
        "evaluate/resalign/seed7/pre/step0",
        "attack/resalign/seed7/ft/seed42/step5",
        "attack/resalign/seed7/ft/seed42/step10",
        "evaluate/resalign/seed7/ft/seed42/step5",
        "evaluate/resalign/seed7/ft/seed42/step10",
    }
    assert {n for n in base if n not in new} == set()
    # every unlearn, attack and evaluate node of seed 0 keeps its key; the report gains inputs
    assert {n for n in base if new[n] != base[n]} == {"report"}
    assert len(set(new.values())) == len(new)


def test_adding_an_attack_seed_adds_nodes_and_changes_no_key(root, base) -> None:
    new = keys_of(SPEC.replace("eval_at: [5, 10]}", "eval_at: [5, 10], seeds: [42, 9]}"), root)
    added = {n for n in new if n not in base}
    assert added == {
        f"{kind}/{PREFIX[r]}/ft/seed9{tail}"
        for r in ALL_ROWS
        for kind in ("attack", "evaluate")
        for tail in ("/step5", "/step10")
    }
    assert {n for n in base if new[n] != base[n]} == {"report"}


def test_fingerprint_and_key_view(tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    fp = fingerprint(str(f))
    assert fp["size"] == 3 and fp["file"] == "w.bin"
    assert fingerprint("org/name", revision="r1") == {
        "hub": "org/name",
        "revision": "r1",
        "variant": None,
    }
    assert fingerprint(str(tmp_path / "none")) == {"missing": "none"}
    params = {"path": "/x", "fingerprint": fp, "clip_path": "/y", "clip_fingerprint": fp, "a": 1}
    assert key_view(params) == {"fingerprint": fp, "clip_fingerprint": fp, "a": 1}
    assert node_key("k", params, {}) == node_key("k", {**params, "path": "/elsewhere"}, {})
    assert node_key("k", params, {"m": "1"}) != node_key("k", params, {"m": "2"})


# --------------------------------------------------------------------------- keys from reads

WITH_PLAIN = SPEC.replace("threats:\n", "baselines:\n  plain: {method: plain}\nthreats:\n")
PLAIN_DOWN = {
    "unlearn/plain/seed0",
    "evaluate/plain/seed0/pre/step0",
    "attack/plain/seed0/ft/seed42/step5",
    "attack/plain/seed0/ft/seed42/step10",
    "evaluate/plain/seed0/ft/seed42/step5",
    "evaluate/plain/seed0/ft/seed42/step10",
}


@pytest.mark.parametrize(
    "old,new",
    [
        ("  steps: 20\n", "  steps: 20\n  checkpoint_every: 3\n"),
        ("  steps: 20\n", "  steps: 20\n  memory: {free_inner_state: false, offload_idle: true}\n"),
        ("lr: 1e-4, eval_at", "lr: 1e-4, checkpoint_every: 2, eval_at"),
        # documentation: no step reads a concept's description (it re-keyed every unlearn,
        # attack and evaluate node before issue 22), nor the spec's
        ("  three: {harmful", "  three: {description: the digit three, harmful"),
        ("name: keys\n", "name: keys\ndescription: a study of keys\n"),
        # operational: whether a hub id may be downloaded (the step reads it, the result
        # does not depend on it)
        ("  device: cpu\n", "  device: cpu\n  allow_download: true\n"),
    ],
    ids=[
        "unlearn-checkpoint_every",
        "neutral-memory-levers",
        "attack-checkpoint_every",
        "concept-description",
        "spec-description",
        "allow_download",
    ],
)
def test_what_no_step_reads_changes_no_key(root, old, new) -> None:
    base = keys_of(WITH_PLAIN, root)
    assert old in WITH_PLAIN
    assert keys_of(WITH_PLAIN.replace(old, new), root) == base


def test_the_trainable_selection_is_an_unlearn_input_not_a_model_input(root) -> None:
    """``model.trainable`` is read by the unlearn step (its ``trainable`` param), never by the
    model step: a LoRA-unlearning variant re-keys the unlearning rows' nodes and keeps the
    model, the original row and the report's inputs from the original as they were."""
    base = keys_of(WITH_PLAIN, root)
    new = "  device: cpu\n  trainable: {kind: full}\n"
    changed = _changed(base, keys_of(WITH_PLAIN.replace("  device: cpu\n", new), root))
    assert "model" not in changed
    assert changed == UNLEARN_DOWN | PLAIN_DOWN  # both rows unlearn with the selection
    assert not {n for n in changed if "/original/" in n or n.startswith("evaluate/original")}


def test_the_concept_caption_enters_the_evaluations_keys(root) -> None:
    """Concept metrics build their prompts from the concept datasets' caption (steps/evaluate
    metric_context), so those specs are evaluate inputs: before issue 22 the step read them
    from the live spec and a new caption left every evaluation cached with the old prompts."""
    labelled = WITH_PLAIN.replace("retain: [keep]}", "retain: [keep], label: 3}")
    base = keys_of(labelled, root)
    new = "  harm: {type: digits, digits: [3], caption: 'a drawing of {name}'}\n"
    changed = _changed(base, keys_of(labelled.replace("  harm: {type: digits, digits: [3]}\n", new), root))  # fmt: skip
    evaluations = {n for n in base if n.startswith("evaluate/")}
    assert evaluations <= changed


def test_a_label_renames_nodes_and_keeps_their_keys(root) -> None:
    base = keys_of(WITH_PLAIN, root)
    new = keys_of(WITH_PLAIN.replace("  steps: 20\n", "  steps: 20\n  label: mine\n"), root)
    renamed = {n.replace("/resalign/", "/mine/"): k for n, k in base.items()}
    # the report reads the row names, so it alone is new
    assert {n: k for n, k in new.items() if n != "report"} == {
        n: k for n, k in renamed.items() if n != "report"
    }
    assert new["report"] != base["report"]


def test_resilience_enters_only_the_keys_of_methods_that_read_it(root) -> None:
    base = keys_of(WITH_PLAIN, root)
    changed = _changed(base, keys_of(WITH_PLAIN.replace("  steps: 20\n", "  steps: 20\n  resilience: {beta: 0.5}\n"), root))  # fmt: skip
    assert changed == UNLEARN_DOWN  # resalign's branch and the report; plain's keys stay
    assert not changed & PLAIN_DOWN
    # a lever that is not neutral (autocast) re-runs both rows
    changed = _changed(base, keys_of(WITH_PLAIN.replace("  steps: 20\n", "  steps: 20\n  memory: {autocast: bf16}\n"), root))  # fmt: skip
    assert changed == UNLEARN_DOWN | PLAIN_DOWN


def test_key_params_is_the_declared_projection(root) -> None:
    from resalign.graph.keys import key_params

    g = compile_spec(load_spec_text(WITH_PLAIN, filename="s.yaml", base_dir=root))
    plain = g["unlearn/plain/seed0"].params
    kp = key_params("unlearn", plain)
    assert "resilience" not in kp["unlearn"] and "meta_datasets" not in kp
    assert "label" not in kp["unlearn"] and "checkpoint_every" not in kp["unlearn"]
    assert set(kp["unlearn"]["memory"]) == {"autocast", "gradient_checkpointing", "frozen_dtype"}
    assert plain["unlearn"]["resilience"]  # the step still gets every parameter
    res = key_params("unlearn", g["unlearn/resalign/seed0"].params)
    assert "resilience" in res["unlearn"] and set(res["meta_datasets"]) == {"keep"}
    assert (
        "checkpoint_every"
        not in key_params("attack", g["attack/plain/seed0/ft/seed42/step5"].params)["threat"]
    )


def test_plan_names_the_changed_parameter(root) -> None:
    from click.testing import CliRunner

    from resalign.cli import cli
    from resalign.engine.store import Store

    g = compile_spec(load_spec_text(WITH_PLAIN, filename="s.yaml", base_dir=root))
    store = root / "runs"
    entries = {
        n.name: {"key": n.key, "kind": n.kind, "params": n.params, "version": step_version(n.kind)}
        for n in g
    }
    Store(store).update_index(g.spec_name, entries)
    (root / "s.yaml").write_text(
        WITH_PLAIN.replace("  steps: 20\n", "  steps: 20\n  resilience: {beta: 0.5}\n")
    )
    res = CliRunner().invoke(cli, ["plan", str(root / "s.yaml"), "--store", str(store)])
    assert res.exit_code == 0, res.output

    def line(name: str) -> str:
        return next(ln for ln in res.output.splitlines() if f" {name}  " in ln)

    assert "[to run (parameter changed: unlearn.resilience.beta 0.8 → 0.5)]" in line(
        "unlearn/resalign/seed0"
    )
    assert "(upstream changed)" in line("attack/resalign/seed0/ft/seed42/step5")
    assert "(new)" in line("unlearn/plain/seed0")  # same key as recorded: never ran


def test_param_changes_lists_paths_old_and_new() -> None:
    from resalign.graph.plan import describe_changes, param_changes

    old = {"threat": {"lr": 1e-4, "eval_at": [5, 10], "checkpoint_every": 5}, "seed": 1}
    new = {"threat": {"lr": 2e-4, "eval_at": [5, 8], "checkpoint_every": 9}, "seed": 1}
    changes = param_changes("attack", old, new)
    assert changes == [("threat.eval_at[1]", 10, 8), ("threat.lr", 1e-4, 2e-4)]
    assert describe_changes(changes) == "threat.eval_at[1] 10 → 8; threat.lr 0.0001 → 0.0002"
    assert describe_changes(changes, limit=1) == "threat.eval_at[1] 10 → 8; and 1 more"
