"""The neighbourhood probe (``algorithm: perturb``): the row's weights moved by a given
relative radius along a seeded direction, no data (except the gradient direction) and no
optimizer.

For the perturbed set θ = (θ₁, …, θₙ) (every UNet parameter tensor, or those of the modules
``targets`` names) and a direction d = (d₁, …, dₙ) of the same shapes, each tensor moves to

    θᵢ' = θᵢ + r · ‖θᵢ‖ · dᵢ / ‖dᵢ‖,

so ‖θᵢ' − θᵢ‖ = r‖θᵢ‖ for every tensor and, the tensors being disjoint blocks, the whole move
has length ‖θ' − θ‖ = r · ‖θ‖ (exactly, in exact arithmetic): the global relative radius and
the per-tensor one are the same number. A tensor whose norm is 0 (or whose direction is 0)
does not move, and the stats say how many did not.

Why per tensor, not one global direction scaled to r‖θ‖: a global Gaussian gives each tensor
a share of the move proportional to √(its size), whatever its scale, so small-norm tensors
(biases, normalisation gains, the time embedding) would be moved far more than r relative to
themselves and large convolutions far less; and the networks' many scale invariances (a
convolution followed by GroupNorm computes the same function at any scale of its weight) make
a move meaningful only relative to the tensor it moves. Per-tensor scaling is the
filter-normalisation of loss-landscape plots (Li et al., NeurIPS 2018) at the granularity of a
tensor: departure from Li et al., who normalise per filter (output row) and leave biases and
normalisation parameters unperturbed; here every tensor, biases included, moves by r relative
to itself (one rule for convolutions, attention projections and linear layers alike).

Directions:

- ``random``: dᵢ ~ N(0, I), drawn in float32 on the CPU from ``torch.Generator`` seeded with
  the attack seed, tensor after tensor in the UNet's parameter order, so one seed gives one
  direction for every radius (the radii of one seed lie on one ray) and for every row with the
  same architecture (rows are compared along the same direction: common random numbers).
- ``gradient``: d = −∇θ L, L the denoising loss (the attack's :func:`denoise_loss`) averaged
  over ``batches`` batches of ``batch_size`` items of the threat's data; items, noise and
  timesteps from the attack seed's generator. A normalised descent step on benign data: the
  first move of a benign fine-tune, per tensor of size r‖θᵢ‖ (a per-tensor normalised gradient
  step, as LARS takes), not the raw gradient's proportions across tensors.

A row whose UNet carries a LoRA adapter is merged first: the probe moves the weights the model
computes with, not the adapter's factors (moving A and B would move their product
quadratically).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UserError

Named = Sequence[tuple[str, torch.nn.Parameter]]


@dataclass(frozen=True)
class PerturbConfig:
    """One node of a perturb threat: its one radius, direction settings and seed. No
    defaults here: they live in ``resalign.spec.schema.threats.PerturbSpec``; build with
    :meth:`from_threat`."""

    radius: float
    direction: str
    targets: tuple[str, ...] | None
    batches: int | None
    batch_size: int | None
    seed: int

    @classmethod
    def from_threat(cls, threat: Mapping[str, Any], radius: float, seed: int) -> PerturbConfig:
        """From the attack node's ``threat`` params (``algorithm``, ``perturb`` without
        ``radii``, ``data``), validated by the schema with this one radius."""
        from ..spec.schema.threats import PerturbSpec

        p = PerturbSpec.model_validate({**dict(threat["perturb"]), "radii": [float(radius)]})
        return cls(
            radius=float(radius),
            direction=p.direction,
            targets=tuple(p.targets) if p.targets is not None else None,
            batches=p.batches,
            batch_size=p.batch_size,
            seed=int(seed),
        )


def select_parameters(
    unet: torch.nn.Module, targets: Sequence[str] | None
) -> list[tuple[str, Any]]:
    """The perturbed set: every parameter of ``unet`` (``targets`` None), or the parameters of
    the modules whose name is a target or ends with ``.<target>`` (the LoRA targets' rule,
    :func:`resalign.algorithms.attack.attach_fresh_lora`). In ``named_parameters`` order."""
    named = list(unet.named_parameters())
    if targets is None:
        return named

    def hit(name: str) -> bool:
        module = name.rsplit(".", 1)[0]
        return any(module == t or module.endswith("." + t) for t in targets)

    out = [(n, p) for n, p in named if hit(n)]
    if not out:
        raise UserError(
            f"perturb.targets {list(targets)} match no module of the UNet",
            hint="use module name suffixes such as to_q, to_k, to_v, to_out.0, or leave "
            "targets out to perturb every UNet parameter",
        )
    return out


def random_direction(named: Named, seed: int) -> dict[str, torch.Tensor]:
    """A Gaussian direction, one float32 CPU tensor per parameter, from a generator seeded with
    ``seed`` and drawn in the order of ``named`` (device-independent)."""
    g = torch.Generator().manual_seed(int(seed))
    return {n: torch.randn(p.shape, generator=g, dtype=torch.float32) for n, p in named}


def gradient_direction(
    bundle: Any,
    named: Named,
    data: Any,
    *,
    batches: int,
    batch_size: int,
    seed: int,
    device: torch.device | str | None = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """Minus the gradient of the denoising loss, averaged over ``batches`` batches of
    ``batch_size`` items of ``data`` (items without replacement within an epoch, noise and
    timesteps from one generator seeded with ``seed``, as the attack's), with respect to the
    parameters ``named``; and that loss. Computed in float32."""
    from .attack import _Sampler, denoise_loss

    unet = bundle.unet
    dev = torch.device(device) if device is not None else next(unet.parameters()).device
    for module in (getattr(bundle, "text_encoder", None), getattr(bundle, "vae", None)):
        if module is not None:
            module.requires_grad_(False)
    unet.requires_grad_(False)
    for _, p in named:
        p.requires_grad_(True)
        p.grad = None
    gen = torch.Generator().manual_seed(int(seed))
    sampler = _Sampler(len(data.captions), gen)
    total = 0.0
    unet.train()  # as the attack's first step (the tiny and SD UNets have no dropout)
    for _ in range(batches):
        idx = sampler.take(batch_size)
        captions = [data.captions[i] for i in idx.tolist()]
        with torch.no_grad():
            latents = bundle.encode_images(data.images[idx].to(dev)).float()
            cond = bundle.encode_condition(captions)
        loss = denoise_loss(unet, bundle.noise_scheduler, latents, cond, gen) / batches
        loss.backward()
        total += float(loss.detach())
    unet.eval()
    out = {}
    for n, p in named:
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        out[n] = (-g.detach()).float().cpu()
        p.grad = None
        p.requires_grad_(False)
    return out, total


@dataclass
class PerturbResult:
    """What a perturbation did: the radius asked, the norms of the perturbed set before and
    of the move (float64), and the tensors it could not move."""

    radius: float
    direction: str
    tensors: int
    scalars: int
    weight_norm: float  # ‖θ‖ over the perturbed set
    distance: float  # ‖θ' − θ‖
    unmoved: list[str]  # tensors with ‖θᵢ‖ = 0 or ‖dᵢ‖ = 0
    loss: float | None = None  # direction gradient: the loss the gradient is of

    def as_dict(self) -> dict[str, Any]:
        return {
            "radius": self.radius,
            "direction": self.direction,
            "tensors": self.tensors,
            "scalars": self.scalars,
            "weight_norm": self.weight_norm,
            "distance": self.distance,
            "relative_distance": self.distance / self.weight_norm if self.weight_norm else None,
            "unmoved": list(self.unmoved),
            "loss": self.loss,
        }


def perturb_(named: Named, direction: Mapping[str, torch.Tensor], radius: float) -> PerturbResult:
    """Move each tensor of ``named`` in place to θᵢ + r‖θᵢ‖dᵢ/‖dᵢ‖ (module notes). Norms in
    float64; the step is added in the parameter's dtype. ``radius`` 0 changes nothing."""
    if radius < 0:
        raise ValueError(f"radius must be ≥ 0, not {radius}")
    weight_sq = dist_sq = 0.0
    unmoved: list[str] = []
    scalars = 0
    with torch.no_grad():
        for n, p in named:
            d = direction[n].to(device=p.device, dtype=torch.float64)
            theta = float(p.detach().double().norm())
            dnorm = float(d.norm())
            weight_sq += theta**2
            scalars += p.numel()
            if theta == 0.0 or dnorm == 0.0:
                unmoved.append(n)
                continue
            if radius == 0.0:
                continue
            before = p.detach().double().clone()
            p.add_((d * (radius * theta / dnorm)).to(p.dtype))
            dist_sq += float((p.detach().double() - before).norm()) ** 2
    return PerturbResult(
        radius=float(radius),
        direction="",
        tensors=len(named),
        scalars=scalars,
        weight_norm=weight_sq**0.5,
        distance=dist_sq**0.5,
        unmoved=unmoved,
    )


def run_perturb(
    bundle: Any,
    config: PerturbConfig,
    *,
    data: Any = None,
    device: torch.device | str | None = None,
    progress: Callable[[], None] | None = None,
) -> PerturbResult:
    """Perturb ``bundle.unet`` in place as ``config`` says (module notes): merge a LoRA
    adapter first, select the set, draw the direction (``data``: the threat's pairs, for the
    gradient direction), move. ``bundle.unet`` is then a plain UNet with the moved weights."""
    from ..models.saving import has_lora, merged_unet

    if has_lora(bundle.unet):
        bundle.unet = merged_unet(bundle.unet)
    bundle.unet.requires_grad_(False)
    named = select_parameters(bundle.unet, config.targets)
    loss = None
    if config.direction == "gradient":
        if data is None or len(data.captions) == 0:
            raise UserError("the gradient direction needs a non-empty data set")
        if config.batches is None or config.batch_size is None:
            raise ValueError("a gradient direction needs batches and batch_size (the schema's)")
        d, loss = gradient_direction(
            bundle, named, data, batches=config.batches, batch_size=config.batch_size,
            seed=config.seed, device=device,
        )  # fmt: skip
    else:
        d = random_direction(named, config.seed)
    if progress is not None:
        progress()
    result = perturb_(named, d, config.radius)
    result.direction = config.direction
    result.loss = loss
    bundle.unet.eval()
    return result
