"""The tiny SD-shaped pipeline: real diffusers parts, identity pixel VAE, save/load round trip,
SD-layout folder loading through the real-checkpoint code path, and the missing-model error."""

from __future__ import annotations

import json

import pytest
import torch

from resalign.errors import UserError
from resalign.models.loading import (
    load_model_node,
    load_pipeline,
    load_pretrained,
    resolve_pretrained,
    write_model_json,
)
from resalign.models.tiny import (
    build_tiny_pipeline,
    caption_token_count,
    caption_words,
    write_byte_tokenizer,
)
from resalign.spec.schema.model import ModelSpec, NoiseScheduleSpec, TinyModelSpec

TINY = TinyModelSpec(block_out_channels=[16, 32], max_length=32, cross_attention_dim=16)
NOISE = NoiseScheduleSpec()


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(TINY, NOISE, seed=0)


def test_parts_are_the_sd_classes(pipe):
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, PNDMScheduler)
    assert pipe.safety_checker is None
    assert pipe.tokenizer.model_max_length == 32
    # text width 32 ≠ cross-attention width 16: diffusers' own projection bridges them
    assert pipe.unet.config.encoder_hid_dim == 32


def test_build_is_deterministic_in_seed_and_leaves_global_rng(pipe):
    state = torch.random.get_rng_state()
    again = build_tiny_pipeline(TINY, NOISE, seed=0)
    other = build_tiny_pipeline(TINY, NOISE, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    a, b, c = (p.unet.conv_in.weight for p in (pipe, again, other))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_pixel_vae_is_identity(pipe):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1
    with torch.no_grad():
        posterior = pipe.vae.encode(x).latent_dist
        assert (posterior.mean - x).abs().max() < 1e-4
        assert posterior.std.max() < 1e-6
        assert (pipe.vae.decode(x).sample - x).abs().max() < 1e-4
    assert pipe.vae.config.scaling_factor == 1.0


def test_pixel_vae_identity_for_rgb():
    p = build_tiny_pipeline(
        TinyModelSpec(in_channels=3, block_out_channels=[16], max_length=8), NOISE, 0
    )
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert (p.vae.decode(p.vae.encode(x).latent_dist.mean).sample - x).abs().max() < 2e-4


def test_tokenizer_is_byte_level_and_counts_tokens(pipe):
    tok = pipe.tokenizer
    # every character is one token, plus BOS and EOS
    assert caption_token_count(tok, "a handwritten digit zero") == len("ahandwrittendigitzero") + 2
    ids = tok(["ümlaut ok"], padding="max_length", max_length=32).input_ids[0]
    assert tok.unk_token_id not in ids[1:-1][: len("ümlaut ok")]


def test_corpus_words_become_single_tokens_and_other_text_still_tokenizes(tmp_path):
    captions = ["a handwritten digit zero", "A handwritten digit seven"]
    words = caption_words(captions)
    assert words == ["a", "digit", "handwritten", "seven", "zero"]
    tok = write_byte_tokenizer(tmp_path, 32, words)
    pieces = tok.convert_ids_to_tokens(tok("a handwritten digit seven").input_ids)
    assert pieces == [
        "<|startoftext|>", "a</w>", "handwritten</w>", "digit</w>", "seven</w>", "<|endoftext|>"
    ]  # fmt: skip
    # A word outside the corpus falls back to characters; non-ASCII round-trips.
    assert caption_token_count(tok, "a digit eight") == 2 + 1 + 1 + 5
    assert tok.decode(tok("naïve über").input_ids, skip_special_tokens=True) == "naïve über"
    # The digit words get distinct ids.
    ids = {tok(w).input_ids[1] for w in ("zero", "seven", "digit")}
    assert len(ids) == 3


def test_save_load_identical_weights_and_generates(tmp_path, pipe):
    from diffusers import StableDiffusionPipeline

    pipe.save_pretrained(tmp_path / "p")
    again = StableDiffusionPipeline.from_pretrained(tmp_path / "p", local_files_only=True)
    for mod in ("unet", "vae", "text_encoder"):
        a, b = getattr(pipe, mod).state_dict(), getattr(again, mod).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert again.tokenizer("digit").input_ids == pipe.tokenizer("digit").input_ids
    again.set_progress_bar_config(disable=True)

    def gen(p):
        return p(
            "a handwritten digit one",
            num_inference_steps=4,
            output_type="pt",
            generator=torch.Generator().manual_seed(3),
        ).images

    img = gen(again)
    assert img.shape == (1, 1, 8, 8) and torch.isfinite(img).all()
    assert torch.allclose(gen(pipe), img, atol=1e-5)


def test_model_node_bundle(tmp_path, pipe):
    pipe.save_pretrained(tmp_path / "pipeline")
    noise = NoiseScheduleSpec(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    write_model_json(
        tmp_path, {"family": "tiny", "resolution": 8, "noise_schedule": noise.model_dump()}
    )
    bundle = load_model_node(tmp_path, "cpu", "float32")
    assert bundle.resolution == 8 and bundle.family == "tiny"
    assert type(bundle.noise_scheduler).__name__ == "DDPMScheduler"
    # the spec's training schedule, not the saved sampler's
    assert bundle.noise_scheduler.config.beta_schedule == "linear"
    assert not any(p.requires_grad for p in bundle.unet.parameters())
    caps = ["a handwritten digit zero", "a handwritten digit nine"]
    emb = bundle.encode_text(caps)
    assert emb.shape == (2, 32, 32)
    # the same embeddings the pipeline computes for generation
    ref, _ = bundle.pipeline().encode_prompt(caps, "cpu", 1, False)
    assert torch.allclose(emb, ref)
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    assert (bundle.encode_images(x) - x).abs().max() < 1e-4
    with pytest.raises(UserError, match="unknown scheduler"):
        bundle.pipeline("NotAScheduler")
    ddim = bundle.pipeline("DDIMScheduler")
    assert ddim.scheduler.config.beta_schedule == "linear"


def test_sd_layout_folder_loads_through_real_checkpoint_path(tmp_path, pipe):
    """A folder in the SD layout (model_index.json, unet/, vae/, ...) goes through the same
    resolve → load_pipeline → bundle path as a real SD checkpoint."""
    folder = tmp_path / "my-sd"
    pipe.save_pretrained(folder)
    assert (folder / "model_index.json").is_file() and (folder / "unet").is_dir()
    spec = ModelSpec(family="sd", pretrained="my-sd")
    bundle = load_pretrained(spec, spec_dir=tmp_path)
    assert bundle.family == "sd" and bundle.resolution == 8
    a, b = pipe.unet.state_dict(), bundle.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the sampler config the checkpoint ships is kept for generation
    assert bundle.sampler_config["skip_prk_steps"] is True


def test_missing_hub_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError) as err:
        resolve_pretrained("nobody/no-such-model")
    text = err.value.render()
    assert "nobody/no-such-model" in text
    assert str(tmp_path / "cache") in text
    assert "huggingface-cli download nobody/no-such-model" in text


def test_missing_path_and_non_pipeline_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_pretrained("./nothing-here", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="model_index.json"):
        resolve_pretrained("empty", tmp_path)
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(UserError, match="not a checkpoint file"):
        resolve_pretrained("w.txt", tmp_path)


def test_broken_single_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a safetensors file")
    source = resolve_pretrained(str(bad))
    assert source["kind"] == "single_file"
    with pytest.raises(UserError, match="could not load single-file checkpoint"):
        load_pipeline(source, "sd")


def test_model_node_without_model_json(tmp_path):
    with pytest.raises(UserError, match="not a model node output"):
        load_model_node(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"family": "sd"}))
    with pytest.raises(UserError, match="neither"):
        load_model_node(tmp_path)
