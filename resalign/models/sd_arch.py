"""Stable Diffusion UNet architectures written out from their published configs.

Memory and time of an outer step depend on the architecture, not on the weights, so the SD-scale
benchmark builds these UNets with random weights in-process: no download, no hub. The values
are those of the ``unet/config.json`` shipped with ``CompVis/stable-diffusion-v1-4`` and
``stabilityai/stable-diffusion-xl-base-1.0`` (keys left out take diffusers' defaults, which
match those files). ``tiny`` keeps SD v1.4's block layout at a width a test can afford.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from diffusers import UNet2DConditionModel

SD14_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}

# SD v1.4's block layout at test width: same block types, attention and conditioning path.
# GroupNorm groups keep 8 channels: with 1–2 channels per group the 1×1 bottom level
# normalises over 1–2 values, a degenerate function whose output flips with rounding
# (measured: bf16 gradients 30–800% off there, 1–1.5% with 8-channel groups; SD's groups hold
# 10–40 channels).
TINY_UNET: dict[str, Any] = {
    **SD14_UNET,
    "sample_size": 8,
    "block_out_channels": [16, 16, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 2,
    "cross_attention_dim": 16,
    "attention_head_dim": 4,
}

ARCHS: dict[str, dict[str, Any]] = {"sd14": SD14_UNET, "sdxl": SDXL_UNET, "tiny": TINY_UNET}

# Parameter counts of the published checkpoints' UNets (for the architecture check).
PUBLISHED_PARAMS = {"sd14": 859_520_964, "sdxl": 2_567_463_684}

# Text conditioning of each architecture: (tokens, hidden size, pooled size for SDXL).
TEXT_SHAPE = {"sd14": (77, 768, None), "sdxl": (77, 2048, 1280), "tiny": (8, 16, None)}


def unet_config(arch: str) -> dict[str, Any]:
    """The UNet2DConditionModel config of ``arch`` (``sd14``, ``sdxl`` or ``tiny``)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    return dict(ARCHS[arch])


def build_unet(
    arch: str,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> UNet2DConditionModel:
    """The UNet of ``arch`` with diffusers' default random initialisation under ``seed``.
    ``device="meta"`` builds shapes only (for parameter counts, no memory)."""
    config = unet_config(arch)
    if str(device) == "meta":
        with torch.device("meta"):
            return UNet2DConditionModel(**config)
    # Initialise where the model will live: random init of 860M–2.6B parameters is slow on
    # a CPU and quick on a GPU.
    where = contextlib.nullcontext() if str(device) == "cpu" else torch.device(device)
    with torch.random.fork_rng(devices=[]), where:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**config)
    return unet.to(device=device, dtype=dtype)


def conditioning(
    arch: str,
    batch: int,
    *,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Random text conditioning shaped as ``arch``'s text encoder(s) produce it: the
    ``encoder_hidden_states`` keyword, plus SDXL's ``added_cond_kwargs`` (pooled text embeds
    and the six size/crop time ids at 1024 px)."""
    tokens, hidden, pooled = TEXT_SHAPE[arch]
    kwargs: dict[str, Any] = {
        "encoder_hidden_states": torch.randn(batch, tokens, hidden, generator=generator).to(
            device=device, dtype=dtype
        )
    }
    if pooled is not None:
        time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]).repeat(batch, 1)
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=generator).to(
                device=device, dtype=dtype
            ),
            "time_ids": time_ids.to(device=device, dtype=dtype),
        }
    return kwargs
