"""Harvesting harmful pairs: the original model generates images from a prompt list when the
user has prompts but no images (as the paper does for its harmful set)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """Seed of one harvested image, a function of (seed, prompt, image) only: any subset of
    the prompts reproduces the same images."""
    return (seed * 1_000_003 + prompt_index * 1_009 + image_index) % (2**63 - 1)


def harvest(
    bundle: Any,
    prompts: list[str],
    out: Path,
    *,
    images_per_prompt: int = 1,
    steps: int = 30,
    guidance: float = 7.5,
    seed: int = 0,
    batch_size: int = 8,
    scheduler: str | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Generate ``images_per_prompt`` images per prompt with ``bundle`` and write them to
    ``out`` as an imagefolder (PNGs + ``metadata.jsonl`` with ``file_name``, ``text``,
    ``prompt_index``, ``seed``). Returns the number of images. ``scheduler`` (a diffusers
    class name) defaults to PNDM (SD v1.4's sampler) for DDPM models and to
    ``FlowMatchEulerDiscreteScheduler`` for flow-matching ones (SD3, Flux), which PNDM cannot
    sample (the SD 3.5 rehearsal found this)."""
    from ..models.diffusion import is_flow_scheduler
    from .imagefolder import write_imagefolder

    if scheduler is None:
        flow = is_flow_scheduler(bundle.noise_scheduler)
        scheduler = "FlowMatchEulerDiscreteScheduler" if flow else "PNDMScheduler"
    from ..models.pipelines import call_kwargs

    pipe = bundle.pipeline(scheduler)
    extra = call_kwargs(pipe)  # SD3, Flux: the conditioning's T5 length
    jobs = [(p, i, k) for i, p in enumerate(prompts) for k in range(images_per_prompt)]
    images: list[torch.Tensor] = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        gens = [
            torch.Generator(device="cpu").manual_seed(image_seed(seed, i, k)) for _, i, k in chunk
        ]
        with torch.no_grad():
            batch = pipe(
                [p for p, _, _ in chunk],
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=gens,
                output_type="pt",
                height=bundle.resolution,
                width=bundle.resolution,
                **extra,
            ).images
        images.append(batch.cpu() * 2 - 1)  # pipeline gives [0, 1]
        if on_batch is not None:
            on_batch(len(chunk))
    extra = [{"prompt_index": i, "seed": image_seed(seed, i, k)} for _, i, k in jobs]
    write_imagefolder(Path(out), torch.cat(images), [p for p, _, _ in jobs], extra)
    return len(jobs)
