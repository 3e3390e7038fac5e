"""The benchmark's architectures (``resalign bench sd``, :mod:`.sd`): the published LoRA
and meta-learning settings it measures, and each architecture's denoiser with random weights
(:func:`prepare`)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PUBLISHED = {
    "rank": 4,
    "targets": ["to_q", "to_k", "to_v", "to_out.0"],
    "samples_per_step": 3,
    "iterations": 5,
    "gamma": 1.0,
    "beta": 0.8,
    "meta_rate": 0.3,
    "alpha": 1.6,
    "harm_batch": 1,
    "retain_batch": 4,
    "inner_batch": 1,
    "lr": [1e-4, 1e-5, 1e-6],
    "steps": [5, 10, 20, 30],
    "optimizer": ["sgd", "adam"],
    "max_norm": 0.2,
    "divergence_ratio": 1.0,
    "retries": 5,
}


@dataclass
class BenchModel:
    """What an outer step needs from a benchmark architecture: the denoiser (a UNet or a
    flow-matching transformer) carrying its trainable LoRA, its training objective (a
    training scheduler or a :class:`~resalign.models.diffusion.FlowMatchObjective`), the
    conditioning ``condition(n, generator, device)`` of ``n`` random captions shaped as the
    architecture's text encoders produce it, its latent channels, and (``published``) the
    second frozen copy made before the LoRA."""

    arch: str
    denoiser: Any
    selection: Any
    objective: Any
    condition: Any
    channels: int
    original: Any = None


UNET_ARCHS = ("sd14", "sdxl", "tiny")
# the flow-matching transformers: the toy rehearsal's (sd3-toy, flux-toy) and the tiny
# family's SD3-shaped model (sd3-tiny, test size)
FLOW_ARCHS = ("sd3-toy", "flux-toy", "sd3-tiny")
ARCH_CHOICES = UNET_ARCHS + FLOW_ARCHS


def prepare(
    arch: str,
    *,
    seed: int = 0,
    device: str = "cpu",
    latent: int = 8,
    second_copy: bool = False,
) -> BenchModel:
    """``arch``'s denoiser with random weights under ``seed`` and its published LoRA (rank 4,
    published init); the method applies the memory levers of its spec.

    UNets (``sd14``, ``sdxl``, ``tiny``: :func:`resalign.models.sd_arch.build_unet`): LoRA on
    to_q/to_k/to_v/to_out.0, SD's DDPM training schedule, conditioning shaped by
    :func:`~resalign.models.sd_arch.conditioning`. Flow-matching transformers at the toy
    rehearsal's widths (``sd3-toy``: :func:`resalign.rehearse.build_sd3_toy_pipeline`,
    SD 3.5 Medium's block types; ``flux-toy``: :func:`resalign.rehearse.build_flux_pipeline`
    of ``flux_configs("toy")``, FLUX.1-dev's): the pipeline is built, turned into the
    bundle a run trains (:func:`~resalign.models.loading.bundle_from_pipeline`, with the
    family's defaults of ``model``: LoRA targets, timestep sampling, Flux's training
    guidance and resolution shift at ``latent`` × the VAE's scale), and its text encoders
    are used once to shape the conditioning, then dropped."""
    import torch

    from ..models.trainable import apply_trainable

    gen = torch.Generator().manual_seed(seed)
    if arch in UNET_ARCHS:
        from ..algorithms.toy import toy_scheduler
        from ..models.sd_arch import build_unet, conditioning

        denoiser = build_unet(arch, seed=seed, device=device)
        targets = PUBLISHED["targets"]
        objective: Any = toy_scheduler()  # SD's DDPM training schedule (scaled_linear)
        channels = int(denoiser.config.in_channels)

        def condition(n: int, g: Any, dev: str) -> dict[str, Any]:
            return conditioning(arch, n, generator=g, device=dev)

    elif arch in FLOW_ARCHS:
        denoiser, objective, condition, channels, targets = _flow_parts(arch, seed, latent)
        denoiser.to(device)
    else:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCH_CHOICES)}")
    import copy

    original = copy.deepcopy(denoiser).requires_grad_(False) if second_copy else None
    sel = apply_trainable(
        denoiser, {"kind": "lora", "rank": PUBLISHED["rank"], "targets": list(targets)}, gen
    )
    denoiser.to(device=device, dtype=torch.float32)
    return BenchModel(arch, denoiser, sel, objective, condition, channels, original)


def _flow_parts(arch: str, seed: int, latent: int) -> tuple[Any, Any, Any, int, list[str]]:
    """(transformer, objective, condition, latent channels, LoRA targets) of a toy
    flow-matching architecture (:func:`prepare`)."""
    import torch

    from ..models.loading import bundle_from_pipeline
    from ..models.tiny import build_tiny_sd3_pipeline
    from ..rehearse import build_flux_pipeline, build_sd3_toy_pipeline, flux_configs
    from ..spec.schema.model import ModelSpec

    with tempfile.TemporaryDirectory(prefix="resalign-bench-tok-") as tmp:
        if arch == "flux-toy":
            pipe = build_flux_pipeline(flux_configs("toy"), Path(tmp), seed=seed)
            ms = ModelSpec(family="flux", pretrained=f"bench/{arch}")
        elif arch == "sd3-toy":
            pipe = build_sd3_toy_pipeline(Path(tmp), seed=seed)
            ms = ModelSpec(family="sd3", pretrained=f"bench/{arch}")
        else:
            ms = ModelSpec(family="tiny", tiny={"architecture": "sd3"})
            pipe = build_tiny_sd3_pipeline(ms.tiny, seed)
        family = ms.family
        # ms: the defaults a spec of this family gets (LoRA targets, timestep sampling,
        # Flux's training guidance)
        assert ms.timestep_sampling is not None
        bundle = bundle_from_pipeline(
            pipe,
            family,
            timestep_sampling=ms.timestep_sampling.model_dump(),
            resolution=latent * int(pipe.vae_scale_factor),
            guidance=ms.training_guidance,
        )
        shape = bundle.encode_condition(["a"])
    channels = int(pipe.vae.config.latent_channels)
    denoiser, objective = bundle.unet, bundle.objective
    del pipe, bundle  # the VAE and text encoders take no part in an outer step

    def condition(n: int, g: Any, dev: str) -> dict[str, Any]:
        # random tensors shaped as the encoders' (sequence and pooled); guidance as trained
        return {
            k: v.expand(n).clone().to(dev)
            if k == "guidance"
            else torch.randn((n, *v.shape[1:]), generator=g).to(dev)
            for k, v in shape.items()
        }

    return denoiser.requires_grad_(False), objective, condition, channels, ms.trainable.targets
