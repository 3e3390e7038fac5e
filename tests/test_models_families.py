"""SDXL and SD 2.x through every step: conditioning built once (pooled text embeddings and
time ids for SDXL), v-prediction where the scheduler says so, and tiny SDXL- and SD 2.x-shaped
pipelines (real diffusers classes, saved in the diffusers layout) that run
unlearn → attack → evaluate → report through the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner

from resalign.algorithms.objectives import (
    Denoiser,
    EncodedPairs,
    denoise_loss,
    esd_target,
    noise_batch,
)
from resalign.models.diffusion import noise_and_target
from resalign.models.loading import bundle_from_pipeline, load_pipeline
from resalign.models.tiny import write_tiny_pipeline
from resalign.spec.schema.model import NoiseScheduleSpec, TinyModelSpec

TINY = TinyModelSpec(block_out_channels=[16, 32], text_hidden_size=16, text_layers=2, max_length=16)
CAPTIONS = ["a handwritten digit zero", "a handwritten digit one", "x"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {
        layout: write_tiny_pipeline(root / layout, layout, tiny=TINY, seed=3)
        for layout in ("sdxl", "sd2")
    }


def _bundle(folder: Path, family: str) -> Any:
    pipe = load_pipeline({"kind": "folder", "path": str(folder)}, family)
    return pipe, bundle_from_pipeline(pipe, family, NoiseScheduleSpec().model_dump())


def test_sdxl_condition_is_the_pipelines_own(folders: dict[str, Path]) -> None:
    # Generation goes through StableDiffusionXLPipeline, training through encode_condition:
    # both must condition the UNet identically.
    pipe, b = _bundle(folders["sdxl"], "sdxl")
    cond = b.encode_condition(CAPTIONS)
    emb, _, pooled, _ = pipe.encode_prompt(
        CAPTIONS, device="cpu", do_classifier_free_guidance=False
    )
    assert torch.equal(cond["encoder_hidden_states"], emb)
    assert torch.equal(cond["added_cond_kwargs"]["text_embeds"], pooled)
    r = b.resolution
    time_ids = pipe._get_add_time_ids(
        (r, r), (0, 0), (r, r), torch.float32, pipe.text_encoder_2.config.projection_dim
    )
    assert torch.equal(cond["added_cond_kwargs"]["time_ids"], time_ids.repeat(len(CAPTIONS), 1))
    # the UNet needs the added conditioning: without it SDXL's UNet refuses to run
    x = torch.randn(3, 1, 8, 8)
    with pytest.raises((TypeError, ValueError, KeyError)):
        b.unet(x, torch.tensor([1, 2, 3]), encoder_hidden_states=cond["encoder_hidden_states"])


def test_sd2_layout_trains_v_prediction_from_its_checkpoint(folders: dict[str, Path]) -> None:
    # the spec does not write prediction_type: the checkpoint's scheduler (v) wins
    _, b = _bundle(folders["sd2"], "sd")
    assert b.noise_scheduler.config.prediction_type == "v_prediction"
    # a written value still overrides the checkpoint
    pipe = load_pipeline({"kind": "folder", "path": str(folders["sd2"])}, "sd")
    forced = bundle_from_pipeline(pipe, "sd", {"prediction_type": "epsilon"})
    assert forced.noise_scheduler.config.prediction_type == "epsilon"


def test_noise_and_target_match_the_ddpm_formulas() -> None:
    from diffusers import DDPMScheduler

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1, 1)
    for kind, want in (
        ("epsilon", eps),
        ("v_prediction", abar.sqrt() * eps - (1 - abar).sqrt() * x0),
    ):
        sched = DDPMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=kind
        )
        noisy, target = noise_and_target(sched, x0, eps, t)
        # the scheduler holds ᾱ in float32: agreement to float32 rounding
        close = {"rtol": 1e-6, "atol": 1e-6}
        torch.testing.assert_close(noisy, abar.sqrt() * x0 + (1 - abar).sqrt() * eps, **close)
        torch.testing.assert_close(target, want, **close)


def test_denoiser_and_esd_pass_sdxl_added_conditioning(folders: dict[str, Path]) -> None:
    _, b = _bundle(folders["sdxl"], "sdxl")
    lat = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = b.encode_condition(CAPTIONS)
    pairs = EncodedPairs.from_condition(lat, cond)
    # encoded in two chunks and concatenated: the same conditioning (to the rounding of a
    # different batch composition in the text encoders)
    split = EncodedPairs.concat(
        [
            EncodedPairs.from_condition(lat[:2], b.encode_condition(CAPTIONS[:2])),
            EncodedPairs.from_condition(lat[2:], b.encode_condition(CAPTIONS[2:])),
        ]
    )
    assert split.added is not None and split.added["time_ids"].shape == (3, 6)
    for got, want in ((split.embeddings, pairs.embeddings), (split.added, pairs.added)):
        torch.testing.assert_close(got, want)
    nb = noise_batch(pairs, b.noise_scheduler, torch.Generator().manual_seed(2))
    den = Denoiser(b.unet, b.noise_scheduler, {})
    with torch.no_grad():
        direct = b.unet(nb.noisy, nb.timesteps, **cond).sample
        assert torch.equal(den.eps({}, nb), direct)
        loss = denoise_loss(den, {}, nb)
    assert float(loss) == pytest.approx(float(((direct - nb.target) ** 2).mean()), rel=1e-6)
    # ESD's unconditional branch uses the empty prompt's pooled embeds and time ids too
    uncond = b.encode_condition([""])
    with torch.no_grad():
        e_u = b.unet(
            nb.noisy,
            nb.timesteps,
            encoder_hidden_states=uncond["encoder_hidden_states"].expand(3, -1, -1),
            added_cond_kwargs={
                k: v.expand(3, *v.shape[1:]) for k, v in uncond["added_cond_kwargs"].items()
            },
        ).sample
    torch.testing.assert_close(esd_target(den, nb, uncond, 1.0), e_u - (direct - e_u))


def test_pretraining_and_attack_run_on_sdxl(folders: dict[str, Path]) -> None:
    from resalign.algorithms.attack import AttackConfig, run_attack
    from resalign.data.types import PairSet
    from resalign.models.pretrain import pretrain_unet

    _, b = _bundle(folders["sdxl"], "sdxl")
    g = torch.Generator().manual_seed(4)
    pairs = PairSet(torch.rand(6, 1, 8, 8, generator=g) * 2 - 1, CAPTIONS * 2)
    enc2 = {k: v.clone() for k, v in b.text_encoder_2.state_dict().items()}
    unet0 = b.unet.conv_in.weight.detach().clone()
    out = pretrain_unet(b, pairs, steps=2, batch_size=3, train_text_encoder=True)
    assert torch.isfinite(torch.tensor(out["final_loss"]))
    assert not torch.equal(unet0, b.unet.conv_in.weight)
    # both encoders are trained (the second one gives SDXL's pooled embeddings)
    assert any(not torch.equal(enc2[k], v) for k, v in b.text_encoder_2.state_dict().items())
    cfg = AttackConfig.from_threat(
        {"data": "x", "steps": 2, "batch_size": 2, "grad_accumulation": 1, "precision": "fp32"},
        seed=1,
    )
    res = run_attack(b, pairs, cfg)
    assert len(res.losses) == 2 and all(torch.isfinite(torch.tensor(res.losses)))


SPEC = """
name: {name}
seed: 0
model:
  family: {family}
  pretrained: {folder}
  device: cpu
  trainable: {{kind: lora, rank: 2}}
datasets:
  harmful: {{type: digits, split: train, digits: [0], limit: 8}}
  retain: {{type: digits, split: train, digits: [1, 2], limit: 8}}
  poisoned: {{type: mix, base: retain, poison: harmful, ratio: 0.25}}
concepts:
  digit: {{harmful: [harmful], retain: [retain], label: 0}}
unlearn:
  method: resalign
  steps: 2
  harmful_loss: {{batch_size: 2}}
  regularizers: [{{kind: distill, weight: 1.0, batch_size: 2}}]
  resilience:
    hypergradient: {{kind: moreau, gamma: 0.1, iterations: 2, max_norm: null}}
    meta:
      samples_per_step: 1
      data: [retain]
      configs:
        a: {{algorithm: lora, optimizer: adam, lr: 1.0e-3, steps: 2, batch_size: 2}}
baselines:
  plain: {{method: plain}}
threats:
  full: {{data: poisoned, steps: 2, eval_at: [2], batch_size: 2, grad_accumulation: 1,
          precision: fp32, lr: 1.0e-3, seeds: [1]}}
  lora: {{data: retain, algorithm: lora, lora: {{rank: 2}}, steps: 2, eval_at: [2],
          batch_size: 2, grad_accumulation: 1, precision: fp32, lr: 1.0e-3, seeds: [1]}}
evaluate:
  generation: {{scheduler: EulerDiscreteScheduler, steps: 2, images_per_prompt: 1,
                batch_size: 10}}
  metrics: [{{kind: concept_rate}}]
"""


@pytest.mark.slow
@pytest.mark.parametrize(("layout", "family"), [("sdxl", "sdxl"), ("sd2", "sd")])
def test_family_runs_unlearn_attack_evaluate_report(
    folders: dict[str, Path], tmp_path: Path, layout: str, family: str
) -> None:
    from resalign.cli import cli

    spec = tmp_path / "spec.yaml"
    text = SPEC.format(name=f"tiny_{layout}", family=family, folder=folders[layout])
    yaml.safe_load(text)  # the test's own spec is valid YAML
    spec.write_text(text)
    store = tmp_path / "runs"
    res = CliRunner().invoke(cli, ["run", str(spec), "--store", str(store), "--no-tracking"])
    assert res.exit_code == 0, res.output
    rep = CliRunner().invoke(cli, ["report", str(spec), "--store", str(store)])
    assert rep.exit_code == 0, rep.output
    rows = [line.split("|")[1].strip() for line in rep.output.splitlines() if line.startswith("| ")]
    assert {"original", "resalign", "plain"} <= set(rows)
    assert "full" in rep.output and "lora" in rep.output
    # the unlearned row's UNet really changed (LoRA merged into a saved UNet)
    merged = sorted(store.glob("unlearn/*/unet/diffusion_pytorch_model.safetensors"))
    assert len(merged) == 2
