"""Image generation for evaluation.

Prompts × ``images_per_prompt`` images through a diffusers pipeline, with the sampling
scheduler chosen by its diffusers class name (default ``PNDMScheduler``, as SD v1.4 ships),
steps, guidance, resolution, batch size, and one of two seed policies:

- ``per_image`` (ours): image ``i`` of prompt ``p`` is drawn from its own generator seeded by
  :func:`image_seed` ``(seed, p, i)``, so any subset of the images reproduces exactly, whatever
  the batch size;
- ``global`` (published): one generator seeded once for the whole run, consumed batch after
  batch, as the paper's evaluation script does; images then depend on the batch size.

Images are written as PNG under ``out/images/`` with an ``index.jsonl`` (prompt, indices, seed)
and a sample grid ``out/grid.png``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError


@dataclass(frozen=True)
class GenerationConfig:
    """Generation settings (mirrors ``resalign.spec.schema.evaluate.GenerationSpec``)."""

    scheduler: str = "PNDMScheduler"
    steps: int = 30
    guidance: float = 7.5
    resolution: int | None = None
    images_per_prompt: int = 3
    batch_size: int = 8
    seed: int = 42
    seed_policy: str = "per_image"
    limit: int | None = None

    @classmethod
    def from_spec(cls, spec: Any) -> GenerationConfig:
        data = spec if isinstance(spec, dict) else spec.model_dump()
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class GeneratedImage:
    path: Path
    prompt: str
    prompt_index: int
    image_index: int
    seed: int | None


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """Seed of one image under the per-image policy: a hash of the three integers (63 bits)."""
    digest = hashlib.sha256(f"{seed}:{prompt_index}:{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def scheduler_class(name: str) -> type:
    """A diffusers sampling scheduler class by its exact class name (registry: diffusers)."""
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        known = sorted(
            n
            for n in dir(diffusers)
            if n.endswith("Scheduler") and not n.startswith("_") and "Flow" not in n
        )
        raise UserError(
            f"unknown sampling scheduler {name!r}",
            hint=f"use a diffusers scheduler class name, e.g. {', '.join(known[:8])}",
        )
    return cls


def make_grid(images: Sequence[Any], cols: int | None = None, cell: int = 128) -> Any:
    """A grid of PIL images (resized to ``cell`` px, nearest for small images)."""
    from PIL import Image

    if not images:
        return Image.new("RGB", (cell, cell), "white")
    cols = cols or min(len(images), max(1, math.ceil(math.sqrt(len(images)))))
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * cell, rows * cell), "white")
    for i, img in enumerate(images):
        resample = Image.NEAREST if max(img.size) < cell else Image.BICUBIC
        tile = img.convert("RGB").resize((cell, cell), resample)
        grid.paste(tile, ((i % cols) * cell, (i // cols) * cell))
    return grid


def generate_images(
    pipe: Any,
    prompts: Sequence[str],
    config: GenerationConfig,
    out: Path,
    *,
    device: str | None = None,
    grid_size: int = 16,
    progress: Any = None,
    rewrite: Callable[[str], str] | None = None,
) -> list[GeneratedImage]:
    """Generate and save the evaluation images; returns them in (prompt, image) order.

    ``rewrite`` (an embedding attack's evaluation: its ``replaces`` word → its token) maps
    each prompt to the text the pipeline is given; the results and ``index.jsonl`` keep the
    original prompt (metrics read the concept from it), and the index records the rewritten
    one as ``pipeline_prompt``."""
    import torch

    prompts = list(prompts)[: config.limit] if config.limit else list(prompts)
    if not prompts:
        raise UserError("the evaluation prompt list is empty")
    cls = scheduler_class(config.scheduler)
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    from ..models.flux import is_flux, pack_latents
    from ..models.pipelines import call_kwargs, default_resolution, denoiser_of

    denoiser = denoiser_of(pipe)
    dev = torch.device(device) if device else denoiser.device
    size = config.resolution or default_resolution(pipe)
    # SD3, Flux: the T5 length the conditioning of unlearning and attacks used
    extra: dict[str, Any] = call_kwargs(pipe)
    flux = is_flux(denoiser)

    fed = [rewrite(p) for p in prompts] if rewrite is not None else prompts
    jobs = [(p, i) for p in range(len(prompts)) for i in range(config.images_per_prompt)]
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    global_gen = None
    if config.seed_policy == "global":
        global_gen = torch.Generator(device="cpu").manual_seed(config.seed)
    elif config.seed_policy != "per_image":
        raise UserError(f"unknown seed_policy {config.seed_policy!r} (per_image or global)")

    results: list[GeneratedImage] = []
    index_lines = []
    for start in range(0, len(jobs), config.batch_size):
        chunk = jobs[start : start + config.batch_size]
        if global_gen is not None:
            generator: Any = global_gen
            seeds: list[int | None] = [None] * len(chunk)
        else:
            seeds = [image_seed(config.seed, p, i) for p, i in chunk]
            generator = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        # Latents drawn on the CPU so images do not depend on the accelerator's RNG.
        side = size // pipe.vae_scale_factor
        channels = denoiser.config.in_channels
        if flux:  # FluxPipeline takes them packed: 2x2 patches of in_channels / 4 channels
            side, channels = 2 * (size // (pipe.vae_scale_factor * 2)), channels // 4
        shape = (len(chunk), channels, side, side)
        if isinstance(generator, list):
            latents = torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generator])
        else:
            latents = torch.randn(shape, generator=generator)
        if flux:
            latents = pack_latents(latents)
        with torch.no_grad():
            out_images = pipe(
                prompt=[fed[p] for p, _ in chunk],
                num_inference_steps=config.steps,
                guidance_scale=config.guidance,
                height=size,
                width=size,
                latents=latents.to(dev, dtype=denoiser.dtype),
                generator=generator,
                output_type="pil",
                **extra,
            ).images
        for (p, i), s, img in zip(chunk, seeds, out_images):
            path = images_dir / f"p{p:05d}_i{i:02d}.png"
            img.save(path)
            results.append(GeneratedImage(path, prompts[p], p, i, s))
            entry: dict[str, Any] = {
                "file_name": path.name,
                "prompt": prompts[p],
                "prompt_index": p,
                "image_index": i,
                "seed": s,
            }
            if rewrite is not None:
                entry["pipeline_prompt"] = fed[p]
            index_lines.append(json.dumps(entry))
        if progress is not None:
            progress.advance(len(chunk))
    (images_dir / "index.jsonl").write_text("\n".join(index_lines) + "\n", encoding="utf-8")
    from PIL import Image

    sample = [Image.open(r.path) for r in results[:grid_size]]
    make_grid(sample).save(out / "grid.png")
    return results
