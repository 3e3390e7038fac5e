"""The flow-matching objective (SD3) beside DDPM: one objective interface chosen by the model.

Checked against the published formulas written out here independently of the code under
test: the scheduler's shifted sigmas σ = s·k/(1 + (k − 1)s) at index ⌊u·T⌋ of the timestep
table, u = sigmoid(N(0, 1)) drawn as diffusers' SD3 training script draws it,
x_t = (1 − σ)x₀ + σε and v = ε − x₀; the denoiser, ESD target and attack loss on an SD3
transformer against direct calls of the transformer.
"""

from __future__ import annotations

import pytest
import torch

from resalign.algorithms.attack import denoise_loss as attack_loss
from resalign.algorithms.objectives import (
    Denoiser,
    denoise_loss,
    distill_loss,
    esd_target,
    noise_batch,
)
from resalign.algorithms.toy import toy_flow_scheduler, toy_pairs, toy_scheduler, toy_transformer
from resalign.models.diffusion import (
    DDPMObjective,
    FlowMatchObjective,
    noise_and_target,
    objective_for,
)
from resalign.spec.schema.model import SD3_LORA_TARGETS, ModelSpec

D = torch.float64


def _shifted_sigma(index: torch.Tensor, shift: float, steps: int = 1000) -> torch.Tensor:
    s = (steps - index.double()) / steps  # linspace(1, T, T) reversed, over T
    return shift * s / (1 + (shift - 1) * s)


def test_objective_is_chosen_by_the_training_scheduler() -> None:
    assert isinstance(objective_for(toy_scheduler()), DDPMObjective)
    flow = objective_for(toy_flow_scheduler(), {"sampling": "uniform"})
    assert isinstance(flow, FlowMatchObjective) and flow.sampling == "uniform"
    with pytest.raises(ValueError, match="timestep sampling"):
        FlowMatchObjective(toy_flow_scheduler(), sampling="cosmap")


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_noising_and_logit_normal_draw_match_the_published_formulas(shift: float) -> None:
    obj = FlowMatchObjective(toy_flow_scheduler(shift))
    x0 = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=D)
    noise, t = obj.draw(x0, torch.Generator().manual_seed(7))
    # the same stream, drawn by hand: ε first, then u = sigmoid(N(0, 1)) (logit-normal 0, 1)
    g = torch.Generator().manual_seed(7)
    eps = torch.randn(x0.shape, generator=g, dtype=D)
    u = torch.sigmoid(torch.normal(0.0, 1.0, size=(64,), generator=g))
    index = (u * 1000).long()
    sigma = _shifted_sigma(index, shift)
    assert torch.equal(noise, eps)
    torch.testing.assert_close(t.double(), sigma * 1000, rtol=1e-6, atol=1e-4)
    noisy, target = obj.noise_and_target(x0, noise, t)
    s = sigma.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - s) * x0 + s * eps, rtol=1e-6, atol=1e-6)
    assert torch.equal(target, eps - x0)
    # the module-level entry point is the same function
    a, b = noise_and_target(obj, x0, noise, t)
    assert torch.equal(a, noisy) and torch.equal(b, target)


def test_uniform_and_mode_samplings_cover_the_schedule() -> None:
    uni = FlowMatchObjective(toy_flow_scheduler(1.0), sampling="uniform")
    t = uni.draw_timesteps(4000, torch.Generator().manual_seed(1))
    # uniform indices: σ = t/T uniform on (0, 1]; mean 1/2, every decile populated
    assert abs(float(t.mean()) / 1000 - 0.5) < 0.02
    assert torch.histc(t, bins=10, min=0, max=1000).min() > 300
    logit = FlowMatchObjective(toy_flow_scheduler(1.0)).draw_timesteps(
        4000, torch.Generator().manual_seed(1)
    )
    # logit-normal concentrates on the middle: fewer draws in the outer deciles than uniform
    edge = lambda x: int(((x < 100) | (x > 900)).sum())  # noqa: E731
    assert edge(logit) < 0.6 * edge(t)
    mode = FlowMatchObjective(toy_flow_scheduler(1.0), sampling="mode").draw_timesteps(
        100, torch.Generator().manual_seed(1)
    )
    assert float(mode.min()) > 0 and float(mode.max()) <= 1000


def _sd3_batch(seed: int = 0):
    model = toy_transformer(D)
    obj = FlowMatchObjective(toy_flow_scheduler())
    pairs = toy_pairs(3, 8, seed=seed, pooled_dim=8)
    return model, obj, pairs, noise_batch(pairs, obj, torch.Generator().manual_seed(seed))


def test_denoiser_and_losses_on_an_sd3_transformer_are_direct_calls() -> None:
    model, obj, pairs, nb = _sd3_batch()
    assert nb.pooled is not None and nb.condition["pooled_projections"] is nb.pooled
    den = Denoiser(model, obj, {})
    with torch.no_grad():
        direct = model(
            nb.noisy,
            timestep=nb.timesteps,
            encoder_hidden_states=nb.embeddings,
            pooled_projections=nb.pooled,
        ).sample
    torch.testing.assert_close(den.eps({}, nb), direct, rtol=0, atol=0)
    mse = float(((direct - nb.target) ** 2).mean())
    assert float(denoise_loss(den, {}, nb)) == pytest.approx(mse, rel=1e-12)
    assert float(distill_loss(den, {}, nb)) == 0.0
    # ESD on the velocity: the same affine combination of the conditional and empty-prompt
    # predictions (the empty prompt's condition carries its own pooled projection)
    uncond = {"encoder_hidden_states": torch.zeros(1, 4, 8, dtype=D),
              "pooled_projections": torch.zeros(1, 8, dtype=D)}  # fmt: skip
    with torch.no_grad():
        e_u = model(
            nb.noisy,
            timestep=nb.timesteps,
            encoder_hidden_states=torch.zeros(3, 4, 8, dtype=D),
            pooled_projections=torch.zeros(3, 8, dtype=D),
        ).sample
    torch.testing.assert_close(esd_target(den, nb, uncond, 2.0), e_u - 2.0 * (direct - e_u))


def test_attack_loss_uses_the_same_flow_objective() -> None:
    model, obj, pairs, _ = _sd3_batch(1)
    cond = pairs.condition
    got = attack_loss(model, obj, pairs.latents, cond, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    noise, t = obj.draw(pairs.latents, g)
    noisy, target = obj.noise_and_target(pairs.latents, noise, t)
    with torch.no_grad():
        pred = model(noisy, timestep=t, **cond).sample
    assert float(got) == pytest.approx(float(((pred - target) ** 2).mean()), rel=1e-12)


def test_sd3_spec_defaults_and_refusals() -> None:
    m = ModelSpec(family="sd3", pretrained="org/name")
    assert m.flow_matching and m.timestep_sampling is not None
    assert m.timestep_sampling.kind == "logit_normal"
    assert m.trainable.targets == SD3_LORA_TARGETS  # diffusers' SD3 LoRA script's targets
    written = ModelSpec(family="sd3", pretrained="o/n", trainable={"targets": ["attn.to_q"]})
    assert written.trainable.targets == ["attn.to_q"]
    assert ModelSpec.model_validate(m.model_dump(mode="json")) == m
    with pytest.raises(ValueError, match="DDPM schedule"):
        ModelSpec(family="sd3", pretrained="o/n", noise_schedule={"beta_end": 0.02})
    with pytest.raises(ValueError, match="flow-matching models"):
        ModelSpec(family="sd", pretrained="o/n", timestep_sampling={"kind": "uniform"})
    # fields added for flow matching stay out of the UNet families' dumps (their node keys)
    sd, tiny = ModelSpec(family="sd", pretrained="o/n"), ModelSpec(family="tiny")
    assert "timestep_sampling" not in sd.model_dump()
    assert not {"architecture", "transformer_layers", "flow_shift"} & set(tiny.model_dump()["tiny"])
    flow_tiny = ModelSpec(family="tiny", tiny={"architecture": "sd3"})
    assert flow_tiny.flow_matching and flow_tiny.model_dump()["tiny"]["architecture"] == "sd3"
