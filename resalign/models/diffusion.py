"""The training objectives of the diffusion models, each implemented once for every trainer
(pretraining, attacks, unlearning's denoiser: the harmful loss, the distillation regularizer
and the simulated fine-tunes): draw noise and timesteps, noise the latents, the prediction
target, and the squared error. The model chooses its objective (:func:`objective_for`, from
its training scheduler's class):

- :class:`DDPMObjective` (the UNet families ``sd``, ``sdxl``, ``tiny``): noising and target
  are the diffusers scheduler's own ``add_noise`` and ``get_velocity``, so ε- and
  v-prediction follow the scheduler's ``prediction_type`` (SD 2.x 768 models are
  v-prediction) exactly as diffusers' training scripts do; t ~ U{0..T−1}.
- :class:`FlowMatchObjective` (the rectified-flow transformers, ``sd3``, ``flux``): the
  ``FlowMatchEulerDiscreteScheduler``'s sigmas, x_t = (1 − σ)·x₀ + σ·ε, velocity target
  v = ε − x₀, timesteps drawn as diffusers' ``train_dreambooth_lora_sd3.py`` draws them
  (``compute_density_for_timestep_sampling``: logit-normal by default; the index into the
  scheduler's — possibly shifted — timesteps). Departure from that script's default
  ``--precondition_outputs 1`` (EDM preconditioning, target x₀): that loss is σ²·‖v̂ − v‖²,
  a σ²-weighting of this one; the script's ``--precondition_outputs 0`` is this objective.
  Loss weight 1, as ``compute_loss_weighting_for_sd3`` gives for logit-normal and uniform.
  Flux (``shift_mu``): diffusers' ``train_dreambooth_lora_flux.py`` draws u uniformly
  (``--weighting_scheme none``) and indexes the scheduler's table, which for FLUX.1's
  ``use_dynamic_shifting`` config is *unshifted* (σ = t/1000); FluxPipeline shifts its
  sampling sigmas by the resolution-dependent μ (:func:`resalign.models.flux.time_shift`).
  With ``shift_mu`` the drawn σ is shifted by that μ before the table lookup (the nearest
  entry, 1/1000 apart), so training sees the noise levels sampling visits (kohya's
  sd-scripts ``--timestep_sampling flux_shift`` applies the same shift to a logit-normal
  draw: ``kind: logit_normal`` with ``resolution_shift``); without it, diffusers' script
  exactly.

Every draw is on a CPU ``torch.Generator`` (results do not depend on the device's RNG) and
moved to the latents' device. No loss here is ε-specific.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
    calls it; Flux's transformer gets σ, :func:`denoiser_inputs`). ``shift_mu`` (Flux): the
    drawn σ is moved by Flux's resolution shift of that μ and snapped to the nearest table
    entry."""

    kind = "flow_match"

    def __init__(
        self,
        scheduler: Any,
        sampling: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        shift_mu: float | None = None,
    ):
        if sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"unknown timestep sampling {sampling!r} ({TIMESTEP_SAMPLINGS})")
        self.scheduler = scheduler
        self.sampling = sampling
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.shift_mu = shift_mu
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
        if self.shift_mu is None:
            return self.timesteps[idx]
        from .flux import time_shift

        shifted = time_shift(self.shift_mu, self.sigmas[idx].double()).float()
        near = (shifted[:, None] - self.sigmas[None, : len(self.timesteps)]).abs().argmin(dim=1)
        return self.timesteps[near]

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
            **({} if self.shift_mu is None else {"shift_mu": self.shift_mu}),
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


def denoiser_inputs(
    model: Any, noisy: Tensor, timesteps: Tensor, cond: Mapping[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any], Callable[[Tensor], Tensor]]:
    """``(args, kwargs, finish)`` such that ``finish(model(*args, **kwargs)[0])`` is the
    denoiser's prediction on ``noisy`` latents ``[N, C, h, w]`` at the scheduler's
    ``timesteps``: a UNet or SD3 transformer takes them as they are
    (``model(noisy, timestep=t, **cond)``); Flux's transformer packed, with position ids
    and σ (:func:`resalign.models.flux.flux_inputs`). The one place a trainer's call is
    turned into the denoiser's (:func:`predict`, the unlearning ``Denoiser``)."""
    from .flux import flux_inputs, is_flux

    if is_flux(model):
        args, kwargs, finish = flux_inputs(noisy, timesteps, cond)
    else:
        args, kwargs, finish = (noisy,), {"timestep": timesteps, **cond}, _same
    kwargs["return_dict"] = False
    return args, kwargs, finish


def _same(x: Tensor) -> Tensor:
    return x


def predict(model: Any, noisy: Tensor, timesteps: Tensor, cond: Mapping[str, Any]) -> Tensor:
    """The denoiser's prediction (:func:`denoiser_inputs`): ``model(noisy, timestep=t,
    **cond)`` for a diffusers UNet or SD3 transformer, the packed call for Flux."""
    args, kwargs, finish = denoiser_inputs(model, noisy, timesteps, cond)
    return finish(model(*args, **kwargs)[0])


def squared_error(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error, written out (``torch.func.jvp`` over ``grad`` fails on
    ``F.mse_loss``). Half-precision inputs are upcast to fp32 before the reduction; fp32
    and fp64 keep their dtype (float64 tests stay float64)."""
    p = prediction.float() if prediction.dtype in HALF_DTYPES else prediction
    t = target.float() if target.dtype in HALF_DTYPES else target
    diff = p - t
    return (diff * diff).mean()
