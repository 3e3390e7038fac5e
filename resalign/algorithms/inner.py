"""Simulated downstream fine-tuning (the inner loop), run functionally on parameter dicts.

The inner loop never touches the module's parameters: it starts from a parameter dict
``ψ₀ = view.start(θ)``, takes S steps of a functional optimizer on the fine-tuning loss
through ``torch.func.functional_call``, and returns ψ_S. For the Moreau hypergradient it runs
without a graph (no trajectory is kept); :func:`resalign.algorithms.hypergrad.unrolled_hypergradient`
differentiates through it for the reference.

The functional optimizers equal ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` step for step, with a
fresh state for every inner run and the standard bias correction (the published hand-written
Adam kept its state across outer steps and corrected the bias twice; see docs/algorithm.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import UserError
from .objectives import Denoiser, EncodedPairs, NoisedBatch, denoise_loss, noise_batch

Tensors = list[Tensor]


@dataclass
class FunctionalOptimizer:
    """SGD (momentum, L2 weight decay), Adam (L2) or AdamW (decoupled), as in ``torch.optim``."""

    name: str
    lr: float
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in ("sgd", "adam", "adamw"):
            raise ValueError(f"unknown optimizer {self.name!r}")

    def init(self, params: Sequence[Tensor]) -> dict[str, Any]:
        """A fresh state (the published code reused one across outer steps)."""
        st: dict[str, Any] = {"t": 0}
        if self.name in ("adam", "adamw"):
            st["m"] = [torch.zeros_like(p) for p in params]
            st["v"] = [torch.zeros_like(p) for p in params]
        elif self.momentum:
            st["buf"] = None
        return st

    def step(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], state: dict[str, Any]
    ) -> tuple[Tensors, dict[str, Any]]:
        t = state["t"] + 1
        lr, wd = self.lr, self.weight_decay
        if self.name == "sgd":
            g = [gi + wd * p if wd else gi for p, gi in zip(params, grads)]
            if self.momentum:
                buf = state["buf"]
                buf = list(g) if buf is None else [self.momentum * b + gi for b, gi in zip(buf, g)]
                g = buf
                state = {**state, "buf": buf}
            new = [p - lr * gi for p, gi in zip(params, g)]
            return new, {**state, "t": t}
        b1, b2 = self.betas
        if self.name == "adamw":
            params = [p * (1 - lr * wd) for p in params] if wd else list(params)
            g = list(grads)
        else:
            g = [gi + wd * p if wd else gi for p, gi in zip(params, grads)]
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(state["m"], g)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(state["v"], g)]
        bc1 = 1 - b1**t
        bc2_sqrt = (1 - b2**t) ** 0.5
        step_size = lr / bc1
        new = [
            p - step_size * mi / (_sqrt(vi) / bc2_sqrt + self.eps)
            for p, mi, vi in zip(params, m, v)
        ]
        return new, {"t": t, "m": m, "v": v}


def _sqrt(v: Tensor) -> Tensor:
    """√v whose derivative at v = 0 is 0 instead of autograd's 1/(2√0) = ∞.

    Forward values are unchanged. Differentiated through (unrolled hypergradients), Adam's
    √v̂ at an entry whose gradients were all exactly 0 has v = m = 0; torch's ∞ times the
    0 of dv/dg is NaN, which then spreads to every tensor through the UNet's second derivatives
    (measured: the digits demo's text-pooling key bias has an exactly-zero gradient under math
    attention, and one unrolled Adam step turned all 299 hypergradient tensors NaN). The true
    contribution of that path is −m·(d√v/dg)/(√v̂ + ε)², which is 0 there because m = 0 (and
    d√v/dg stays bounded: √((1 − β₂)g²) = √(1 − β₂)·|g|), so the derivative taken here is exact.
    Where (1 − β₂)g² underflows while g ≠ 0 (|g| ≲ 1e-21 in float32) the term dropped is
    −m·√(1 − β₂)·sign(g)/(√v̂ + ε)² with |m| ≲ |g|: ≲ 3e-7 per unit of upstream gradient,
    against the m path's (1 − β₁)/ε ≈ 1e7.
    """
    if not v.requires_grad:
        return v.sqrt()
    pos = v > 0
    return torch.where(pos, torch.where(pos, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


# --- which parameters the inner loop fine-tunes ---------------------------------------------


def _lora_modules(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {
        name: mod
        for name, mod in unet.named_modules()
        if hasattr(mod, "lora_A") and hasattr(mod, "base_layer") and len(mod.lora_A) > 0
    }


@dataclass
class InnerView:
    """The map ψ₀ = g(θ) from the outer trained tensors θ to the inner-trained tensors ψ.

    ``identity``: the inner loop fine-tunes θ itself (LoRA ``own``, as published, or full
    fine-tuning of a fully trained UNet). ``full``: the inner loop fine-tunes every UNet weight;
    with LoRA θ the adapted layers enter merged (W₀ + s·B·A) and the adapter is zeroed, so the
    hypergradient reaches θ through the merge (the published code instead merged a stale LoRA
    and re-factorised the change by SVD). ``fixed`` are substitutions held constant.
    """

    kind: str
    names: list[str]
    theta_names: list[str]
    fixed: dict[str, Tensor] = field(default_factory=dict)
    _merge: list[tuple[str, str, str, float]] = field(default_factory=list)
    _base: dict[str, Tensor] = field(default_factory=dict)

    def start(self, theta: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """ψ₀ = g(θ): differentiable in θ."""
        if self.kind == "identity":
            return {n: theta[n] for n in self.names}
        out = {n: theta[n] if n in theta else self._base[n] for n in self.names}
        for w, a, b, scale in self._merge:
            out[w] = self._base[w] + scale * (theta[b] @ theta[a])
        return out

    def pullback(self, theta: Mapping[str, Tensor], x: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``(∂g/∂θ)ᵀ x``: carry an inner-space gradient back to θ."""
        if self.kind == "identity":
            return {n: x[n] for n in self.theta_names}
        leaves = {n: theta[n].detach().requires_grad_(True) for n in self.theta_names}
        with torch.enable_grad():
            psi = self.start(leaves)
            keys = [k for k in self.names if psi[k].requires_grad]
            grads = torch.autograd.grad(
                [psi[k] for k in keys],
                list(leaves.values()),
                grad_outputs=[x[k] for k in keys],
                allow_unused=True,
            )
        return {
            n: torch.zeros_like(theta[n]) if g is None else g
            for n, g in zip(self.theta_names, grads)
        }

    def overrides(self) -> dict[str, Tensor]:
        return self.fixed


def make_view(
    unet: torch.nn.Module, theta_names: list[str], trainable_kind: str, algorithm: str, mode: str
) -> InnerView:
    """Choose the inner parameter space for an inner ``algorithm`` given the outer selection."""
    params = dict(unet.named_parameters())
    if algorithm in ("lora", "dreambooth"):
        if mode == "fresh":
            raise UserError(
                "simulated fine-tuning with a fresh LoRA adapter (lora.mode: fresh) is not "
                "implemented",
                hint="use lora.mode: own (the published choice: fine-tune the model's own LoRA)",
            )
        if trainable_kind != "lora":
            raise UserError(
                f"simulated LoRA fine-tuning with lora.mode 'own' needs model.trainable.kind "
                f"'lora' (it is '{trainable_kind}')",
                hint="set the inner config's algorithm to 'full', or train a LoRA",
            )
        return InnerView("identity", list(theta_names), list(theta_names))
    if algorithm != "full":
        raise ValueError(f"unknown inner algorithm {algorithm!r}")
    if trainable_kind == "full":
        return InnerView("identity", list(theta_names), list(theta_names))
    if trainable_kind == "modules":
        names = [n for n in params if "lora_" not in n]
        base = {n: params[n].detach() for n in names if n not in theta_names}
        return InnerView("full", names, list(theta_names), _base=base)
    # LoRA θ, full inner fine-tuning: merged base weights, zeroed adapters.
    names, fixed, merge, base = [], {}, [], {}
    lora = _lora_modules(unet)
    for mname, mod in lora.items():
        if not isinstance(mod.base_layer, torch.nn.Linear):
            raise UserError(
                f"full simulated fine-tuning over a LoRA on a non-linear layer ({mname}) is "
                "not supported",
                hint="restrict model.trainable.targets to linear projections",
            )
        for adapter in mod.lora_A:
            a = f"{mname}.lora_A.{adapter}.weight"
            b = f"{mname}.lora_B.{adapter}.weight"
            fixed[b] = torch.zeros_like(params[b]).detach()
            merge.append((f"{mname}.base_layer.weight", a, b, float(mod.scaling[adapter])))
    for n, p in params.items():
        if "lora_A" in n or "lora_B" in n:
            continue
        names.append(n)
        base[n] = p.detach()
    return InnerView("full", names, list(theta_names), fixed=fixed, _merge=merge, _base=base)


# --- the inner loop -----------------------------------------------------------------------


@dataclass
class InnerResult:
    params: dict[str, Tensor]
    losses: list[float]
    last_batch: NoisedBatch
    last_prior: NoisedBatch | None


FTLoss = Callable[[Mapping[str, Tensor], NoisedBatch, NoisedBatch | None], Tensor]


def finetune_loss(den: Denoiser, fixed: Mapping[str, Tensor], prior_weight: float) -> FTLoss:
    """The simulated fine-tuning loss: ε-MSE, plus ``prior_weight``·ε-MSE on the class-prior
    batch for DreamBooth (prior preservation)."""

    def loss(psi: Mapping[str, Tensor], nb: NoisedBatch, prior: NoisedBatch | None) -> Tensor:
        params = {**fixed, **psi}
        value = denoise_loss(den, params, nb)
        if prior is not None and prior_weight:
            value = value + prior_weight * denoise_loss(den, params, prior)
        return value

    return loss


def simulate_finetune(
    den: Denoiser,
    view: InnerView,
    psi0: Mapping[str, Tensor],
    optimizer: FunctionalOptimizer,
    steps: int,
    data: EncodedPairs,
    batch_size: int,
    generator: torch.Generator,
    prior: EncodedPairs | None = None,
    prior_weight: float = 1.0,
) -> InnerResult:
    """S steps of ``optimizer`` on the fine-tuning loss from ψ₀, keeping no trajectory."""
    loss_fn = finetune_loss(den, view.overrides(), prior_weight)
    names = list(psi0)
    cur = [psi0[n].detach() for n in names]
    state = optimizer.init(cur)
    losses: list[float] = []
    nb = pb = None
    for _ in range(steps):
        nb = noise_batch(data.sample(batch_size, generator), den.objective, generator)
        pb = None
        if prior is not None:
            pb = noise_batch(prior.sample(batch_size, generator), den.objective, generator)
        leaves = [c.requires_grad_(True) for c in cur]
        with torch.enable_grad():
            loss = loss_fn(dict(zip(names, leaves)), nb, pb)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        grads = [torch.zeros_like(c) if g is None else g for c, g in zip(leaves, grads)]
        losses.append(float(loss.detach()))
        with torch.no_grad():
            cur, state = optimizer.step([c.detach() for c in leaves], grads, state)
        cur = [c.detach() for c in cur]
    del state  # fresh state per run: nothing survives the inner loop
    assert nb is not None
    return InnerResult(dict(zip(names, cur)), losses, nb, pb)
