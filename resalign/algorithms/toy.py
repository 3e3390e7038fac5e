"""Small real diffusers UNets (and an SD3 transformer) and random encoded data, for tests and
the benchmark.

Not a model family for users (that is ``resalign.models.tiny``): these builders only fix
sizes so algorithm tests run in seconds in float64.
"""

from __future__ import annotations

import torch

from .objectives import EncodedPairs

SIZES = {
    # name: (block_out_channels, norm groups, cross-attention dim)
    "tiny": ((4, 8), 2, 8),
    "small": ((16, 32), 4, 16),
    "medium": ((32, 64), 8, 32),
}


def toy_unet(
    size: str = "tiny", dtype: torch.dtype = torch.float64, seed: int = 0
) -> torch.nn.Module:
    """A ``UNet2DConditionModel`` with cross-attention, 1 channel, 8×8 samples."""
    from diffusers import UNet2DConditionModel

    widths, groups, cross = SIZES[size]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=widths,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross,
        attention_head_dim=4,
        norm_num_groups=groups,
    )
    return unet.to(dtype).eval()


def toy_scheduler(num_train_timesteps: int = 1000):  # noqa: ANN201 (a diffusers scheduler)
    """SD's training noise schedule (DDPM, scaled_linear 0.00085–0.012)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
    )


def toy_transformer(
    dtype: torch.dtype = torch.float64, seed: int = 0, qk_norm: str | None = None
) -> torch.nn.Module:
    """An SD3-shaped ``SD3Transformer2DModel`` (two joint blocks of width 8, patch 2) on
    1-channel 8×8 latents, text width 8, pooled width 8. ``qk_norm`` ``"rms_norm"`` gives
    SD 3.5's q/k norm; off by default because diffusers' ``RMSNorm`` computes its variance in
    float32 whatever the input dtype, which limits float64 finite-difference checks to
    ~1e-5 (measured: the HVP's error grew from 1e-5 to 1e-4 as the step fell 1e-3 → 1e-6)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=1,
        out_channels=1,
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=2,
        joint_attention_dim=8,
        caption_projection_dim=8,
        pooled_projection_dim=8,
        pos_embed_max_size=4,
        qk_norm=qk_norm,
    )
    return model.to(dtype).eval()


def toy_flow_scheduler(shift: float = 3.0):  # noqa: ANN201 (a diffusers scheduler)
    """SD3's training scheduler (``FlowMatchEulerDiscreteScheduler``, shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def toy_pairs(
    n: int,
    cross_dim: int,
    seed: int,
    dtype: torch.dtype = torch.float64,
    shift: float = 0.0,
    pooled_dim: int | None = None,
) -> EncodedPairs:
    """``n`` random latents [n,1,8,8] (mean ``shift``) with random 4-token embeddings (and,
    with ``pooled_dim``, random SD3 pooled projections)."""
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn((n, 1, 8, 8), generator=g, dtype=dtype) * 0.5 + shift
    emb = torch.randn((n, 4, cross_dim), generator=g, dtype=dtype)
    pooled = None
    if pooled_dim is not None:
        pooled = torch.randn((n, pooled_dim), generator=g, dtype=dtype)
    return EncodedPairs(lat, emb, pooled=pooled)


def toy_problem(trainable=None, dtype: torch.dtype = torch.float64):  # noqa: ANN201
    """The small unlearning problem the method tests share: a toy UNet with the default
    trainable selection (or ``trainable``), harmful pairs shifted away from the retain and
    benign ones, one benign fine-tuning pool, a zero unconditional embedding."""
    from ..models.trainable import apply_trainable
    from ..spec.schema.model import TrainableSpec
    from .methods import UnlearnProblem

    unet = toy_unet("tiny", dtype)
    sel = apply_trainable(unet, trainable or TrainableSpec(), torch.Generator().manual_seed(1))
    return UnlearnProblem(
        unet,
        toy_scheduler(),
        sel,
        harmful=toy_pairs(6, 8, seed=1, shift=1.0, dtype=dtype),
        retain=toy_pairs(6, 8, seed=2, dtype=dtype),
        pools={"benign": toy_pairs(6, 8, seed=3, dtype=dtype)},
        default_pool=["benign"],
        uncond=torch.zeros(1, 4, 8, dtype=dtype),
    )
