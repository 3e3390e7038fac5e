"""Non-finite means failed: a real step whose loss, gradient or weights turn NaN/inf stops at
that step with a clear error (which term, which step, the last finite checkpoint, the setting
to change), exit 2, no DONE; an evaluation refuses a model with non-finite weights. Each step
kind is driven into it through the CLI on tests/specs/tiny.yaml with an overflowing lr (and,
for evaluation, a NaN written into a stored UNet)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from resalign.cli import cli
from resalign.engine.store import Store, atomic_write_json, build_manifest

TINY = Path(__file__).resolve().parent / "specs" / "tiny.yaml"


def spec(tmp_path: Path, edit) -> Path:
    d = yaml.safe_load(TINY.read_text(encoding="utf-8"))
    d["tracking"]["system_metrics"] = False
    edit(d)
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(d), encoding="utf-8")
    return p


def run(path: Path, store: Path, *extra: str):
    return CliRunner().invoke(
        cli, ["run", str(path), "--store", str(store), "--no-tracking", *extra]
    )


def done_kinds(store: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for kind, _key, d in Store(store).node_dirs():
        if (d / "DONE").is_file():
            out[kind] = out.get(kind, 0) + 1
    return out


def test_pretraining_that_overflows_fails_the_model_node(tmp_path):
    def edit(d):
        d["model"]["tiny"]["pretrain"]["lr"] = 1.0e30

    r = run(spec(tmp_path, edit), tmp_path / "runs")
    assert r.exit_code == 2, r.output
    m = re.search(r"FAILED model: pretrain loss is (nan|inf) at step (\d+)", r.output)
    assert m, r.output
    assert int(m.group(2)) >= 2  # step 1 computes a finite loss; its update overflows
    assert "no finite checkpoint was written before it" in r.output
    assert "hint: lower model.tiny.pretrain.lr" in r.output
    assert "Traceback" not in r.output
    assert done_kinds(tmp_path / "runs") == {}
    assert not list((tmp_path / "runs" / "model").glob(".tmp-*"))  # no staging left


@pytest.mark.slow
def test_unlearning_and_attack_that_diverge_fail_and_a_nan_model_is_not_evaluated(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    store = tmp_path / "runs"

    def no_baselines(d):
        d.pop("baselines")

    # unlearning: a checkpoint every step; step 1's update overflows the weights, so the
    # check before step 1's checkpoint or step 2's losses stop it, never later
    def unlearn_diverges(d):
        no_baselines(d)
        d["unlearn"]["optimizer"]["lr"] = 1.0e30

    r = run(spec(tmp_path, unlearn_diverges), store)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    m = re.search(
        r"FAILED unlearn/resalign\S*: (trainable weight '[^']+' is not finite|"
        r"loss\w* is (nan|inf)) at step (\d+): the run diverged",
        r.output,
    )
    assert m, r.output
    step = int(m.group(3))
    assert step <= 2
    if step == 2:
        assert "the last finite checkpoint is step 1 in " in r.output
    assert "hint: lower unlearn.optimizer.lr" in r.output
    assert "unlearn" not in done_kinds(store)

    # attacks: the loss (or the weights checked at a checkpoint) of the first attack to run
    def attack_diverges(d):
        no_baselines(d)
        d["threats"]["benign"]["lr"] = 1.0e30

    r = run(spec(tmp_path, attack_diverges), store)
    assert r.exit_code == 2, r.output
    assert re.search(
        r"FAILED attack/\S+: (loss is (nan|inf)|UNet weight '[^']+' is not finite) at step \d",
        r.output,
    ), r.output
    assert "hint: lower threats.<threat>.lr" in r.output
    kinds = done_kinds(store)
    assert kinds.get("unlearn") == 1 and "attack" not in kinds and "evaluate" not in kinds

    # A stored model with a NaN weight (as saved before these checks existed, its manifest
    # matching) is refused by the evaluation that reads it.
    un = next(d for k, _key, d in Store(store).node_dirs() if k == "unlearn")
    (weights,) = (un / "unet").glob("*.safetensors")
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(weights))
    (un / "DONE").unlink()
    atomic_write_json(un / "DONE", build_manifest(un))
    assert torch.isnan(load_file(str(weights))[name]).any()

    def no_threats(d):
        no_baselines(d)
        d.pop("threats")

    r = run(spec(tmp_path, no_threats), store)
    assert r.exit_code == 2, r.output
    assert re.search(
        r"FAILED evaluate/resalign\S*: the model to evaluate has non-finite weights \('",
        r.output,
    ), r.output
    assert "it is not scored" in r.output
    assert not [d for k, _key, d in Store(store).node_dirs() if k == "evaluate" and "resalign"
                in (d / "node.json").read_text()]  # fmt: skip
    assert "report" not in done_kinds(store)


@pytest.mark.slow
def test_an_attack_stops_at_the_first_non_finite_weight_naming_its_step(tmp_path, monkeypatch):
    """A weight turned inf by the attack's first update (injected with an optimizer hook, as
    an inf learning rate did before specs refused it): the loss only shows it at step 2, the
    run names step 1 (issue 24: it said "loss is nan at step 2")."""
    import torch

    import resalign.algorithms.attack as attack

    real = attack.make_optimizer

    def poisoned(params, config):
        opt = real(params, config)

        def after_step(optimizer, args, kwargs):
            if len(optimizer.state) and not getattr(optimizer, "_poisoned", False):
                optimizer._poisoned = True
                with torch.no_grad():
                    optimizer.param_groups[0]["params"][0].view(-1)[0] = float("inf")

        opt.register_step_post_hook(after_step)
        return opt

    monkeypatch.setattr(attack, "make_optimizer", poisoned)
    r = run(spec(tmp_path, lambda d: d.pop("baselines")), tmp_path / "runs")
    assert r.exit_code == 2, r.output
    assert re.search(
        r"FAILED attack/\S+: UNet weight '[^']+' is not finite at step 1: the run diverged",
        r.output,
    ), r.output
    assert "attack" not in done_kinds(tmp_path / "runs")
