"""LoRA and merged-UNet outputs load in plain diffusers and reproduce the trained model."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from resalign.models.loading import (
    apply_trained_tensors,
    load_row,
    load_state_file,
    write_model_json,
)
from resalign.models.saving import merged_unet, save_lora, save_merged_unet, save_trainable
from resalign.models.tiny import build_tiny_pipeline
from resalign.models.trainable import apply_trainable
from resalign.spec.schema.model import NoiseScheduleSpec, TinyModelSpec

TINY = TinyModelSpec(
    block_out_channels=[16, 32], max_length=16, cross_attention_dim=16, text_hidden_size=16
)
NOISE = NoiseScheduleSpec()


def _trained(alpha: float | None):
    """A tiny pipeline whose UNet carries a rank-2 LoRA with random, clearly non-zero weights
    (alpha ≠ rank to check that the scale survives the round trip)."""
    pipe = build_tiny_pipeline(TINY, NOISE, seed=0)
    apply_trainable(
        pipe.unet,
        {
            "kind": "lora",
            "rank": 2,
            "alpha": alpha,
            "targets": ["to_q", "to_k", "to_v", "to_out.0"],
        },
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pipe.unet.eval()
    return pipe


def _eps(unet, text_encoder, tokenizer):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 8, 8, generator=g)
    ids = tokenizer(
        ["a handwritten digit zero", "b"],
        padding="max_length",
        max_length=16,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        emb = text_encoder(ids)[0]
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=emb).sample


def test_lora_and_merged_reload_in_plain_diffusers(tmp_path):
    pipe = _trained(alpha=4.0)
    base_folder = tmp_path / "base"
    # the base model saved before training: a fresh copy without the adapter
    build_tiny_pipeline(TINY, NOISE, seed=0).save_pretrained(base_folder)
    trained = _eps(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    base = StableDiffusionPipeline.from_pretrained(base_folder, local_files_only=True)
    plain = _eps(base.unet, base.text_encoder, base.tokenizer)
    assert (trained - plain).abs().max() > 1e-2  # the LoRA changes the model

    save_lora(pipe.unet, tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    fresh = StableDiffusionPipeline.from_pretrained(base_folder, local_files_only=True)
    fresh.load_lora_weights(tmp_path / "lora")
    assert torch.allclose(_eps(fresh.unet, fresh.text_encoder, fresh.tokenizer), trained, atol=1e-5)

    save_merged_unet(pipe.unet, tmp_path / "unet")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert not any("lora" in n for n in unet.state_dict())
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert torch.allclose(_eps(unet, pipe.text_encoder, pipe.tokenizer), trained, atol=1e-5)
    # the trained model itself still has its adapter (merge worked on a copy)
    assert any("lora_" in n for n, _ in pipe.unet.named_parameters())

    # a pipeline with the merged UNet generates the trained model's images
    def gen(p):
        return p(
            "a handwritten digit zero",
            num_inference_steps=3,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        ).images

    pipe.set_progress_bar_config(disable=True)
    base.unet = unet
    base.set_progress_bar_config(disable=True)
    assert torch.allclose(gen(base), gen(pipe), atol=1e-4)


def test_trainable_file_and_row_loading(tmp_path):
    pipe = _trained(alpha=None)
    trained = _eps(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    names = [n for n, _ in pipe.unet.named_parameters() if "lora_" in n]
    save_trainable(pipe.unet, tmp_path / "trainable.safetensors", names)
    assert set(load_state_file(tmp_path / "trainable.safetensors")) == set(names)

    node = tmp_path / "model"
    build_tiny_pipeline(TINY, NOISE, seed=0).save_pretrained(node / "pipeline")
    write_model_json(
        node, {"family": "tiny", "resolution": 8, "noise_schedule": NOISE.model_dump()}
    )
    row = load_row(node, trainable_file=tmp_path / "trainable.safetensors")
    assert torch.allclose(_eps(row.unet, row.text_encoder, row.tokenizer), trained, atol=1e-5)

    save_merged_unet(pipe.unet, tmp_path / "unet")
    row2 = load_row(node, unet_dir=tmp_path / "unet")
    assert torch.allclose(_eps(row2.unet, row2.text_encoder, row2.tokenizer), trained, atol=1e-5)

    # a full-UNet state dict as .pt goes through torch.load(weights_only=True)
    full = merged_unet(pipe.unet).state_dict()
    torch.save(full, tmp_path / "unet.pt")
    fresh = build_tiny_pipeline(TINY, NOISE, seed=0)
    apply_trained_tensors(fresh.unet, load_state_file(tmp_path / "unet.pt"))
    assert torch.allclose(_eps(fresh.unet, fresh.text_encoder, fresh.tokenizer), trained, atol=1e-5)


def test_pickled_code_is_refused(tmp_path):
    import pytest

    from resalign.errors import UserError

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="weights-only"):
        load_state_file(tmp_path / "evil.pt")


def test_lora_file_bytes_do_not_depend_on_the_run(tmp_path):
    """The LoRA file is the same bytes every time it is written from the same tensors.

    safetensors orders the metadata keys from a randomly seeded hash map, so without the
    header rewrite 8 writes agree with probability 2^-7 (the kill -9 test failed on it)."""
    import json
    import struct

    from safetensors.torch import load_file

    pipe = _trained(alpha=4.0)
    blobs = set()
    for i in range(8):
        folder = save_lora(pipe.unet, tmp_path / f"lora{i}")
        blobs.add((folder / "pytorch_lora_weights.safetensors").read_bytes())
    assert len(blobs) == 1
    (raw,) = blobs
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    assert (8 + n) % 8 == 0
    # the rewritten file is still a safetensors file with the tensors peft holds
    got = load_file(tmp_path / "lora0" / "pytorch_lora_weights.safetensors")
    lora = {k: v for k, v in pipe.unet.state_dict().items() if "lora_" in k}
    assert len(got) == len(lora) > 0
    assert sorted(v.abs().sum().item() for v in got.values()) == sorted(
        v.abs().sum().item() for v in lora.values()
    )
