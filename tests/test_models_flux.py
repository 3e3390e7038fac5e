"""``family: flux`` through the path, on a tiny random FLUX.1-shaped pipeline built in-process
(``resalign.rehearse.build_flux_pipeline``: a ``FluxTransformer2DModel`` of two double- and
two single-stream blocks with guidance embeddings, a ``CLIPTextModel``, a ``T5EncoderModel``
with a 16-token tokenizer, a 16-channel ``AutoencoderKL``, FLUX.1-dev's scheduler) saved in
the diffusers layout: the packed call against ``FluxPipeline``'s own helpers, loading (folder,
hub id from the local cache, single file's error path), the conditioning against
``FluxPipeline.encode_prompt``, the flow-matching target and Flux's shifted timesteps
against closed forms, the published LoRA targets, LoRA and merged outputs loaded by
``FluxPipeline``, generation, and the math-attention switch the HVPs need."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from resalign.algorithms.objectives import Denoiser, EncodedPairs, noise_batch
from resalign.errors import UserError
from resalign.models import flux
from resalign.models.attention import math_attention
from resalign.models.diffusion import FlowMatchObjective, predict
from resalign.models.loading import (
    load_pipeline,
    load_pretrained,
    load_row,
    resolve_pretrained,
    write_model_json,
)
from resalign.models.saving import save_lora, save_merged_unet, save_trainable
from resalign.models.trainable import apply_trainable
from resalign.spec.schema.model import FLUX_LORA_TARGETS, ModelSpec

CAPTIONS = ["a photo of a cat", "a person on a beach", ""]
T5_TOKENS = 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from resalign.rehearse import build_flux_pipeline, flux_configs

    root = tmp_path_factory.mktemp("flux")
    pipe = build_flux_pipeline(flux_configs("toy"), root / "_tok", t5_length=T5_TOKENS)
    pipe.save_pretrained(str(root / "tiny-flux"), safe_serialization=True)
    return root / "tiny-flux"


def _bundle(folder: Path | str) -> Any:
    return load_pretrained(ModelSpec(family="flux", pretrained=str(folder), resolution=64))


def _batch(bundle: Any, seed: int = 0) -> Any:
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    pairs = EncodedPairs.encode(bundle, images, CAPTIONS)
    return noise_batch(pairs, bundle.objective, torch.Generator().manual_seed(seed))


def _pipeline_call(transformer: Any, nb: Any) -> torch.Tensor:
    """The transformer called exactly as FluxPipeline.__call__ calls it (its own packing and
    ids), the output unpacked as FluxPipeline does: the independent reference."""
    from diffusers import FluxPipeline

    n, c, h, w = nb.noisy.shape
    packed = FluxPipeline._pack_latents(nb.noisy, n, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, "cpu", nb.noisy.dtype)
    with torch.no_grad():
        out = transformer(
            hidden_states=packed,
            timestep=nb.timesteps / 1000,
            guidance=nb.guidance,
            pooled_projections=nb.pooled,
            encoder_hidden_states=nb.embeddings,
            txt_ids=torch.zeros(nb.embeddings.shape[1], 3),
            img_ids=img_ids,
            return_dict=False,
        )[0]
    return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)


def test_packing_ids_and_resolution_shift_match_diffusers() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from resalign.rehearse import FLUX1_DEV_SCHEDULER

    x = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(0))
    packed = flux.pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 10))
    assert torch.equal(flux.unpack_latents(packed, 6, 10), x)
    assert torch.equal(
        flux.image_ids(6, 10), FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    )
    # mu and the shifted sigmas: the pipeline's calculate_shift and the scheduler's own
    # set_timesteps(mu=...) as FluxPipeline samples
    sched = FlowMatchEulerDiscreteScheduler(**FLUX1_DEV_SCHEDULER)
    for tokens in (16, 1024, 4096):
        mu = flux.resolution_mu(tokens, sched.config)
        assert mu == pytest.approx(calculate_shift(tokens, 256, 4096, 0.5, 1.15), abs=1e-12)
        sig = torch.linspace(1.0, 0.02, 50).double()
        sched.set_timesteps(sigmas=sig.numpy(), mu=mu)
        torch.testing.assert_close(flux.time_shift(mu, sig), sched.sigmas[:-1].double())
    assert flux.image_seq_len(1024, 8) == 4096 and flux.image_seq_len(64, 8) == 16


def test_folder_loads_with_flux_conditioning_and_objective(folder: Path) -> None:
    b = _bundle(folder)
    assert (b.layout, b.family, b.resolution, b.guidance) == ("flux", "flux", 64, 3.5)
    assert type(b.unet).__name__ == "FluxTransformer2DModel"
    obj = b.objective
    assert isinstance(obj, FlowMatchObjective) and obj.sampling == "uniform"
    assert obj.shift_mu == pytest.approx(flux.resolution_mu(16, b.noise_scheduler.config))
    cond = b.encode_condition(CAPTIONS)
    pipe = b.pipeline("FlowMatchEulerDiscreteScheduler")
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(CAPTIONS, max_sequence_length=T5_TOKENS)
    assert cond["encoder_hidden_states"].shape == (3, T5_TOKENS, 64)  # T5's sequence
    assert torch.equal(cond["encoder_hidden_states"], embeds)
    assert torch.equal(cond["pooled_projections"], pooled)  # CLIP's pooled output
    assert torch.equal(cond["guidance"], torch.full((3,), 3.5))  # FLUX.1-dev's embedding
    assert text_ids.shape == (T5_TOKENS, 3) and not text_ids.any()
    # the one denoiser call (trainers, unlearning's Denoiser) is FluxPipeline's call
    nb = _batch(b)
    want = _pipeline_call(b.unet, nb)
    with torch.no_grad():
        got = predict(b.unet, nb.noisy, nb.timesteps, nb.condition)
        den = Denoiser(b.unet, b.objective, {}).eps(dict(b.unet.named_parameters()), nb)
    assert got.shape == nb.noisy.shape == (3, 16, 8, 8)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(den, want, rtol=0, atol=0)


def test_objective_target_and_shifted_timesteps_closed_form(folder: Path) -> None:
    """x_t = (1 − σ)·x₀ + σ·ε and v = ε − x₀ with σ = t/1000 (FLUX.1's unshifted table,
    diffusers' sigma convention); t is the uniform draw of diffusers' Flux script, σ₀ =
    (1000 − ⌊1000u⌋)/1000, moved by Flux's shift e^μ/(e^μ + 1/σ₀ − 1) and snapped to the
    table (1/1000 apart)."""
    b = _bundle(folder)
    obj = b.objective
    x0 = torch.randn(64, 16, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    noise, t = obj.draw(x0, g)
    # the same stream by hand: the noise, then u ~ U[0, 1) (weighting scheme 'none')
    g = torch.Generator().manual_seed(7)
    noise_ref = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    u = torch.rand(64, generator=g)
    sigma0 = (1000 - torch.floor(u.double() * 1000)) / 1000
    e = math.exp(obj.shift_mu)
    sigma = e / (e + 1 / sigma0 - 1)
    assert torch.equal(noise, noise_ref)
    assert (t / 1000 - sigma).abs().max() <= 0.5e-3 + 1e-6
    assert (t / 1000 - sigma0).mean() > 0.02  # the shift moves toward noise (mu > 0 here)
    noisy, target = obj.noise_and_target(x0, noise, t)
    s = (t.double() / 1000).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - s) * x0 + s * noise, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(target, noise - x0, rtol=0, atol=0)
    # without the shift, diffusers' script exactly: σ = (1000 − ⌊1000u⌋)/1000
    plain = load_pretrained(
        ModelSpec(
            family="flux",
            pretrained=str(folder),
            resolution=64,
            timestep_sampling={"kind": "uniform"},
        )  # fmt: skip
    ).objective
    assert plain.shift_mu is None
    t_plain = plain.draw_timesteps(64, torch.Generator().manual_seed(3))
    u = torch.rand(64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(t_plain, 1000 - torch.floor(u * 1000), rtol=0, atol=0)


def test_hub_id_and_single_file_paths(folder: Path, tmp_path: Path, monkeypatch: Any) -> None:
    import shutil

    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--test-org--tiny-flux"
    shutil.copytree(folder, repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    source = resolve_pretrained("test-org/tiny-flux")
    assert source["id"] == "test-org/tiny-flux" and source["path"].endswith(rev)
    assert _bundle("test-org/tiny-flux").layout == "flux"
    bad = tmp_path / "flux1-dev.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="could not load single-file checkpoint"):
        load_pipeline(resolve_pretrained(str(bad)), "flux")


def test_lora_and_merged_outputs_load_in_flux_pipeline(folder: Path, tmp_path: Path) -> None:
    from diffusers import FluxPipeline, FluxTransformer2DModel

    b = _bundle(folder)
    nb = _batch(b)
    spec = ModelSpec(family="flux", pretrained=str(folder))
    assert spec.trainable.targets == FLUX_LORA_TARGETS
    sel = apply_trainable(b.unet, spec.trainable, torch.Generator().manual_seed(0))
    wrapped = sorted({n.split(".lora_")[0] for n in sel.names})
    # per double-stream block 8 attention + 4 feed-forward projections, per single-stream
    # block its q/k/v (it has no to_out: the attention output joins the MLP in proj_out)
    assert len(wrapped) == 2 * 12 + 2 * 3
    assert "single_transformer_blocks.1.attn.to_v" in wrapped
    assert "transformer_blocks.0.ff_context.net.2" in wrapped
    with torch.no_grad():
        want = predict(b.unet, nb.noisy, nb.timesteps, nb.condition)
    save_lora(b.unet, tmp_path / "lora")
    save_merged_unet(b.unet, tmp_path / "transformer")
    save_trainable(b.unet, tmp_path / "trainable.safetensors", sel.names)
    pipe = FluxPipeline.from_pretrained(folder)
    base = _pipeline_call(pipe.transformer, nb)
    pipe.load_lora_weights(tmp_path / "lora")
    lora = _pipeline_call(pipe.transformer, nb)
    merged = FluxTransformer2DModel.from_pretrained(tmp_path / "transformer")
    got = _pipeline_call(FluxPipeline.from_pretrained(folder, transformer=merged).transformer, nb)
    assert not torch.allclose(base, want)  # the published LoRA init is not a no-op
    torch.testing.assert_close(lora, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # a report row's model from the model node plus either output
    node = tmp_path / "node"
    node.mkdir()
    write_model_json(node, {"family": "flux", "layout": "flux", "resolution": 64,
                            "noise_schedule": {}, "training_guidance": 3.5})  # fmt: skip
    (node / "source.json").write_text(f'{{"kind": "folder", "path": "{folder}"}}')
    for row in (
        load_row(node, unet_dir=tmp_path / "transformer"),
        load_row(node, trainable_file=tmp_path / "trainable.safetensors"),
    ):
        assert row.resolution == 64 and row.guidance == 3.5
        with torch.no_grad():
            out = predict(row.unet, nb.noisy, nb.timesteps, nb.condition)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_generation_at_the_models_resolution(folder: Path, tmp_path: Path) -> None:
    from PIL import Image

    from resalign.evaluation.generate import GenerationConfig, generate_images

    b = _bundle(folder)
    with pytest.raises(UserError, match="cannot sample a flow-matching model"):
        b.pipeline("PNDMScheduler")
    cfg = GenerationConfig(scheduler="FlowMatchEulerDiscreteScheduler", steps=2, guidance=3.5,
                           images_per_prompt=2, batch_size=4)  # fmt: skip
    images = generate_images(b.pipeline(cfg.scheduler), CAPTIONS[:2], cfg, tmp_path)
    assert len(images) == 4 and Image.open(images[0].path).size == (64, 64)
    again = generate_images(b.pipeline(cfg.scheduler), CAPTIONS[:1], cfg, tmp_path / "b")
    assert again[0].path.read_bytes() == images[0].path.read_bytes()  # per-image seeds


def test_textual_inversion_is_refused_for_flux(folder: Path) -> None:
    from resalign.models.embeddings import text_encoders

    with pytest.raises(UserError, match="not built for Flux"):
        text_encoders(_bundle(folder))


def test_math_attention_makes_flux_attention_twice_differentiable(folder: Path) -> None:
    b = _bundle(folder)
    nb = _batch(b, 1)
    params = [p for n, p in b.unet.named_parameters() if "attn.to_q" in n]
    for p in params:
        p.requires_grad_(True)

    def grad_norm() -> torch.Tensor:
        out = predict(b.unet, nb.noisy, nb.timesteps, nb.condition)
        grads = torch.autograd.grad((out**2).mean(), params, create_graph=True)
        return sum((g**2).sum() for g in grads)

    with pytest.raises(RuntimeError, match="not implemented"):  # the fused CPU kernel
        torch.autograd.grad(grad_norm(), params)
    with math_attention(b.unet):
        second = torch.autograd.grad(grad_norm(), params)
    assert all(torch.isfinite(s).all() for s in second)
    # the rotary-embedding processor is kept (a plain AttnProcessor would drop it)
    assert {type(p).__name__ for p in b.unet.attn_processors.values()} == {"FluxAttnProcessor"}


@pytest.mark.fast
def test_flux_spec_fields_and_errors() -> None:
    from pydantic import ValidationError

    m = ModelSpec(family="flux", pretrained="black-forest-labs/FLUX.1-dev")
    assert m.flow_matching and m.training_guidance == 3.5 and m.resolution is None
    ts = m.timestep_sampling
    assert ts is not None and (ts.kind, ts.resolution_shift) == ("uniform", True)
    with pytest.raises(ValidationError, match="multiple of 16"):
        ModelSpec(family="flux", pretrained="x/y", resolution=72)
    with pytest.raises(ValidationError, match="for family flux"):
        ModelSpec(family="sd3", pretrained="x/y", resolution=1024)
    # the new fields stay out of other families' dumps (their node keys)
    sd3 = ModelSpec(family="sd3", pretrained="x/y").model_dump()
    assert "resolution" not in sd3 and "training_guidance" not in sd3
    assert "resolution_shift" not in sd3["timestep_sampling"]


def test_full_profile_has_flux1_dev_widths() -> None:
    """--rehearse-profile full: FLUX.1-dev's widths (built on the meta device: no memory)."""
    from diffusers import FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from resalign.rehearse import FLUX1_DEV_TRANSFORMER, flux_configs

    cfg = flux_configs("full")
    with torch.device("meta"):
        t = FluxTransformer2DModel(**cfg["transformer"])
        t5 = T5EncoderModel(T5Config(vocab_size=32128, **cfg["t5"]))
    assert t.inner_dim == 3072 and t.config.guidance_embeds
    for key in ("in_channels", "attention_head_dim", "num_attention_heads",
                "joint_attention_dim", "pooled_projection_dim"):  # fmt: skip
        assert t.config[key] == FLUX1_DEV_TRANSFORMER[key], key
    assert t5.config.d_model == 4096 and t5.config.d_ff == 10240
    assert cfg["clip"]["hidden_size"] == 768 and cfg["vae"]["latent_channels"] == 16


def test_gradient_checkpointing_gives_the_same_hvp(folder: Path) -> None:
    """The memory lever the HVPs use (block checkpointing that rebinds the substituted
    parameters) on Flux's double- and single-stream blocks: the Hessian-vector product of the
    denoising loss through the unlearning Denoiser equals the one without checkpointing."""
    from resalign.algorithms import memory
    from resalign.algorithms.objectives import denoise_loss

    b = _bundle(folder)
    nb = _batch(b, 2)
    names = [n for n, _ in b.unet.named_parameters() if ".attn.to_q." in n or "proj_mlp" in n]
    base = dict(b.unet.named_parameters())
    v = {n: torch.randn(base[n].shape, generator=torch.Generator().manual_seed(i))
         for i, n in enumerate(names)}  # fmt: skip
    den = Denoiser(b.unet, b.objective, {})

    def hvp() -> list[torch.Tensor]:
        params = {n: base[n].detach().clone().requires_grad_(True) for n in names}
        with math_attention(b.unet):
            loss = denoise_loss(den, params, nb)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            dot = sum((g * v[n]).sum() for g, n in zip(grads, names))
            return list(torch.autograd.grad(dot, list(params.values())))

    plain = hvp()
    memory.enable_gradient_checkpointing(b.unet)
    try:
        checkpointed = hvp()
    finally:
        memory.disable_gradient_checkpointing(b.unet)
    assert any(p.abs().max() > 0 for p in plain)
    for p, c in zip(plain, checkpointed):
        torch.testing.assert_close(c, p, rtol=1e-5, atol=1e-7)
