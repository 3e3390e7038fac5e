"""Objectives of unlearning, on pre-encoded data and a functional diffusers UNet.

- :class:`EncodedPairs`: latents ``[N,C,h,w]``, text embeddings ``[N,L,D]``, SDXL's added
  conditioning (pooled text embeddings, time ids) or SD3's pooled projections where the
  model has them, optional labels.
- :class:`Denoiser`: the denoiser's prediction (what the model's objective trains it to
  predict: ε or v for DDPM, the velocity for flow matching) at a given parameter dict
  (``torch.func.functional_call``), and of the frozen original model. Every denoiser call of
  unlearning goes through it.
- harmful losses (``neg_denoise``, ``esd``) and retain regularizers (``distill``,
  ``denoise``) registered by name, and the regularizer weight schedule.

Noising, target and squared error are the model's objective's
(:mod:`resalign.models.diffusion`: DDPM or flow matching, chosen by the model), shared with
attacks and pretraining. The squared error is written out (not ``F.mse_loss``):
forward-over-reverse HVPs need it; half-precision predictions are upcast before the
reduction.

Mixed precision (``unlearn.memory.autocast``): the :class:`Denoiser` runs its forward passes
under autocast only inside :meth:`Denoiser.low_precision` blocks (the methods open them around
the simulated fine-tuning and L_harm), or everywhere when the frozen weights are stored in half
precision (they cannot meet fp32 activations). Predictions come back in fp32.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from ..models.bundle import (
    Condition,
    as_condition,
    cat_conditions,
    condition_to,
    expand_condition,
    take_condition,
)
from ..models.diffusion import Objective, as_objective, denoiser_inputs, squared_error
from . import memory

Params = Mapping[str, Tensor]


@dataclass
class EncodedPairs:
    """Pre-encoded image–text pairs: what every loss here consumes. ``added`` is SDXL's
    ``added_cond_kwargs`` per item (``text_embeds`` ``[N,P]``, ``time_ids`` ``[N,6]``),
    ``pooled`` SD3's and Flux's ``pooled_projections`` ``[N,P]``, ``guidance`` the
    guidance-distilled Flux's embedded guidance ``[N]``; None for models without them."""

    latents: Tensor
    embeddings: Tensor
    labels: Tensor | None = None
    added: dict[str, Tensor] | None = None
    pooled: Tensor | None = None
    guidance: Tensor | None = None

    @classmethod
    def from_condition(
        cls, latents: Tensor, cond: Mapping[str, Any], labels: Tensor | None = None
    ) -> EncodedPairs:
        """From latents and a condition of :meth:`ModelBundle.encode_condition`."""
        added = cond.get("added_cond_kwargs")
        return cls(
            latents,
            cond["encoder_hidden_states"],
            labels,
            dict(added) if added else None,
            cond.get("pooled_projections"),
            cond.get("guidance"),
        )

    @classmethod
    def encode(
        cls,
        bundle: Any,
        images: Tensor,
        captions: list[str],
        labels: list[int] | None = None,
        chunk: int = 64,
    ) -> EncodedPairs:
        """Encode image–caption pairs with ``bundle`` (VAE latents, the UNet conditioning
        of :meth:`ModelBundle.encode_condition`), ``chunk`` items at a time."""
        parts = [
            cls.from_condition(
                bundle.encode_images(images[i : i + chunk]),
                bundle.encode_condition(list(captions[i : i + chunk])),
            )
            for i in range(0, len(captions), chunk)
        ]
        out = cls.concat(parts)
        out.labels = None if labels is None else torch.tensor(labels)
        return out

    @property
    def condition(self) -> Condition:
        """The denoiser keyword arguments of these pairs' captions."""
        return _condition(self.embeddings, self.added, self.pooled, self.guidance)

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
        added = None if self.added is None else take_condition(self.added, index)
        pooled = None if self.pooled is None else self.pooled[index]
        guidance = None if self.guidance is None else self.guidance[index]
        return EncodedPairs(
            self.latents[index], self.embeddings[index], labels, added, pooled, guidance
        )

    def sample(self, n: int, generator: torch.Generator) -> EncodedPairs:
        """``n`` items drawn uniformly with replacement (index drawn on ``generator``)."""
        idx = torch.randint(0, len(self), (n,), generator=generator)
        return self.take(idx.to(self.latents.device))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> EncodedPairs:
        lab = None if self.labels is None else self.labels.to(device)
        added = None if self.added is None else condition_to(self.added, device, dtype)
        pooled = None if self.pooled is None else self.pooled.to(device, dtype)
        guidance = None if self.guidance is None else self.guidance.to(device, dtype)
        return EncodedPairs(
            self.latents.to(device, dtype),
            self.embeddings.to(device, dtype),
            lab,
            added,
            pooled,
            guidance,
        )

    @staticmethod
    def concat(parts: list[EncodedPairs]) -> EncodedPairs:
        labels = None
        if all(p.labels is not None for p in parts):
            labels = torch.cat([p.labels for p in parts])  # type: ignore[misc]
        added = None
        if parts[0].added is not None:
            if any(p.added is None for p in parts):
                raise ValueError("cannot concatenate pairs with and without added conditioning")
            added = cat_conditions([p.added for p in parts])  # type: ignore[misc]
        pooled = None
        if parts[0].pooled is not None:
            if any(p.pooled is None for p in parts):
                raise ValueError("cannot concatenate pairs with and without pooled projections")
            pooled = torch.cat([p.pooled for p in parts])  # type: ignore[misc]
        guidance = None
        if parts[0].guidance is not None:
            if any(p.guidance is None for p in parts):
                raise ValueError("cannot concatenate pairs with and without guidance")
            guidance = torch.cat([p.guidance for p in parts])  # type: ignore[misc]
        return EncodedPairs(
            torch.cat([p.latents for p in parts]),
            torch.cat([p.embeddings for p in parts]),
            labels,
            added,
            pooled,
            guidance,
        )


def _condition(
    embeddings: Tensor,
    added: Mapping[str, Tensor] | None,
    pooled: Tensor | None = None,
    guidance: Tensor | None = None,
) -> Condition:
    cond: Condition = {"encoder_hidden_states": embeddings}
    if added is not None:
        cond["added_cond_kwargs"] = dict(added)
    if pooled is not None:
        cond["pooled_projections"] = pooled
    if guidance is not None:
        cond["guidance"] = guidance
    return cond


@dataclass
class NoisedBatch:
    """A batch with its noise and timesteps drawn: fixed so a loss on it is deterministic."""

    noisy: Tensor
    timesteps: Tensor
    target: Tensor
    embeddings: Tensor
    latents: Tensor
    added: dict[str, Tensor] | None = None
    pooled: Tensor | None = None
    guidance: Tensor | None = None

    @property
    def condition(self) -> Condition:
        """The denoiser keyword arguments of the batch's captions."""
        return _condition(self.embeddings, self.added, self.pooled, self.guidance)


def noise_batch(pairs: EncodedPairs, objective: Any, generator: torch.Generator) -> NoisedBatch:
    """Draw ε ~ N(0, I) and the timesteps on ``generator`` and noise the latents with
    ``objective`` (an :class:`~resalign.models.diffusion.Objective`, or a training scheduler
    whose objective is meant: DDPM's t ~ U{0..T−1} and ε/v target, or flow matching's
    sampled σ and velocity target)."""
    obj = as_objective(objective)
    lat = pairs.latents
    noise, t = obj.draw(lat, generator)
    noisy, target = obj.noise_and_target(lat, noise, t)
    return NoisedBatch(
        noisy, t, target, pairs.embeddings, lat, pairs.added, pairs.pooled, pairs.guidance
    )


def sq_err(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error, written out so forward-mode AD can differentiate it (half inputs
    are upcast to fp32 first: :func:`resalign.models.diffusion.squared_error`)."""
    return squared_error(a, b)


class Denoiser:
    """Prediction of the denoiser ``unet`` (a UNet, or SD3's transformer) with some
    parameters substituted; ``objective`` (an :class:`~resalign.models.diffusion.Objective`
    or a training scheduler) is how its batches are noised (:attr:`objective`).

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
        objective: Any,
        original: Params,
        autocast: str = "none",
        everywhere: bool = False,
    ):
        self.unet = unet
        self.objective: Objective = as_objective(objective)
        self.original = dict(original)
        self.autocast = autocast
        self.everywhere = everywhere and autocast != "none"
        self._low = False
        self._tied: bool | None = None  # has_tied_tensors(unet), decided at the first call

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

    def eps(
        self, params: Params, nb: NoisedBatch, cond: Tensor | Mapping[str, Any] | None = None
    ) -> Tensor:
        """The denoiser's prediction on ``nb`` at ``params`` (ε, v or the flow velocity:
        whatever the objective trains it to predict), conditioned on the batch's captions or
        on ``cond`` (text embeddings, or a full condition with SDXL's added conditioning or
        SD3's pooled projections). Called as :func:`resalign.models.diffusion.predict` calls
        it (:func:`~resalign.models.diffusion.denoiser_inputs`: the noisy latents, then
        ``timestep`` and the condition by keyword; Flux's transformer packed)."""
        kwargs = nb.condition if cond is None else as_condition(cond)
        if self._tied is None:
            self._tied = has_tied_tensors(self.unet)
        args, kwargs, finish = denoiser_inputs(self.unet, nb.noisy, nb.timesteps, kwargs)
        with memory.autocast(self.mode, nb.noisy.device):
            # untying walks every module and parameter on each call (measured: 21 ms of a
            # 86 ms call on the demo's UNet, 2.5 s of 26 s in 5 ResAlign steps); with nothing
            # tied it substitutes exactly the same tensors
            out = finish(
                functional_call(
                    self.unet, dict(params), args, kwargs, strict=False, tie_weights=self._tied
                )[0]
            )
        # fp32 out of autocast, so losses, gradients and HVPs are reduced in fp32
        return out.float() if out.dtype in memory.HALF_DTYPES else out

    @torch.no_grad()
    def eps_original(
        self, nb: NoisedBatch, cond: Tensor | Mapping[str, Any] | None = None
    ) -> Tensor:
        return self.eps(self.original, nb, cond).detach()


def has_tied_tensors(module: torch.nn.Module) -> bool:
    """Whether one parameter or buffer of ``module`` is reachable under two names (what
    ``functional_call(tie_weights=True)`` looks for on every call)."""
    seen: set[int] = set()
    named = itertools.chain(
        module.named_parameters(remove_duplicate=False),
        module.named_buffers(remove_duplicate=False),
    )
    for _, t in named:
        if id(t) in seen:
            return True
        seen.add(id(t))
    return False


# --- harmful losses ----------------------------------------------------------------------


def denoise_loss(den: Denoiser, params: Params, nb: NoisedBatch) -> Tensor:
    """The diffusion training loss: MSE of the prediction against the batch's ε or v target."""
    return sq_err(den.eps(params, nb), nb.target)


def neg_denoise_loss(den: Denoiser, params: Params, nb: NoisedBatch) -> Tensor:
    """Published L_harm: the negative denoising loss on harmful pairs."""
    return -denoise_loss(den, params, nb)


def esd_target(
    den: Denoiser,
    nb: NoisedBatch,
    uncond: Tensor | Mapping[str, Any],
    negative_guidance: float,
) -> Tensor:
    """ESD target ``ε₀(x_t,∅) − η·(ε₀(x_t,c) − ε₀(x_t,∅))`` of the frozen original ε₀.

    ``uncond`` is the empty prompt's conditioning (one item: text embeddings ``[1, L, D]``
    or a condition of :meth:`ModelBundle.encode_condition`, which SDXL and SD3 need).
    Departure from ESD: x_t is a noised harmful latent, not a partial sample of the model.
    For a v-prediction or flow-matching model the same combination is taken of its
    prediction: v (DDPM's, and the flow velocity ε − x₀ = (ε − x_t)/(1 − σ)) is affine in ε
    at fixed x_t and the combination's weights sum to one, so it is the v of the ε target.
    """
    u = expand_condition(as_condition(uncond), nb.embeddings.shape[0])
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
