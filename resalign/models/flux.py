"""FLUX.1 specifics: how ``FluxTransformer2DModel`` is called, and Flux's resolution shift.

Every trainer calls the denoiser one way (:func:`resalign.models.diffusion.predict`):
latents ``[N, C, h, w]``, the scheduler's timestep (σ·1000) and the condition of
:meth:`ModelBundle.encode_condition`. The Flux transformer wants something else, and
:func:`flux_inputs` translates, as ``FluxPipeline`` and diffusers'
``train_dreambooth_lora_flux.py`` call it:

- the latents *packed*: 2×2 patches of the 16-channel latents as a sequence
  ``[N, (h/2)(w/2), 4C]`` (``FluxPipeline._pack_latents``), and the prediction unpacked back;
- ``img_ids`` ``[(h/2)(w/2), 3]``: (0, row, column) of each patch; ``txt_ids`` ``[T, 3]``:
  zeros, one row per T5 token (both 2-D, without the batch dimension diffusers deprecated);
- ``timestep`` σ = t/1000 (the transformer multiplies by 1000 itself);
- ``guidance`` (the guidance-distilled FLUX.1-dev's embedded guidance scale, ``[N]``) as the
  condition carries it.

The resolution shift (:func:`resolution_mu`, :func:`time_shift`) is the one ``FluxPipeline``
applies to its sampling sigmas: μ linear in the image's token count between
(``base_image_seq_len``, ``base_shift``) and (``max_image_seq_len``, ``max_shift``) of the
scheduler config, σ' = e^μ / (e^μ + 1/σ − 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

# FluxPipeline divides the scheduler's timesteps by this before calling the transformer.
TIMESTEP_SCALE = 1000.0
# FluxPipeline's default T5 length (FLUX.1-dev's model card; schnell is used with 256).
FLUX_MAX_SEQUENCE_LENGTH = 512


def is_flux(model: Any) -> bool:
    """Whether ``model`` is a ``FluxTransformer2DModel`` (by class name: no import)."""
    return type(model).__name__ == "FluxTransformer2DModel"


def flux_t5_length(tokenizer_2: Any) -> int:
    """The T5 token count Flux's conditioning uses (unlearning, attacks and generation)."""
    return min(FLUX_MAX_SEQUENCE_LENGTH, int(tokenizer_2.model_max_length))


def pack_latents(latents: Tensor) -> Tensor:
    """``[N, C, h, w]`` → ``[N, (h/2)(w/2), 4C]``: 2×2 patches in row-major order, each
    patch's channels C-major (``FluxPipeline._pack_latents``)."""
    n, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux latents need even height and width, got {h}x{w}")
    x = latents.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: Tensor, h: int, w: int) -> Tensor:
    """Inverse of :func:`pack_latents` for latents of height ``h`` and width ``w``."""
    n, _, d = packed.shape
    c = d // 4
    x = packed.reshape(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, c, h, w)


def image_ids(h: int, w: int, device: Any = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Position ids ``[(h/2)(w/2), 3]`` of the packed patches: (0, row, column)."""
    rows = torch.arange(h // 2, dtype=dtype).repeat_interleave(w // 2)
    cols = torch.arange(w // 2, dtype=dtype).repeat(h // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(device)


def text_ids(length: int, device: Any = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Position ids ``[length, 3]`` of the T5 tokens: zeros, as ``FluxPipeline.encode_prompt``."""
    return torch.zeros(length, 3, device=device, dtype=dtype)


def flux_inputs(
    noisy: Tensor, timesteps: Tensor, cond: Mapping[str, Any]
) -> tuple[tuple[Tensor], dict[str, Any], Callable[[Tensor], Tensor]]:
    """Positional args, keyword args and the output map of a Flux transformer call on
    unpacked ``noisy`` latents ``[N, C, h, w]`` at the scheduler's ``timesteps`` with a
    condition of :meth:`ModelBundle.encode_condition` (``encoder_hidden_states``,
    ``pooled_projections`` and, for a guidance-distilled model, ``guidance``). The output
    map unpacks the prediction to ``[N, C, h, w]``."""
    _, _, h, w = noisy.shape
    states = cond["encoder_hidden_states"]
    kwargs = dict(cond)
    kwargs["timestep"] = timesteps.to(noisy.dtype) / TIMESTEP_SCALE
    kwargs["img_ids"] = image_ids(h, w, noisy.device, noisy.dtype)
    kwargs["txt_ids"] = text_ids(int(states.shape[1]), noisy.device, noisy.dtype)
    return (pack_latents(noisy),), kwargs, lambda out: unpack_latents(out, h, w)


def image_seq_len(resolution: int, vae_scale: int) -> int:
    """The number of packed latent patches of a square image of ``resolution`` px."""
    side = 2 * (int(resolution) // (vae_scale * 2))
    return (side // 2) ** 2


def resolution_mu(seq_len: int, config: Mapping[str, Any]) -> float:
    """FluxPipeline's μ for ``seq_len`` image tokens from a scheduler ``config``
    (``calculate_shift``: linear between the base and max points, same defaults)."""
    base_len = float(config.get("base_image_seq_len", 256))
    max_len = float(config.get("max_image_seq_len", 4096))
    base_shift = float(config.get("base_shift", 0.5))
    max_shift = float(config.get("max_shift", 1.15))
    slope = (max_shift - base_shift) / (max_len - base_len)
    return float(seq_len * slope + base_shift - slope * base_len)


def time_shift(mu: float, sigma: Tensor) -> Tensor:
    """σ' = e^μ / (e^μ + 1/σ − 1) (the scheduler's exponential ``time_shift`` with exponent
    1); σ = 0 stays 0."""
    e = math.exp(mu)
    safe = sigma.clamp_min(torch.finfo(sigma.dtype).tiny)
    return torch.where(sigma > 0, e / (e + (1.0 / safe - 1.0)), torch.zeros_like(sigma))
