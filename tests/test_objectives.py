"""Losses, the frozen original and the regularizer weight schedule."""

from __future__ import annotations

import pytest
import torch

from resalign.algorithms.methods import original_overrides
from resalign.algorithms.objectives import (
    Denoiser,
    EncodedPairs,
    denoise_loss,
    distill_loss,
    esd_target,
    neg_denoise_loss,
    noise_batch,
    regularizer,
    schedule_weight,
)
from resalign.algorithms.toy import toy_pairs, toy_scheduler, toy_unet
from resalign.errors import UserError
from resalign.models.trainable import apply_trainable
from resalign.spec.schema.model import TrainableSpec
from resalign.spec.schema.unlearn import RegularizerSpec

D = torch.float64


def test_published_schedule_constant_then_sigmoid_ramp():
    r = RegularizerSpec()  # published default: 1.6 → 2.0 over the second half
    s = r.schedule
    ws = [
        schedule_weight(r.weight, s.kind, s.final_weight, s.start_fraction, s.sharpness, k, 161)
        for k in range(161)
    ]
    assert ws[0] == 1.6 and ws[80] == 1.6 and max(ws[:81]) == 1.6
    assert ws[-1] == pytest.approx(2.0, abs=1e-12)
    assert all(b >= a for a, b in zip(ws, ws[1:]))
    assert ws[120] == pytest.approx(1.8, abs=1e-12)  # the logistic midpoint of the ramp
    assert schedule_weight(1.6, "constant", 2.0, 0.5, 10.0, 150, 161) == 1.6


def _model():
    unet = toy_unet("tiny", D)
    sel = apply_trainable(unet, TrainableSpec(), torch.Generator().manual_seed(1))
    return unet, sel, toy_scheduler()


def test_losses_and_frozen_original_with_lora():
    unet, sel, sched = _model()
    den = Denoiser(unet, sched, original_overrides(unet, sel))
    nb = noise_batch(toy_pairs(3, 8, seed=0), sched, torch.Generator().manual_seed(0))
    params = {n: p for n, p in unet.named_parameters() if n in set(sel.names)}
    with torch.no_grad():
        live = unet(nb.noisy, nb.timesteps, encoder_hidden_states=nb.embeddings).sample
        unet.disable_adapters()  # peft's own switch: an independent route to the original
        orig = unet(nb.noisy, nb.timesteps, encoder_hidden_states=nb.embeddings).sample
        unet.enable_adapters()
    assert not torch.allclose(live, orig)  # the published init is not a no-op
    torch.testing.assert_close(den.eps_original(nb), orig, rtol=1e-12, atol=1e-14)
    mse = torch.nn.functional.mse_loss
    assert float(denoise_loss(den, params, nb)) == pytest.approx(float(mse(live, nb.target)), 1e-12)
    assert float(neg_denoise_loss(den, params, nb)) == pytest.approx(-float(mse(live, nb.target)))
    assert float(distill_loss(den, params, nb)) == pytest.approx(float(mse(live, orig)), 1e-12)
    assert float(distill_loss(den, den.original, nb)) == 0.0


def test_esd_target_and_full_original_copy():
    unet = toy_unet("tiny", D)
    sel = apply_trainable(unet, TrainableSpec(kind="full"))
    sched = toy_scheduler()
    den = Denoiser(unet, sched, original_overrides(unet, sel))
    nb = noise_batch(toy_pairs(2, 8, seed=1), sched, torch.Generator().manual_seed(1))
    uncond = torch.zeros(1, 4, 8, dtype=D)
    with torch.no_grad():
        e_c = unet(nb.noisy, nb.timesteps, encoder_hidden_states=nb.embeddings).sample
        e_u = unet(nb.noisy, nb.timesteps, encoder_hidden_states=uncond.expand(2, 4, 8)).sample
        for p in unet.parameters():  # train "away": the copy must keep the original
            p.add_(0.01)
    torch.testing.assert_close(esd_target(den, nb, uncond, 0.0), e_u)
    torch.testing.assert_close(esd_target(den, nb, uncond, 1.5), e_u - 1.5 * (e_c - e_u))


def test_encoded_pairs_and_registry_errors():
    with pytest.raises(ValueError):
        EncodedPairs(torch.zeros(2, 1, 8, 8), torch.zeros(3, 4, 8))
    p = toy_pairs(5, 8, seed=0)
    a = p.sample(3, torch.Generator().manual_seed(4))
    b = p.sample(3, torch.Generator().manual_seed(4))
    assert torch.equal(a.latents, b.latents) and len(a) == 3
    assert len(EncodedPairs.concat([p, a])) == 8
    with pytest.raises(UserError, match="unknown regularizer"):
        regularizer("nope")
