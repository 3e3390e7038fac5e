"""The training objectives of the diffusion models, each implemented once for every trainer
(pretraining, attacks, unlearning's denoiser: the harmful loss, the distillation regularizer
and the simulated fine-tunes): draw noise and timesteps, noise the latents, the prediction
target, and the squared error. The model chooses its objective (:func:`objective_for`, from
its training scheduler's class):

- :class:`DDPMObjective` (the UNet families ``sd``, ``sdxl``, ``tiny``): noising and target
  are the diffusers scheduler's own ``add_noise`` and ``get_velocity``, so ε- and
  v-prediction follow the scheduler's ``prediction_type`` (SD 2.x 768 models are
  v-prediction) exactly as diffusers' training scripts do; t ~ U{0..T−1}.
- :class:`FlowMatchObjective` (the rectified-flow transformers, ``sd3``): the
  ``FlowMatchEulerDiscreteScheduler``'s sigmas, x_t = (1 − σ)·x₀ + σ·ε, velocity target
  v = ε − x₀, timesteps drawn as diffusers' ``train_dreambooth_lora_sd3.py`` draws them
  (``compute_density_for_timestep_sampling``: logit-normal by default; the index into the
  scheduler's — possibly shifted — timesteps). Departure from that script's default
  ``--precondition_outputs 1`` (EDM preconditioning, target x₀): that loss is σ²·‖v̂ − v‖²,
  a σ²-weighting of this one; the script's ``--precondition_outputs 0`` is this objective.
  Loss weight 1, as ``compute_loss_weighting_for_sd3`` gives for logit-normal and uniform.

Every draw is on a CPU ``torch.Generator`` (results do not depend on the device's RNG) and
moved to the latents' device. No loss here is ε-specific.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

HALF_DTYPES = (torch.float16, torch.bfloat16)

# The timestep samplings of diffusers' SD3 training scripts (``--weighting_scheme``);
# ``uniform`` is what they call "none" (the Flux script's default).
TIMESTEP_SAMPLINGS = ("logit_normal", "mode", "uniform")


class Objective:
    """What a trainer needs from a training objective. ``draw(latents, g)`` draws the noise,
    then the timesteps (this order is part of every trainer's reproducible stream);
    ``noise_and_target`` noises ``latents`` to ``timesteps`` and gives what the model is
    trained to predict there; ``timesteps`` are what the model is called with."""

    kind: str = ""
    scheduler: Any = None

    def draw_timesteps(self, n: int, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def noise_and_target(
        self, latents: Tensor, noise: Tensor, timesteps: Tensor
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def draw(self, latents: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """ε ~ N(0, I) shaped and typed as ``latents``, then one timestep per item."""
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
        t = self.draw_timesteps(int(latents.shape[0]), generator)
        return noise.to(latents.device), t.to(latents.device)

    def describe(self) -> dict[str, Any]:
        """The objective's settings, for ``model.json`` and statistics."""
        return {"kind": self.kind}


class DDPMObjective(Objective):
    """Denoising (DDPM) training with a diffusers DDPM-family scheduler: t ~ U{0..T−1},
    ``scheduler.add_noise``; target ε (``epsilon``) or ``scheduler.get_velocity``
    (``v_prediction``). Other prediction types are refused (no trainer supports them)."""

    kind = "ddpm"

    def __init__(self, scheduler: Any):
        kind = scheduler.config.prediction_type
        if kind not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"training scheduler prediction_type {kind!r} is not supported "
                "(epsilon, v_prediction)"
            )
        self.scheduler = scheduler
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)

    def draw_timesteps(self, n: int, generator: torch.Generator) -> Tensor:
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator)

    def noise_and_target(
        self, latents: Tensor, noise: Tensor, timesteps: Tensor
    ) -> tuple[Tensor, Tensor]:
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.scheduler.config.prediction_type == "epsilon":
            return noisy, noise
        return noisy, self.scheduler.get_velocity(latents, noise, timesteps)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "prediction_type": self.scheduler.config.prediction_type}


class FlowMatchObjective(Objective):
    """Rectified-flow (flow-matching) training with a ``FlowMatchEulerDiscreteScheduler``:
    u from ``sampling`` (``logit_normal`` with ``logit_mean``/``logit_std``, ``mode`` with
    ``mode_scale``, or ``uniform``), index ``⌊u·T⌋`` into the scheduler's timesteps (shifted
    where the scheduler shifts them), σ the scheduler's sigma there; x_t = (1 − σ)·x₀ + σ·ε,
    target v = ε − x₀. The model is called with the timestep (σ·T, as the SD3 pipeline
    calls it)."""

    kind = "flow_match"

    def __init__(
        self,
        scheduler: Any,
        sampling: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
    ):
        if sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"unknown timestep sampling {sampling!r} ({TIMESTEP_SAMPLINGS})")
        self.scheduler = scheduler
        self.sampling = sampling
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        # The training-time tables (the scheduler's own, before any set_timesteps call).
        self.timesteps = scheduler.timesteps.detach().to("cpu", torch.float32).clone()
        self.sigmas = scheduler.sigmas.detach().to("cpu", torch.float32).clone()

    def draw_timesteps(self, n: int, generator: torch.Generator) -> Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(
            weighting_scheme="none" if self.sampling == "uniform" else self.sampling,
            batch_size=n,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
            generator=generator,
        )
        # u < 1 for every scheme, so the index stays inside the table
        idx = (u * self.num_train_timesteps).long().clamp_(0, self.num_train_timesteps - 1)
        return self.timesteps[idx]

    def sigma_of(self, timesteps: Tensor) -> Tensor:
        """σ of each timestep: the scheduler's sigma at the matching table entry (as the
        training scripts' ``get_sigmas`` looks it up)."""
        table = self.timesteps.to(timesteps.device)
        idx = (timesteps.float()[:, None] - table[None, :]).abs().argmin(dim=1)
        return self.sigmas.to(timesteps.device)[idx]

    def noise_and_target(
        self, latents: Tensor, noise: Tensor, timesteps: Tensor
    ) -> tuple[Tensor, Tensor]:
        sigma = self.sigma_of(timesteps).to(latents.dtype)
        sigma = sigma.reshape(-1, *([1] * (latents.dim() - 1)))
        return (1.0 - sigma) * latents + sigma * noise, noise - latents

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "sampling": self.sampling,
            "logit_mean": self.logit_mean,
            "logit_std": self.logit_std,
            "mode_scale": self.mode_scale,
            "shift": float(self.scheduler.config.get("shift", 1.0)),
        }


def is_flow_scheduler(scheduler: Any) -> bool:
    """Whether ``scheduler`` is a flow-matching scheduler (``FlowMatch*``)."""
    return type(scheduler).__name__.startswith("FlowMatch")


def objective_for(scheduler: Any, sampling: Mapping[str, Any] | None = None) -> Objective:
    """The objective a model trains with, chosen by its training scheduler:
    :class:`FlowMatchObjective` for a ``FlowMatch*`` scheduler (``sampling``: its
    :class:`FlowMatchObjective` settings), :class:`DDPMObjective` otherwise."""
    if is_flow_scheduler(scheduler):
        return FlowMatchObjective(scheduler, **dict(sampling or {}))
    return DDPMObjective(scheduler)


def as_objective(obj: Any) -> Objective:
    """``obj`` itself if it is an :class:`Objective`, else the objective of a training
    scheduler (:func:`objective_for` with default sampling)."""
    return obj if isinstance(obj, Objective) else objective_for(obj)


def noise_and_target(
    objective: Any, latents: Tensor, noise: Tensor, timesteps: Tensor
) -> tuple[Tensor, Tensor]:
    """``(x_t, target)`` of ``objective`` (an :class:`Objective` or a training scheduler)."""
    return as_objective(objective).noise_and_target(latents, noise, timesteps)


def predict(model: Any, noisy: Tensor, timesteps: Tensor, cond: Mapping[str, Any]) -> Tensor:
    """The denoiser's prediction: ``model(noisy, timestep=t, **cond)`` (a diffusers UNet or
    SD3 transformer: both take the noisy latents first and ``timestep`` by keyword)."""
    return model(noisy, timestep=timesteps, **cond, return_dict=False)[0]


def squared_error(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error, written out (``torch.func.jvp`` over ``grad`` fails on
    ``F.mse_loss``). Half-precision inputs are upcast to fp32 before the reduction; fp32
    and fp64 keep their dtype (float64 tests stay float64)."""
    p = prediction.float() if prediction.dtype in HALF_DTYPES else prediction
    t = target.float() if target.dtype in HALF_DTYPES else target
    diff = p - t
    return (diff * diff).mean()
