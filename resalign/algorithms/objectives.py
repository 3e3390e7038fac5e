"""Objectives of unlearning, on pre-encoded data and a functional diffusers UNet.

- :class:`EncodedPairs`: latents ``[N,C,h,w]``, text embeddings ``[N,L,D]`` and optional labels.
- :class:`Denoiser`: noise prediction of a UNet at a given parameter dict
  (``torch.func.functional_call``), and of the frozen original model.
- harmful losses (``neg_denoise``, ``esd``) and retain regularizers (``distill``,
  ``denoise``) registered by name, and the regularizer weight schedule.

Squared errors are written out (not ``F.mse_loss``): forward-over-reverse HVPs need it; they
go through :func:`resalign.algorithms.memory.squared_error`, which upcasts half-precision
predictions before the reduction.

Mixed precision (``unlearn.memory.autocast``): the :class:`Denoiser` runs its forward passes
under autocast only inside :meth:`Denoiser.low_precision` blocks (the methods open them around
the simulated fine-tuning and L_harm), or everywhere when the frozen weights are stored in half
precision (they cannot meet fp32 activations). Predictions come back in fp32.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from . import memory

Params = Mapping[str, Tensor]


@dataclass
class EncodedPairs:
    """Pre-encoded image–text pairs: what every loss here consumes."""

    latents: Tensor
    embeddings: Tensor
    labels: Tensor | None = None

    def __post_init__(self) -> None:
        if self.latents.shape[0] != self.embeddings.shape[0]:
            raise ValueError(
                f"{self.latents.shape[0]} latents but {self.embeddings.shape[0]} embeddings"
            )
        if self.latents.shape[0] == 0:
            raise ValueError("empty set of pairs")

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def take(self, index: Tensor) -> EncodedPairs:
        labels = None if self.labels is None else self.labels[index]
        return EncodedPairs(self.latents[index], self.embeddings[index], labels)

    def sample(self, n: int, generator: torch.Generator) -> EncodedPairs:
        """``n`` items drawn uniformly with replacement (index drawn on ``generator``)."""
        idx = torch.randint(0, len(self), (n,), generator=generator)
        return self.take(idx.to(self.latents.device))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> EncodedPairs:
        lab = None if self.labels is None else self.labels.to(device)
        return EncodedPairs(self.latents.to(device, dtype), self.embeddings.to(device, dtype), lab)

    @staticmethod
    def concat(parts: list[EncodedPairs]) -> EncodedPairs:
        labels = None
        if all(p.labels is not None for p in parts):
            labels = torch.cat([p.labels for p in parts])  # type: ignore[misc]
        return EncodedPairs(
            torch.cat([p.latents for p in parts]), torch.cat([p.embeddings for p in parts]), labels
        )


@dataclass
class NoisedBatch:
    """A batch with its noise and timesteps drawn: fixed so a loss on it is deterministic."""

    noisy: Tensor
    timesteps: Tensor
    target: Tensor
    embeddings: Tensor
    latents: Tensor


def noise_batch(pairs: EncodedPairs, scheduler: Any, generator: torch.Generator) -> NoisedBatch:
    """Draw ε ~ N(0, I) and t ~ U{0..T−1} on ``generator`` and noise the latents (DDPM)."""
    lat = pairs.latents
    noise = torch.randn(lat.shape, generator=generator, dtype=lat.dtype).to(lat.device)
    t = torch.randint(
        0, int(scheduler.config.num_train_timesteps), (lat.shape[0],), generator=generator
    ).to(lat.device)
    noisy = scheduler.add_noise(lat, noise, t)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(lat, noise, t)
    else:
        target = noise
    return NoisedBatch(noisy, t, target, pairs.embeddings, lat)


def sq_err(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error, written out so forward-mode AD can differentiate it (half inputs
    are upcast to fp32 first: :func:`memory.squared_error`)."""
    return memory.squared_error(a, b)


class Denoiser:
    """Noise prediction of ``unet`` with some parameters substituted.

    ``original`` holds the substitutions that give the frozen original model: for LoRA the
    adapters' up matrices set to zero (the same UNet with the adapter switched off, no second
    copy), for full / module fine-tuning the tensors as they were before unlearning (one
    frozen copy of the trained tensors, shared by the regularizer and the ESD target).

    ``autocast`` (``"none"``, ``"bf16"``, ``"fp16"``) is the precision of the forward passes
    run inside :meth:`low_precision`; with ``everywhere`` (frozen weights stored in half) every
    forward runs under it. Outside those, forwards run in the parameters' own dtype: the
    distillation regularizer's ε_θ − ε₀ is below bf16 resolution and bf16 HVPs flip the
    divergence test (measured, docs/benchmarks.md), so they stay fp32.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        scheduler: Any,
        original: Params,
        autocast: str = "none",
        everywhere: bool = False,
    ):
        self.unet = unet
        self.scheduler = scheduler
        self.original = dict(original)
        self.autocast = autocast
        self.everywhere = everywhere and autocast != "none"
        self._low = False

    @property
    def mode(self) -> str:
        """The autocast mode the next forward runs under."""
        return self.autocast if (self._low or self.everywhere) else "none"

    @contextlib.contextmanager
    def low_precision(self) -> Iterator[None]:
        """Forward passes inside the block run under ``autocast`` (a no-op for ``"none"``)."""
        was, self._low = self._low, True
        try:
            yield
        finally:
            self._low = was

    def eps(self, params: Params, nb: NoisedBatch, embeddings: Tensor | None = None) -> Tensor:
        emb = nb.embeddings if embeddings is None else embeddings
        with memory.autocast(self.mode, nb.noisy.device):
            out = functional_call(
                self.unet,
                dict(params),
                (nb.noisy, nb.timesteps),
                {"encoder_hidden_states": emb, "return_dict": False},
                strict=False,
            )[0]
        # fp32 out of autocast, so losses, gradients and HVPs are reduced in fp32
        return out.float() if out.dtype in memory.HALF_DTYPES else out

    @torch.no_grad()
    def eps_original(self, nb: NoisedBatch, embeddings: Tensor | None = None) -> Tensor:
        return self.eps(self.original, nb, embeddings).detach()


# --- harmful losses ----------------------------------------------------------------------


def denoise_loss(den: Denoiser, params: Params, nb: NoisedBatch) -> Tensor:
    """ε-prediction MSE (the diffusion training loss)."""
    return sq_err(den.eps(params, nb), nb.target)


def neg_denoise_loss(den: Denoiser, params: Params, nb: NoisedBatch) -> Tensor:
    """Published L_harm: the negative denoising loss on harmful pairs."""
    return -denoise_loss(den, params, nb)


def esd_target(den: Denoiser, nb: NoisedBatch, uncond: Tensor, negative_guidance: float) -> Tensor:
    """ESD target ``ε₀(x_t,∅) − η·(ε₀(x_t,c) − ε₀(x_t,∅))`` of the frozen original ε₀.

    Departure from ESD: x_t is a noised harmful latent, not a partial sample of the model.
    """
    u = uncond.expand(nb.embeddings.shape[0], *uncond.shape[1:])
    e_c = den.eps_original(nb)
    e_u = den.eps_original(nb, u)
    return e_u - negative_guidance * (e_c - e_u)


def esd_loss(den: Denoiser, params: Params, nb: NoisedBatch, target: Tensor) -> Tensor:
    return sq_err(den.eps(params, nb), target)


# --- retain regularizers -----------------------------------------------------------------

Regularizer = Callable[[Denoiser, Params, NoisedBatch], Tensor]


def distill_loss(den: Denoiser, params: Params, nb: NoisedBatch) -> Tensor:
    """Published R: MSE between the trained and the frozen original noise prediction."""
    return sq_err(den.eps(params, nb), den.eps_original(nb))


REGULARIZERS: dict[str, Regularizer] = {
    "distill": distill_loss,
    "denoise": denoise_loss,
}


def regularizer(name: str) -> Regularizer:
    if name not in REGULARIZERS:
        from ..errors import UserError

        raise UserError(
            f"unknown regularizer kind {name!r}",
            hint=f"use one of: {', '.join(sorted(REGULARIZERS))}",
        )
    return REGULARIZERS[name]


def schedule_weight(
    weight: float,
    kind: str,
    final_weight: float | None,
    start_fraction: float,
    sharpness: float,
    step: int,
    total: int,
) -> float:
    """Regularizer weight at outer step ``step`` of ``total`` (0-based).

    ``constant``: ``weight``. ``sigmoid_ramp``: ``weight`` until ``start_fraction`` of training,
    then a logistic curve of slope ``sharpness`` centred on the middle of the remaining part,
    rescaled so it starts exactly at ``weight`` and reaches ``final_weight`` at the last step
    (published: 1.6 → 2.0 over the second half).
    """
    if kind == "constant" or final_weight is None or total <= 1:
        return float(weight)
    p = step / (total - 1)
    if p <= start_fraction:
        return float(weight)
    u = (p - start_fraction) / max(1.0 - start_fraction, 1e-12)

    def sig(z: float) -> float:
        return 1.0 / (1.0 + math.exp(-z))

    lo, hi = sig(-sharpness / 2), sig(sharpness / 2)
    s = (sig(sharpness * (u - 0.5)) - lo) / (hi - lo)
    return float(weight + (final_weight - weight) * s)
