"""``family: sd3`` through the path, on a tiny random SD3 pipeline built in-process (an
``SD3Transformer2DModel`` of two joint blocks, two ``CLIPTextModelWithProjection``, a
``T5EncoderModel``, an ``AutoencoderKL``) and saved in the diffusers layout: loading (folder,
hub id from the local cache, single file's error path), the conditioning against the
pipeline's own ``encode_prompt``, the published LoRA targets, LoRA and merged outputs loaded
by ``StableDiffusion3Pipeline``, generation, the math-attention switch the HVPs need, and a
spec run unlearn → attack → evaluate → report through the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from resalign.algorithms.objectives import EncodedPairs, noise_batch
from resalign.errors import UserError
from resalign.models.attention import math_attention
from resalign.models.bundle import t5_sequence_length
from resalign.models.diffusion import FlowMatchObjective
from resalign.models.loading import (
    load_pipeline,
    load_pretrained,
    load_row,
    resolve_pretrained,
    write_model_json,
)
from resalign.models.saving import save_lora, save_merged_unet, save_trainable
from resalign.models.tiny import write_tiny_pipeline
from resalign.models.trainable import apply_trainable
from resalign.spec.schema.model import ModelSpec, TinyModelSpec

TINY = TinyModelSpec(
    architecture="sd3",
    cross_attention_dim=16,
    attention_head_dim=8,
    text_hidden_size=8,
    text_layers=1,
    max_length=12,
    latent="vae",
    in_channels=3,
)
CAPTIONS = ["a handwritten digit zero", "a photo of a cat", ""]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_pipeline(tmp_path_factory.mktemp("sd3") / "tiny-sd3", "sd3", tiny=TINY)


def _bundle(folder: Path) -> Any:
    return load_pretrained(ModelSpec(family="sd3", pretrained=str(folder)))


def _batch(bundle: Any, seed: int = 0) -> Any:
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    pairs = EncodedPairs.encode(bundle, images, CAPTIONS)
    return noise_batch(pairs, bundle.objective, torch.Generator().manual_seed(seed))


def test_folder_loads_with_flow_objective_and_the_pipelines_conditioning(folder: Path) -> None:
    assert (folder / "transformer").is_dir() and (folder / "text_encoder_3").is_dir()
    b = _bundle(folder)
    assert b.layout == "sd3" and b.family == "sd3" and b.resolution == 8
    assert isinstance(b.objective, FlowMatchObjective) and b.objective.sampling == "logit_normal"
    assert type(b.unet).__name__ == "SD3Transformer2DModel"
    cond = b.encode_condition(CAPTIONS)
    pipe = b.pipeline("FlowMatchEulerDiscreteScheduler")
    n = t5_sequence_length(b.tokenizer_3)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            CAPTIONS, CAPTIONS, CAPTIONS, do_classifier_free_guidance=False, max_sequence_length=n
        )
    assert cond["encoder_hidden_states"].shape == (3, 12 + n, 16)  # CLIP tokens + T5 tokens
    assert torch.equal(cond["encoder_hidden_states"], embeds)
    assert torch.equal(cond["pooled_projections"], pooled)


def test_hub_id_and_single_file_paths(folder: Path, tmp_path: Path, monkeypatch: Any) -> None:
    import shutil

    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--test-org--tiny-sd3"
    shutil.copytree(folder, repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    source = resolve_pretrained("test-org/tiny-sd3")
    assert source["id"] == "test-org/tiny-sd3" and source["path"].endswith(rev)
    assert load_pretrained(ModelSpec(family="sd3", pretrained="test-org/tiny-sd3")).layout == "sd3"
    bad = tmp_path / "sd3.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="could not load single-file checkpoint"):
        load_pipeline(resolve_pretrained(str(bad)), "sd3")


def test_lora_and_merged_outputs_load_in_stable_diffusion_3_pipeline(
    folder: Path, tmp_path: Path
) -> None:
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    b = _bundle(folder)
    nb = _batch(b)
    spec = ModelSpec(family="sd3", pretrained=str(folder))
    sel = apply_trainable(b.unet, spec.trainable, torch.Generator().manual_seed(0))
    # the published SD3 recipe: q/k/v/out of the image stream and add_q/k/v/to_add_out of
    # the text stream in every joint block; the last block is context-pre-only (no to_add_out)
    wrapped = sorted({n.split(".lora_")[0] for n in sel.names})
    assert len(wrapped) == 8 + 7
    assert "transformer_blocks.0.attn.to_add_out" in wrapped
    assert "transformer_blocks.1.attn.to_add_out" not in wrapped
    with torch.no_grad():
        want = b.unet(nb.noisy, timestep=nb.timesteps, **nb.condition).sample
    save_lora(b.unet, tmp_path / "lora")
    save_merged_unet(b.unet, tmp_path / "unet")
    save_trainable(b.unet, tmp_path / "trainable.safetensors", sel.names)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    with torch.no_grad():
        base = pipe.transformer(nb.noisy, timestep=nb.timesteps, **nb.condition).sample
    pipe.load_lora_weights(tmp_path / "lora")
    with torch.no_grad():
        lora = pipe.transformer(nb.noisy, timestep=nb.timesteps, **nb.condition).sample
    merged = SD3Transformer2DModel.from_pretrained(tmp_path / "unet")
    with torch.no_grad():
        got = merged(nb.noisy, timestep=nb.timesteps, **nb.condition).sample
    assert not torch.allclose(base, want)  # the published LoRA init is not a no-op
    torch.testing.assert_close(lora, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # a report row's model from the model node plus either output
    node = tmp_path / "node"
    node.mkdir()
    write_model_json(node, {"family": "sd3", "layout": "sd3", "resolution": 8,
                            "noise_schedule": {}})  # fmt: skip
    (node / "source.json").write_text(f'{{"kind": "folder", "path": "{folder}"}}')
    for row in (
        load_row(node, unet_dir=tmp_path / "unet"),
        load_row(node, trainable_file=tmp_path / "trainable.safetensors"),
    ):
        with torch.no_grad():
            out = row.unet(nb.noisy, timestep=nb.timesteps, **nb.condition).sample
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_generation_needs_a_flow_sampler(folder: Path, tmp_path: Path) -> None:
    from resalign.evaluation.generate import GenerationConfig, generate_images

    b = _bundle(folder)
    with pytest.raises(UserError, match="cannot sample a flow-matching model") as err:
        b.pipeline("PNDMScheduler")
    assert "FlowMatchEulerDiscreteScheduler" in err.value.render()
    cfg = GenerationConfig(scheduler="FlowMatchEulerDiscreteScheduler", steps=2,
                           images_per_prompt=2, batch_size=4)  # fmt: skip
    images = generate_images(b.pipeline(cfg.scheduler), CAPTIONS[:2], cfg, tmp_path)
    assert len(images) == 4 and images[0].path.is_file()
    again = generate_images(b.pipeline(cfg.scheduler), CAPTIONS[:1], cfg, tmp_path / "b")
    assert again[0].path.read_bytes() == images[0].path.read_bytes()  # per-image seeds


def test_textual_inversion_is_refused_for_sd3(folder: Path) -> None:
    from resalign.models.embeddings import text_encoders

    with pytest.raises(UserError, match="not built for SD3"):
        text_encoders(_bundle(folder))


def test_math_attention_makes_joint_attention_twice_differentiable(folder: Path) -> None:
    b = _bundle(folder)
    nb = _batch(b, 1)
    params = [p for n, p in b.unet.named_parameters() if "attn.to_q" in n]
    for p in params:
        p.requires_grad_(True)

    def grad_norm() -> torch.Tensor:
        out = b.unet(nb.noisy, timestep=nb.timesteps, **nb.condition).sample
        grads = torch.autograd.grad((out**2).mean(), params, create_graph=True)
        return sum((g**2).sum() for g in grads)

    with pytest.raises(RuntimeError, match="not implemented"):  # the fused CPU kernel
        torch.autograd.grad(grad_norm(), params)
    with math_attention(b.unet):
        second = torch.autograd.grad(grad_norm(), params)
    assert all(torch.isfinite(s).all() for s in second)
    assert type(next(iter(b.unet.attn_processors.values()))).__name__ == "JointAttnProcessor2_0"


SPEC = """
name: tiny_sd3
seed: 0
model:
  family: sd3
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
      samples_per_step: 2
      data: [retain]
      configs:
        a: {{algorithm: lora, optimizer: adam, lr: 1.0e-3, steps: 2, batch_size: 2}}
        b: {{algorithm: full, optimizer: adam, lr: 1.0e-4, steps: 1, batch_size: 2}}
baselines:
  plain: {{method: plain}}
threats:
  full: {{data: poisoned, steps: 2, eval_at: [1, 2], batch_size: 2, grad_accumulation: 1,
          precision: fp32, lr: 1.0e-3, seeds: [1]}}
  lora: {{data: retain, algorithm: lora, lora: {{rank: 2}}, steps: 2, eval_at: [2],
          batch_size: 2, grad_accumulation: 1, precision: fp32, lr: 1.0e-3, seeds: [1]}}
evaluate:
  generation: {{scheduler: FlowMatchEulerDiscreteScheduler, steps: 2, images_per_prompt: 1,
                batch_size: 10}}
  metrics: [{{kind: concept_rate}}]
"""


@pytest.mark.slow
def test_sd3_spec_runs_unlearn_attack_evaluate_report(folder: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from resalign.cli import cli

    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(folder=folder))
    store = tmp_path / "runs"
    res = CliRunner().invoke(cli, ["run", str(spec), "--store", str(store), "--no-tracking"])
    assert res.exit_code == 0, res.output
    rep = CliRunner().invoke(cli, ["report", str(spec), "--store", str(store)])
    assert rep.exit_code == 0, rep.output
    rows = [line.split("|")[1].strip() for line in rep.output.splitlines() if line.startswith("| ")]
    assert {"original", "resalign", "plain"} <= set(rows)
    # diffusers-loadable outputs of the unlearned rows: the transformer's LoRA and merge
    assert len(sorted(store.glob("unlearn/*/lora/pytorch_lora_weights.safetensors"))) == 2
    merged = sorted(store.glob("unlearn/*/unet/config.json"))
    assert len(merged) == 2 and "SD3Transformer2DModel" in merged[0].read_text()
