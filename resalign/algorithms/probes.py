"""Cheap diagnostics of one model that might predict its resurgence (issue 26): how far its
UNet moved from the original, and the harmful loss's value, gradient and curvature there.

Every quantity is over all UNet parameters (for a LoRA row: the merged weights), so models
of every method and trainable selection are measured in the same space.

- :func:`weight_distance`: ‖θ − θ₀‖ / ‖θ₀‖, globally and per block type
  (:func:`block_type`: attention, resnet, other).
- :func:`probe_batch`: a fixed batch of the harmful data (a seeded order, cycled to
  ``batch_size``) noised by the one objective (:func:`resalign.algorithms.objectives.noise_batch`)
  with noise and timesteps from the seed: the same batch for every model of a study.
- :func:`harmful_probes`: on that batch, the harmful loss (the objective's own
  :func:`~resalign.algorithms.objectives.denoise_loss`), its gradient norm, the Hessian's
  eigenvalue of largest magnitude (:func:`resalign.algorithms.hypergrad.power_iteration` on
  :func:`~resalign.algorithms.hypergrad.make_hvp`) and a Hutchinson trace estimate
  (:func:`hutchinson_trace`).

Departure from ResAlign's analysis: its sharpness argument is about the harmful loss after
fine-tuning; here the curvature is measured at the model itself, before any fine-tuning
(a cheap property of the unlearned model alone, which is what a user could check).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..models.attention import math_attention
from .hypergrad import HVP, make_hvp, power_iteration, tensors_norm
from .objectives import Denoiser, EncodedPairs, NoisedBatch, denoise_loss, noise_batch

BLOCK_TYPES = ("attention", "resnet", "other")
HARMFUL_QUANTITIES = ("harmful_loss", "harmful_grad_norm", "lambda_max", "hessian_trace")


def block_type(name: str) -> str:
    """The block type of a diffusers UNet parameter: ``attention`` (transformer blocks:
    self/cross attention, their norms and feed-forward), ``resnet``, else ``other`` (conv
    in/out, time embedding, up/down samplers)."""
    parts = name.split(".")
    if "attentions" in parts:
        return "attention"
    if "resnets" in parts:
        return "resnet"
    return "other"


def weight_distance(
    params: Iterable[tuple[str, Tensor]], original: Mapping[str, Tensor]
) -> dict[str, float]:
    """``weight_distance`` = ‖θ − θ₀‖ / ‖θ₀‖ over every tensor of ``params`` (name, tensor),
    and ``weight_distance.<type>`` the same over each :func:`block_type`'s tensors (float64
    sums). A name missing from ``original`` is an error: the two are not the same
    architecture."""
    diff = dict.fromkeys(("all", *BLOCK_TYPES), 0.0)
    base = dict.fromkeys(("all", *BLOCK_TYPES), 0.0)
    with torch.no_grad():
        for name, p in params:
            if name not in original:
                raise KeyError(f"parameter {name!r} is not in the original model")
            p0 = original[name].to(p.device, torch.float64)
            d = float(((p.double() - p0) ** 2).sum())
            b = float((p0**2).sum())
            for k in ("all", block_type(name)):
                diff[k] += d
                base[k] += b
    out = {"weight_distance": math.sqrt(diff["all"] / base["all"]) if base["all"] else 0.0}
    for k in BLOCK_TYPES:
        if base[k] > 0:
            out[f"weight_distance.{k}"] = math.sqrt(diff[k] / base[k])
    return out


def probe_batch(pairs: EncodedPairs, scheduler: Any, batch_size: int, seed: int) -> NoisedBatch:
    """``batch_size`` items of ``pairs`` in an order drawn from ``seed`` (every item once
    before any repeats), noised with noise and timesteps drawn from the same generator by
    :func:`~resalign.algorithms.objectives.noise_batch`. Depends only on the data, the
    scheduler and the seed, so every model probed with them sees the same batch."""
    g = torch.Generator().manual_seed(int(seed))
    n = len(pairs)
    rounds = -(-int(batch_size) // n)
    idx = torch.cat([torch.randperm(n, generator=g) for _ in range(rounds)])[: int(batch_size)]
    return noise_batch(pairs.take(idx.to(pairs.latents.device)), scheduler, g)


def hutchinson_trace(
    hvp: HVP, like: Sequence[Tensor], samples: int, generator: torch.Generator
) -> tuple[float, float]:
    """Hutchinson's estimate of tr H: the mean of vᵀHv over ``samples`` Rademacher vectors v
    (entries ±1, drawn on ``generator``), with its standard error (sample standard deviation
    / √samples; nan for one sample). Unbiased; its variance is 2(‖H‖²_F − Σ H_ii²) per
    sample."""
    vals = []
    for _ in range(int(samples)):
        v = [
            (torch.randint(0, 2, t.shape, generator=generator) * 2 - 1).to(t.device, t.dtype)
            for t in like
        ]
        hv = hvp(v)
        vals.append(float(sum(float((a.double() * b.double()).sum()) for a, b in zip(v, hv))))
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, math.nan
    var = sum((x - mean) ** 2 for x in vals) / (len(vals) - 1)
    return mean, math.sqrt(var / len(vals))


def harmful_probes(
    unet: torch.nn.Module,
    scheduler: Any,
    batch: NoisedBatch,
    quantities: Sequence[str],
    *,
    seed: int,
    power_iterations: int | None = None,
    power_tol: float | None = None,
    hutchinson_samples: int | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """The harmful quantities asked for (of :data:`HARMFUL_QUANTITIES`) of ``unet`` on
    ``batch``, as ``(values, info)``. ``values``: ``harmful_loss`` (the denoising loss),
    ``harmful_grad_norm`` (‖∇L‖ over every UNet parameter), ``lambda_max`` (the eigenvalue of
    ∇²L of largest magnitude, signed, from ``power_iterations`` products at most, start vector
    from ``seed``), ``hessian_trace`` (Hutchinson, ``hutchinson_samples`` vectors from
    ``seed`` + 1). ``info``: ``lambda_max_hvps`` (products spent), ``hessian_trace_se``,
    ``parameters``. The settings of a quantity asked for must be given (the spec's
    ``probes`` block holds their defaults). The Hessian products run the UNet's attention on the math path (double backward)."""
    need = {"lambda_max": (power_iterations, power_tol), "hessian_trace": (hutchinson_samples,)}
    for q, settings in need.items():
        if q in quantities and any(s is None for s in settings):
            raise ValueError(f"{q} needs its settings (power_iterations, power_tol / samples)")
    names = [n for n, _ in unet.named_parameters()]
    tensors = [p.detach() for _, p in unet.named_parameters()]
    den = Denoiser(unet, scheduler, original={})

    def loss_fn(ps: Sequence[Tensor]) -> Tensor:
        return denoise_loss(den, dict(zip(names, ps, strict=True)), batch)

    values: dict[str, float] = {}
    info: dict[str, float] = {"parameters": float(sum(t.numel() for t in tensors))}
    if "harmful_loss" in quantities:
        with torch.no_grad():
            values["harmful_loss"] = float(loss_fn(tensors))
    if "harmful_grad_norm" in quantities:
        leaves = [t.clone().requires_grad_(True) for t in tensors]
        with torch.enable_grad():
            grads = torch.autograd.grad(loss_fn(leaves), leaves, allow_unused=True)
        values["harmful_grad_norm"] = tensors_norm([g for g in grads if g is not None])
    if "lambda_max" in quantities or "hessian_trace" in quantities:
        with math_attention(unet):
            hvp = make_hvp(loss_fn, tensors)
            if "lambda_max" in quantities:
                lam, spent = power_iteration(
                    hvp,
                    tensors,
                    int(power_iterations),
                    torch.Generator().manual_seed(int(seed)),
                    tol=float(power_tol),
                )
                values["lambda_max"] = lam
                info["lambda_max_hvps"] = float(spent)
            if "hessian_trace" in quantities:
                tr, se = hutchinson_trace(
                    hvp,
                    tensors,
                    int(hutchinson_samples),
                    torch.Generator().manual_seed(int(seed) + 1),
                )
                values["hessian_trace"] = tr
                info["hessian_trace_se"] = se
    return values, info


__all__ = [
    "BLOCK_TYPES",
    "HARMFUL_QUANTITIES",
    "block_type",
    "harmful_probes",
    "hutchinson_trace",
    "probe_batch",
    "weight_distance",
]
