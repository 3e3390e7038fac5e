"""The DDPM training objective, implemented once for every trainer (pretraining, attacks,
unlearning's denoiser): draw noise and timesteps, noise the latents with the training
scheduler, the prediction target, and the squared error.

Noising and the target are the diffusers scheduler's own ``add_noise`` and ``get_velocity``,
so ε- and v-prediction follow the scheduler's ``prediction_type`` (SD 2.x 768 models are
v-prediction) exactly as diffusers' training scripts do. No loss here is ε-specific.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

HALF_DTYPES = (torch.float16, torch.bfloat16)


def draw_noise(
    latents: Tensor, num_train_timesteps: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """ε ~ N(0, I) shaped and typed as ``latents``, then t ~ U{0..T−1} per item, both drawn
    on ``generator`` (a CPU generator: results do not depend on the device's RNG) and moved
    to the latents' device. The draw order (noise, then timesteps) is part of every
    trainer's reproducible stream."""
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
    t = torch.randint(0, int(num_train_timesteps), (latents.shape[0],), generator=generator)
    return noise.to(latents.device), t.to(latents.device)


def noise_and_target(
    scheduler: Any, latents: Tensor, noise: Tensor, timesteps: Tensor
) -> tuple[Tensor, Tensor]:
    """``(x_t, target)``: the latents noised to ``timesteps`` by ``scheduler.add_noise`` and
    what the UNet is trained to predict there: ε for ``epsilon``, ``scheduler.get_velocity``
    for ``v_prediction``. Other prediction types are refused (no trainer here supports
    them)."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noisy, noise
    if kind == "v_prediction":
        return noisy, scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(
        f"training scheduler prediction_type {kind!r} is not supported (epsilon, v_prediction)"
    )


def squared_error(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error, written out (``torch.func.jvp`` over ``grad`` fails on
    ``F.mse_loss``). Half-precision inputs are upcast to fp32 before the reduction; fp32
    and fp64 keep their dtype (float64 tests stay float64)."""
    p = prediction.float() if prediction.dtype in HALF_DTYPES else prediction
    t = target.float() if target.dtype in HALF_DTYPES else target
    diff = p - t
    return (diff * diff).mean()
