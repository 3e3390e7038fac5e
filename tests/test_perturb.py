"""The neighbourhood probe (``algorithm: perturb``): the schema's rule and its errors, the
perturbation itself against independent float64 norms and a central finite difference of the
loss, the graph's nodes and keys (other threats' keys unchanged), the report against the
radius, and ``resalign run`` + ``resalign report`` on the tiny spec (real tiny diffusers
models, no mocks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from pydantic import ValidationError
from tiny_bundle import Pairs, tiny_bundle

from resalign.algorithms.perturb import (
    PerturbConfig,
    gradient_direction,
    perturb_,
    random_direction,
    run_perturb,
    select_parameters,
)
from resalign.spec.schema.threats import ThreatSpec

TINY_SPEC = Path(__file__).resolve().parent / "specs" / "tiny.yaml"
fast = pytest.mark.fast


def _threat(**kw: Any) -> dict[str, Any]:
    return {"algorithm": "perturb", "perturb": {"radii": [0.01, 0.1]}, **kw}


# ----------------------------------------------------------------------------- schema


@fast
def test_schema_derives_steps_and_eval_at_and_round_trips():
    t = ThreatSpec.model_validate(_threat(seeds=[1, 2]))
    assert (t.steps, t.eval_at) == (2, [1, 2])  # step k is the k-th radius
    assert t.perturb is not None and t.perturb.direction == "random"
    assert (t.perturb.batches, t.perturb.batch_size, t.perturb.targets) == (None, None, None)
    # what the graph and the steps re-validate (a dump with every field) is accepted as is
    assert ThreatSpec.model_validate(t.model_dump(mode="json")) == t
    g = ThreatSpec.model_validate(
        _threat(data="benign", perturb={"radii": [0.1], "direction": "gradient"})
    )
    assert g.perturb is not None and (g.perturb.batches, g.perturb.batch_size) == (1, 16)
    assert ThreatSpec.model_validate(g.model_dump(mode="json")) == g
    # written with the value it would take anyway: accepted
    ThreatSpec.model_validate(_threat(steps=2, eval_at=[1, 2]))


@fast
def test_schema_errors_name_the_field_and_the_rule():
    bad = [
        ({"algorithm": "perturb"}, "needs a perturb block"),
        ({"data": "x", "perturb": {"radii": [0.1]}}, "read by algorithm perturb only"),
        (_threat(lr=1e-3), "lr is not read by algorithm perturb"),
        (_threat(optimizer="sgd", steps=100), "optimizer and steps are not read"),
        (_threat(eval_at=[1]), "eval_at is not read"),
        (_threat(poison={"data": "x", "ratio": 0.1}), "poison is not read"),
        (_threat(stages=[{"data": "a", "steps": 1}, {"data": "b", "steps": 1}]), "stages is"),
        (_threat(embedding={"replaces": "zero"}), "embedding is not read"),
        (_threat(search={"space": {"lr": {"log_uniform": [1e-4, 1e-3]}}, "budget": 2}), "search"),
        (_threat(data="x"), "data is not read by a random perturbation"),
        (_threat(perturb={"radii": [0.1], "direction": "gradient"}), "add data"),
        (_threat(perturb={"radii": [0.1], "batches": 2}), "direction gradient only"),
        (_threat(perturb={"radii": [0.1, 0.05]}), "strictly increasing"),
        (_threat(perturb={"radii": [0.1, 0.1]}), "strictly increasing"),
        (_threat(perturb={"radii": [0.0]}), "greater than 0"),
        (_threat(perturb={"radii": []}), "at least 1"),
        (_threat(perturb={"radii": [0.1], "direction": "sideways"}), "random"),
        (_threat(perturb={"radii": [0.1], "targets": []}), "at least one module"),
        (_threat(seeds=[1, 1]), "duplicates"),
    ]
    for threat, msg in bad:
        with pytest.raises(ValidationError, match=msg):
            ThreatSpec.model_validate(threat)


def _spec(tmp_path: Path, threats: dict, baselines: bool = False) -> Path:
    d = yaml.safe_load(TINY_SPEC.read_text(encoding="utf-8"))
    if not baselines:
        d.pop("baselines")
    d["threats"] = threats
    d["tracking"]["system_metrics"] = False
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False), encoding="utf-8")
    return p


@fast
def test_validate_reports_a_bad_perturb_threat_at_its_line(tmp_path):
    from resalign.cli import cli

    path = _spec(tmp_path, {"probe": _threat(lr=1e-3)})
    res = CliRunner().invoke(cli, ["validate", str(path)])
    assert res.exit_code == 2, res.output
    lines = path.read_text().splitlines()
    start = lines.index("  probe:")
    line = next(i for i, t in enumerate(lines[start:], start + 1) if t.strip() == "lr: 0.001")
    assert f"spec.yaml:{line}:" in res.output, res.output
    assert "lr is not read by algorithm perturb" in res.output
    assert "Traceback" not in res.output


# ----------------------------------------------------------------------------- numerics


def _weights(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().double().clone() for n, p in unet.named_parameters()}


def _config(radius: float, seed: int = 1, **block: Any) -> PerturbConfig:
    return PerturbConfig.from_threat({"perturb": {"direction": "random", **block}}, radius, seed)


def test_random_perturbation_has_the_asked_length_per_tensor_and_overall():
    b = tiny_bundle()
    before = _weights(b.unet)
    res = run_perturb(b, _config(0.05))
    after = _weights(b.unet)
    # independent float64 norms of the saved-before and the moved weights
    norm = sum(float(t.norm()) ** 2 for t in before.values()) ** 0.5
    dist = sum(float((after[n] - before[n]).norm()) ** 2 for n in before) ** 0.5
    assert dist == pytest.approx(0.05 * norm, rel=1e-6)
    assert res.distance == pytest.approx(dist, rel=1e-9)
    assert res.weight_norm == pytest.approx(norm, rel=1e-12)
    for n in before:  # every tensor moves by r relative to itself (zero tensors stay)
        t = float(before[n].norm())
        assert float((after[n] - before[n]).norm()) == pytest.approx(0.05 * t, rel=1e-5, abs=0)
    assert res.unmoved == [n for n in before if float(before[n].norm()) == 0.0]
    assert res.tensors == len(before) and res.scalars == sum(t.numel() for t in before.values())


def test_seeded_reproducible_other_seeds_other_directions_zero_is_identity():
    def delta(seed: int, radius: float) -> dict[str, torch.Tensor]:
        b = tiny_bundle()
        before = _weights(b.unet)
        run_perturb(b, _config(radius, seed))
        return {n: t - before[n] for n, t in _weights(b.unet).items()}

    def flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.flatten() for t in d.values()])

    a, a2, c = flat(delta(1, 0.1)), flat(delta(1, 0.1)), flat(delta(2, 0.1))
    assert torch.equal(a, a2)  # same seed: bitwise the same move
    cos = float(a @ c / (a.norm() * c.norm()))
    assert abs(cos) < 0.1, cos  # another seed: a near-orthogonal direction (268k dims)
    # one seed, two radii: the same ray (the radius only scales the move)
    half = flat(delta(1, 0.05))
    # (up to the float32 rounding of θ + δ: |θ|·2⁻²⁴ per weight, ~1e-6 of the move)
    assert float((half * 2 - a).norm() / a.norm()) < 1e-5
    # radius 0 (not a spec's radius: that is the pre-FT evaluation) changes no bit
    b = tiny_bundle()
    before = {n: p.detach().clone() for n, p in b.unet.named_parameters()}
    zero = PerturbConfig(radius=0.0, direction="random", targets=None, batches=None,
                         batch_size=None, seed=1)  # fmt: skip
    assert run_perturb(b, zero).distance == 0.0
    assert all(torch.equal(before[n], p) for n, p in b.unet.named_parameters())


def test_targets_restrict_the_set_and_a_lora_row_is_merged_first():
    from resalign.models.saving import has_lora, merged_unet_state_dict
    from resalign.models.trainable import apply_trainable

    b = tiny_bundle()
    before = _weights(b.unet)
    run_perturb(b, _config(0.1, targets=["to_q", "to_out.0"]))
    after = _weights(b.unet)
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    hit = {n for n in before if n.rsplit(".", 2)[-2] in ("to_q",) or ".to_out.0." in n}
    assert moved and moved == {n for n in hit if float(before[n].norm()) > 0}
    with pytest.raises(Exception, match="match no module"):
        select_parameters(b.unet, ["nothing_here"])

    # a LoRA row: the probe moves the merged weights, relative to their norm
    b = tiny_bundle()
    apply_trainable(b.unet, {"kind": "lora", "rank": 2, "alpha": None,
                             "targets": ["to_q", "to_v"], "init": "peft_default"})  # fmt: skip
    with torch.no_grad():
        for n, p in b.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    merged = {k: v.detach().double() for k, v in merged_unet_state_dict(b.unet).items()}
    res = run_perturb(b, _config(0.1))
    assert not has_lora(b.unet)
    after = _weights(b.unet)
    assert set(after) == set(merged)
    norm = sum(float(merged[n].norm()) ** 2 for n in after) ** 0.5
    dist = sum(float((after[n] - merged[n]).norm()) ** 2 for n in after) ** 0.5
    assert dist == pytest.approx(0.1 * norm, rel=1e-6) and res.weight_norm == pytest.approx(norm)


WORDS = ["a", "handwritten", "digit", "four", "five"]


def _data() -> Pairs:
    g = torch.Generator().manual_seed(3)
    captions = ["a handwritten digit four", "a handwritten digit five"] * 4
    return Pairs(torch.rand(8, 1, 8, 8, generator=g) * 2 - 1, captions)


def test_gradient_direction_is_minus_the_gradient_by_central_differences():
    """With the same seed the loss sees the same items, noise and timesteps, so L(θ ± εu) is
    one smooth function of ε; its central difference must equal the directional derivative
    ∇L·u that the direction implies, u the per-tensor-normalised move (uᵢ = ‖θᵢ‖dᵢ/‖dᵢ‖,
    dᵢ = −gᵢ, so ∇L·u = −Σ‖θᵢ‖‖gᵢ‖), and the descent direction lowers the loss."""
    data = _data()
    kw = dict(batches=2, batch_size=4, seed=5)
    b = tiny_bundle(words=WORDS)
    named = select_parameters(b.unet, None)
    d, loss0 = gradient_direction(b, named, data, **kw)
    theta = {n: float(p.detach().double().norm()) for n, p in named}
    predicted = -sum(theta[n] * float(d[n].double().norm()) for n in d)

    def loss_at(direction: dict[str, torch.Tensor], eps: float) -> float:
        bb = tiny_bundle(words=WORDS)
        nn = select_parameters(bb.unet, None)
        perturb_(nn, direction, eps)
        return gradient_direction(bb, nn, data, **kw)[1]

    eps = 1e-3
    plus = loss_at(d, eps)
    minus = loss_at({n: -t for n, t in d.items()}, eps)
    central = (plus - minus) / (2 * eps)
    assert central == pytest.approx(predicted, rel=0.02), (central, predicted)
    assert plus < loss0 < minus
    # the step's own path: gradient direction from the threat block, seeded, reproducible
    cfg = PerturbConfig.from_threat(
        {"perturb": {"direction": "gradient", "batches": 2, "batch_size": 4}}, 0.01, 5
    )
    r1, r2 = tiny_bundle(words=WORDS), tiny_bundle(words=WORDS)
    res = run_perturb(r1, cfg, data=data)
    run_perturb(r2, cfg, data=data)
    assert res.loss == pytest.approx(loss0, rel=1e-6)
    assert all(torch.equal(p, q) for p, q in zip(r1.unet.parameters(), r2.unet.parameters()))
    assert res.distance == pytest.approx(0.01 * res.weight_norm, rel=1e-5)


@fast
def test_random_direction_is_drawn_in_parameter_order_from_the_seed():
    named = [("a", torch.zeros(3, 2)), ("b", torch.zeros(4))]
    d = random_direction(named, 7)
    g = torch.Generator().manual_seed(7)
    assert torch.equal(d["a"], torch.randn(3, 2, generator=g))
    assert torch.equal(d["b"], torch.randn(4, generator=g))


# ----------------------------------------------------------------------------- graph


@fast
def test_nodes_one_per_radius_keyed_by_radius_and_other_keys_unchanged(tmp_path):
    from resalign.graph.compile import compile_spec
    from resalign.spec import load_spec

    base = compile_spec(load_spec(TINY_SPEC))
    benign = yaml.safe_load(TINY_SPEC.read_text())["threats"]["benign"]
    probe = {"algorithm": "perturb", "perturb": {"radii": [0.01, 0.1]}, "seeds": [1, 2]}
    g = compile_spec(load_spec(_spec(tmp_path, {"benign": benign, "probe": probe}, True)))
    for n in base:  # the benign threat, the unlearning and everything else: same keys
        if n.name != "report":
            assert g[n.name].key == n.key, n.name
    a1 = g["attack/resalign/seed0/probe/seed2/step1"]
    a2 = g["attack/resalign/seed0/probe/seed2/step2"]
    assert a1.params["radius"] == 0.01 and a2.params["radius"] == 0.1
    assert "resume" not in a2.deps and "stop" not in a2.params
    assert a1.params["threat"] == {
        "algorithm": "perturb",
        "data": None,
        "perturb": {"direction": "random", "targets": None, "batches": None, "batch_size": None},
    }
    assert (
        g["evaluate/original/probe/seed1/step2"].deps["attack"]
        == "attack/original/probe/seed1/step2"
    )
    assert g["report"].params["threats"]["probe"]["radii"] == [0.01, 0.1]
    assert "radii" not in g["report"].params["threats"]["benign"]
    # a radius added at the end: new nodes, the others' keys as they were
    probe["perturb"]["radii"] = [0.01, 0.1, 0.3]
    g3 = compile_spec(load_spec(_spec(tmp_path, {"benign": benign, "probe": probe}, True)))
    for n in g:
        if n.name != "report":
            assert g3[n.name].key == n.key, n.name
    assert g3["attack/original/probe/seed1/step3"].params["radius"] == 0.3
    # another seed is another direction: another key
    assert g["attack/original/probe/seed1/step1"].key != g["attack/original/probe/seed2/step1"].key


# ----------------------------------------------------------------------------- report


def _result(row: str, threat: str | None, seed: int | None, step: int, value: float):
    from resalign.evaluation.report import EvalResult

    metric = {"concept_rate": {"value": value, "role": "safety", "better": "lower", "n": 10}}
    return EvalResult(row, threat, seed, step, metric, Path("."), None)


@fast
def test_report_puts_perturb_columns_and_curves_on_the_radius(tmp_path):
    from resalign.evaluation.report import build_table, markdown_table, notes, write_report

    radii = [0.01, 0.05, 0.2]
    vals = {1: [0.1, 0.3, 0.9], 2: [0.2, 0.5, 0.7]}
    results = [_result("original", None, None, 0, 0.8)]
    results += [_result("original", "probe", s, k, v)
                for s, vs in vals.items() for k, v in enumerate(vs, 1)]  # fmt: skip
    threats = {"probe": {"seeds": [1, 2], "eval_at": [1, 2, 3], "steps": 3, "radii": radii}}
    table = build_table(results, ["original"], threats, all_steps=True)
    titles = markdown_table(table).splitlines()[0]
    assert "after probe (radius 0.01)" in titles and "after probe (radius 0.2)" in titles
    assert "relearning area of concept_rate ↓ over radius, probe (0–0.2)" in titles
    assert "first radius concept_rate" in titles and "step" not in titles
    cells = table["table"][0]["cells"]
    # area over radius, independently: trapezoids from radius 0 (the pre-FT 0.8) / 0.2
    for s, vs in vals.items():
        xs, ys = [0.0, *radii], [0.8, *vs]
        area = sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in
                   zip(xs, xs[1:], ys, ys[1:])) / 0.2  # fmt: skip
        got = dict(zip(map(tuple, cells["concept_rate/probe/area"]["units"]),
                       cells["concept_rate/probe/area"]["values"]))  # fmt: skip
        assert got[(None, s)] == pytest.approx(area)
    # first radius above ½ · 0.8 = 0.4: seed 1 at 0.2, seed 2 at 0.05 (the pre value is
    # radius 0 and already above it for the original row itself: 0 for both)
    assert cells["concept_rate/probe/first"]["values"] == [0.0, 0.0]
    curve = table["curves"]["concept_rate/probe"]
    assert curve["x"] == "radius"
    assert [p["radius"] for p in curve["rows"]["original"]] == [0.0, *radii]
    assert any("against the radius" in n for n in notes(table))
    write_report(results, tmp_path, rows=["original"], threats=threats, all_steps=True)
    assert (tmp_path / "concept_rate_vs_steps.png").is_file()
    # a fine-tuning threat's columns keep their step titles
    ft = build_table(
        [_result("original", None, None, 0, 0.8), _result("original", "ft", 1, 50, 0.5)],
        ["original"], {"ft": {"seeds": [1], "eval_at": [50], "steps": 50}},
    )  # fmt: skip
    head = markdown_table(ft).splitlines()[0]
    assert "after ft (step 50)" in head and "over ft (0–50)" in head and "radius" not in head


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_resalign_run_and_report_a_perturb_threat_on_the_tiny_spec(tmp_path):
    """Both directions on the tiny spec's original and resalign (LoRA) rows: each radius is a
    node whose saved UNet is the row's moved by exactly r·‖θ‖; the report's columns and curve
    are against the radius."""
    from safetensors.torch import load_file

    from resalign.cli import cli
    from resalign.graph.compile import compile_spec
    from resalign.models.loading import load_row
    from resalign.models.saving import merged_unet_state_dict
    from resalign.spec import load_spec

    threats = {
        "probe": {"algorithm": "perturb", "perturb": {"radii": [0.05, 0.3]}, "seeds": [1]},
        "downhill": {"algorithm": "perturb", "data": "benign", "seeds": [1],
                     "perturb": {"radii": [0.05], "direction": "gradient", "batch_size": 4}},
    }  # fmt: skip
    path, store = _spec(tmp_path, threats), tmp_path / "runs"
    res = CliRunner().invoke(cli, ["run", str(path), "--store", str(store), "--no-tracking"])
    assert res.exit_code == 0, res.output
    g = compile_spec(load_spec(path))
    model = store / "model" / g["model"].key
    for row, un in (("original", None), ("resalign/seed0", "unlearn/resalign/seed0")):
        trainable = store / "unlearn" / g[un].key / "trainable.safetensors" if un else None
        theta = {k: v.double() for k, v in
                 merged_unet_state_dict(load_row(model, trainable).unet).items()}  # fmt: skip
        norm = sum(float(t.norm()) ** 2 for t in theta.values()) ** 0.5
        for name, r in ((f"attack/{row}/probe/seed1/step1", 0.05),
                        (f"attack/{row}/probe/seed1/step2", 0.3),
                        (f"attack/{row}/downhill/seed1/step1", 0.05)):  # fmt: skip
            out = store / "attack" / g[name].key
            moved = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
            dist = sum(float((moved[k].double() - theta[k]).norm()) ** 2 for k in theta) ** 0.5
            assert dist == pytest.approx(r * norm, rel=1e-5), name
            stats = json.loads((out / "stats.json").read_text())
            assert stats["radius"] == r and stats["relative_distance"] == pytest.approx(r)
        assert json.loads((store / "attack" / g[name].key / "stats.json").read_text())["loss"]

    out = tmp_path / "report"
    res = CliRunner().invoke(
        cli, ["report", str(path), "--store", str(store), "--all-steps", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    table = json.loads((out / "table.json").read_text())
    md = (out / "report.md").read_text()
    assert "after probe (radius 0.05)" in md and "after probe (radius 0.3)" in md
    assert "over radius, probe (0–0.3)" in md and "after downhill (radius 0.05)" in md
    curve = table["curves"]["concept_rate/probe"]
    assert curve["x"] == "radius"
    assert [p["radius"] for p in curve["rows"]["original"]] == [0.0, 0.05, 0.3]


@fast
def test_rehearsal_and_tracking_take_a_perturb_threat_as_written():
    from resalign.engine.tracking.curation import curated_params
    from resalign.rehearse import PROFILES, _cap_threat
    from resalign.spec.schema import Spec

    t = ThreatSpec.model_validate(_threat(seeds=[1])).model_dump(mode="json")
    # nothing to cap, and capping the fine-tuning fields would break the perturb rule
    assert _cap_threat(dict(t), PROFILES["toy"]) == t
    d = yaml.safe_load(TINY_SPEC.read_text(encoding="utf-8"))
    d["threats"] = {"probe": _threat(seeds=[1])}
    params = curated_params(Spec.model_validate(d))
    assert json.loads(params["threat.probe.perturb"])["radii"] == [0.01, 0.1]
    assert "threat.probe.lr" not in params and "threat.probe.optimizer" not in params
