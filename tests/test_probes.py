"""The probe quantities (issue 26, "what decides resurgence") against independent
computations in float64: the weight distance by hand, the harmful loss by a direct UNet call,
the top Hessian eigenvalue and the Hutchinson trace against a dense Hessian of a very small
model; and the probe nodes run through the engine on tests/specs/tiny.yaml to a report with
the predictor table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from resalign.algorithms.objectives import Denoiser, denoise_loss
from resalign.algorithms.probes import (
    block_type,
    harmful_probes,
    hutchinson_trace,
    probe_batch,
    weight_distance,
)
from resalign.algorithms.toy import toy_pairs, toy_scheduler, toy_unet

SPEC = Path(__file__).resolve().parent / "specs" / "tiny.yaml"


def test_weight_distance_by_hand():
    a, b = toy_unet("tiny", seed=0), toy_unet("tiny", seed=1)
    original = {n: p.detach().clone() for n, p in a.named_parameters()}
    got = weight_distance(b.named_parameters(), original)
    theirs = dict(b.named_parameters())

    def rel(names):
        d = torch.cat([(theirs[n] - original[n]).flatten() for n in names])
        return float(d.detach().norm() / torch.cat([original[n].flatten() for n in names]).norm())

    names = list(original)
    assert got["weight_distance"] == pytest.approx(rel(names), rel=1e-12)
    attn = [n for n in names if ".attentions." in n]
    res = [n for n in names if ".resnets." in n]
    other = [n for n in names if n not in attn and n not in res]
    assert attn and res and other
    assert got["weight_distance.attention"] == pytest.approx(rel(attn), rel=1e-12)
    assert got["weight_distance.resnet"] == pytest.approx(rel(res), rel=1e-12)
    assert got["weight_distance.other"] == pytest.approx(rel(other), rel=1e-12)
    assert block_type("conv_in.weight") == "other"
    assert weight_distance(a.named_parameters(), original)["weight_distance"] == 0.0


def test_probe_batch_is_fixed_by_the_seed_and_cycles_the_data():
    pairs = toy_pairs(5, 8, seed=3)
    sched = toy_scheduler()
    one, again = probe_batch(pairs, sched, 12, seed=7), probe_batch(pairs, sched, 12, seed=7)
    assert torch.equal(one.noisy, again.noisy) and torch.equal(one.timesteps, again.timesteps)
    assert not torch.equal(one.noisy, probe_batch(pairs, sched, 12, seed=8).noisy)
    # every item once before any repeats: the first 5 latents are a permutation of the data
    first = {tuple(x.flatten().tolist()) for x in one.latents[:5]}
    assert first == {tuple(x.flatten().tolist()) for x in pairs.latents}
    assert one.noisy.shape[0] == 12


def test_harmful_loss_is_the_objectives_value():
    unet, sched = toy_unet("tiny"), toy_scheduler()
    batch = probe_batch(toy_pairs(6, 8, seed=1, shift=1.0), sched, 8, seed=0)
    values, _ = harmful_probes(unet, sched, batch, ["harmful_loss"], seed=0)
    with torch.no_grad():  # a direct call, not through the Denoiser
        pred = unet(batch.noisy, batch.timesteps, encoder_hidden_states=batch.embeddings).sample
    assert values["harmful_loss"] == pytest.approx(
        float(((pred - batch.target) ** 2).mean()), rel=1e-12
    )
    den = Denoiser(unet, sched, {})
    with torch.no_grad():
        own = float(denoise_loss(den, dict(unet.named_parameters()), batch))
    assert values["harmful_loss"] == pytest.approx(own, rel=1e-12)


class Mini(nn.Module):
    """A UNet-shaped (``unet(x, timestep=t, encoder_hidden_states=...)[0]``) model of 24 parameters:
    a 3×3 conv, a text projection and a tanh, small enough for a dense Hessian."""

    def __init__(self, cross: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Parameter(torch.randn(1, 1, 3, 3, generator=g, dtype=torch.float64))
        self.text = nn.Parameter(torch.randn(cross, 1, generator=g, dtype=torch.float64) * 0.3)
        self.gain = nn.Parameter(torch.randn(7, generator=g, dtype=torch.float64))

    def forward(self, x, timestep, encoder_hidden_states, return_dict=False):
        t = timestep
        h = nn.functional.conv2d(x, self.conv, padding=1)
        c = (encoder_hidden_states.mean(1) @ self.text)[:, :, None, None]
        s = (t.to(x.dtype) / 1000.0)[:, None, None, None]
        out = torch.tanh(h + c) * (self.gain[0] + self.gain[1] * s) + self.gain[2] * x
        out = (
            out + self.gain[3] * torch.tanh(self.gain[4] * h) + self.gain[5] * h * h * self.gain[6]
        )
        return (out,)


def _dense_hessian(model: Mini, sched, batch) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().flatten() for _, p in model.named_parameters()])
    den = Denoiser(model, sched, {})

    def f(x):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            k = math.prod(s)
            parts[n] = x[i : i + k].reshape(s)
            i += k
        return denoise_loss(den, parts, batch)

    return torch.autograd.functional.hessian(f, flat)


def test_lambda_max_and_trace_against_a_dense_hessian():
    model, sched = Mini(), toy_scheduler()
    batch = probe_batch(toy_pairs(6, 8, seed=2, shift=0.5), sched, 12, seed=1)
    h = _dense_hessian(model, sched, batch)
    eig = torch.linalg.eigvalsh(h)
    top = eig[eig.abs().argmax()]
    second = sorted(eig.abs().tolist())[-2]
    assert second / abs(float(top)) < 0.9  # a gap, so power iteration converges
    values, info = harmful_probes(
        model, sched, batch, ["lambda_max", "hessian_trace"], seed=0,
        power_iterations=500, power_tol=0.0, hutchinson_samples=1000,
    )  # fmt: skip
    assert values["lambda_max"] == pytest.approx(float(top), rel=1e-8)
    assert info["lambda_max_hvps"] <= 500
    tr, se = values["hessian_trace"], info["hessian_trace_se"]
    # Hutchinson is unbiased with variance 2(‖H‖²_F − Σ H_ii²) per vector
    var = 2 * (float((h**2).sum()) - float((torch.diagonal(h) ** 2).sum()))
    # (the sample SD of 1000 draws is within ~5 % of the true one at 1σ)
    assert se == pytest.approx(math.sqrt(var / 1000), rel=0.2)
    assert abs(tr - float(torch.trace(h))) < 4 * math.sqrt(var / 1000)


def test_hutchinson_matches_the_dense_quadratic_forms_of_its_vectors():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    h = a + a.T
    like = [torch.zeros(2, 3, dtype=torch.float64)]
    tr, se = hutchinson_trace(
        lambda v: [(h @ v[0].flatten()).reshape(2, 3)], like, 5, torch.Generator().manual_seed(3)
    )
    g2 = torch.Generator().manual_seed(3)
    vals = []
    for _ in range(5):
        v = (torch.randint(0, 2, (2, 3), generator=g2) * 2 - 1).double().flatten()
        vals.append(float(v @ h @ v))
    assert tr == pytest.approx(sum(vals) / 5, rel=1e-12)
    assert se == pytest.approx(
        float(torch.tensor(vals, dtype=torch.float64).std() / math.sqrt(5)), rel=1e-10
    )


def test_probes_run_on_a_diffusers_unet_with_attention():
    """Double backward through the UNet's cross attention on CPU (the math path)."""
    unet, sched = toy_unet("tiny"), toy_scheduler()
    batch = probe_batch(toy_pairs(4, 8, seed=1), sched, 4, seed=0)
    values, info = harmful_probes(
        unet, sched, batch, ["harmful_grad_norm", "lambda_max", "hessian_trace"], seed=0,
        power_iterations=3, power_tol=0.0, hutchinson_samples=2,
    )  # fmt: skip
    assert all(math.isfinite(v) for v in values.values()) and info["lambda_max_hvps"] == 3
    leaves = [p.detach().clone().requires_grad_(True) for p in unet.parameters()]
    names = [n for n, _ in unet.named_parameters()]
    loss = denoise_loss(Denoiser(unet, sched, {}), dict(zip(names, leaves)), batch)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    norm = math.sqrt(sum(float((g**2).sum()) for g in grads if g is not None))
    assert values["harmful_grad_norm"] == pytest.approx(norm, rel=1e-10)
    with pytest.raises(ValueError, match="lambda_max needs"):
        harmful_probes(unet, sched, batch, ["lambda_max"], seed=0)


@pytest.mark.slow
def test_tiny_spec_with_probes_reports_the_predictor_table(tmp_path):
    from click.testing import CliRunner

    from resalign.cli import cli
    from resalign.engine.store import Store
    from resalign.graph.compile import compile_spec
    from resalign.spec import load_spec

    sets = [
        "probes={data: harmful, batch_size: 8, power_iterations: 3, hutchinson_samples: 2, "
        "along_attack: [harmful_loss, weight_distance]}",
        "unlearn.seeds=[0, 1]",
    ]
    args = [a for s in sets for a in ("--set", s)]
    store = tmp_path / "runs"
    res = CliRunner().invoke(cli, ["run", str(SPEC), "--store", str(store), "--no-tracking", *args])
    assert res.exit_code == 0, res.output
    graph = compile_spec(load_spec(SPEC, sets=sets))
    st = Store(store)
    probes = graph.of_kind("probe")
    # pre-FT: original + 2 rows × 2 seeds; segments: one per attack segment
    assert len(probes) == 5 + len(graph.of_kind("attack"))
    pre = json.loads(
        (st.node_dir("probe", graph["probe/plain/seed1/pre"].key) / "probe.json").read_text()
    )
    assert set(pre["values"]) >= {"weight_distance", "harmful_loss", "lambda_max", "hessian_trace"}
    orig = json.loads(
        (st.node_dir("probe", graph["probe/original/pre"].key) / "probe.json").read_text()
    )
    assert orig["values"]["weight_distance"] == 0.0
    seg = graph["probe/resalign/seed0/benign/seed1/step2"]
    assert (
        json.loads((st.node_dir("probe", seg.key) / "probe.json").read_text())["values"][
            "weight_distance"
        ]
        > 0
    )
    folder = st.node_dir("report", graph["report"].key)
    md = (folder / "report.md").read_text()
    assert "## What predicts resurgence" in md
    assert "| benign | pooled | lambda_max |" in md
    assert "harmful_loss at step 2" in md and "Δharmful_loss to step 2" in md
    table = json.loads((folder / "table.json").read_text())
    pooled = [e for e in table["predictors"]["entries"] if e["group"] == "pooled"]
    assert {e["n"] for e in pooled if e["predictor"] == "lambda_max"} == {4}
    # `resalign report` reads the same probes from the store
    out = tmp_path / "rep"
    rep = CliRunner().invoke(
        cli, ["report", str(SPEC), "--store", str(store), "--out", str(out), *args]
    )
    assert rep.exit_code == 0, rep.output
    assert "## What predicts resurgence" in (out / "report.md").read_text()
