"""ResAlign: unlearning plus the resilience term β·[L_harm(θ*_FT) − L_harm(θ)].

Outer gradient at θ (one step):

    meta_rate·(1/J)·Σⱼ [(1 − β)·∇L_harm(θ) + Σᵢ wᵢ(k)·∇Rᵢ(θ) + β·hⱼ]

where hⱼ is the hypergradient d L_harm(θ*ⱼ)/dθ of the j-th sampled simulated fine-tuning
(``moreau``: (I + γH)⁻¹∇L_harm(θ*) by Richardson on HVPs; ``unrolled``: exact backprop through
the inner steps; ``none``: ∇L_harm(θ*), first-order). This is the published aggregation: sum
over the J sampled configs / J × meta_rate (0.3), every config's gradient whole; a config whose
Richardson solve fails its safeguards contributes its direct terms only (hⱼ dropped, published).
``meta.meta_rate_scope: hypergradient`` scales the hⱼ term alone instead
(``direct + β·meta_rate·mean h``; then β = 0 is exactly ``plain``). The direct terms are
computed once per step on one harmful and one retain batch (the published code drew new ones
per config: same expectation).

Meta-learning: J = ``samples_per_step`` configurations per step, drawn without replacement
from the explicit ``configs`` followed by every combination of the product ``distribution``.
``over: data`` keeps the configuration fixed to the first candidate (the first explicit
config, else the first combination) and only resamples the data (dataset from the pool,
batches, noise) for each of the J runs.

Randomness of the J simulated fine-tunings: config ``j`` of outer step ``k`` draws its data,
noise and timesteps from its own generators seeded by ``config_seed(seed, k, j)``
(:mod:`resalign.algorithms.distributed`), never from the stream the previous configs used.
That makes a config's result independent of where it runs, so under ``torchrun`` the J
configs are split over the ranks (:func:`~resalign.algorithms.distributed.meta_hypergradient`,
one all-reduce) and the update equals the single-process one up to float summation order.
Config choice and the direct terms still use the method's own generators (identical on every
rank).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...errors import UserError
from ...models.attention import math_attention
from .. import distributed, memory
from ..callbacks import Stats
from ..hypergrad import (
    moreau_hypergradient,
    tensors_cosine,
    tensors_norm,
    unrolled_hypergradient,
)
from ..inner import (
    FunctionalOptimizer,
    InnerView,
    finetune_loss,
    make_view,
    simulate_finetune,
)
from ..objectives import EncodedPairs, noise_batch
from .base import Method


@dataclass(frozen=True)
class InnerConfig:
    """One candidate simulated fine-tuning configuration."""

    name: str
    algorithm: str
    optimizer: str
    lr: float
    steps: int
    batch_size: int
    data: str | None
    lora_mode: str = "own"
    prior_weight: float = 1.0
    weight_decay: float = 0.0


def candidate_configs(meta: Any) -> list[InnerConfig]:
    """Explicit configs (in spec order) followed by every product-distribution combination."""
    out = [
        InnerConfig(
            name,
            c.algorithm,
            c.optimizer,
            float(c.lr),
            int(c.steps),
            int(c.batch_size),
            c.data,
            c.lora.mode,
            float(c.prior_weight),
            float(c.weight_decay),
        )
        for name, c in meta.configs.items()
    ]
    d = meta.distribution
    if d is not None:
        datas: list[str | None] = list(d.data) or [None]
        for alg, opt, lr, steps, bs, data in itertools.product(
            d.algorithm, d.optimizer, d.lr, d.steps, d.batch_size, datas
        ):
            name = f"{alg}-{opt}-lr{lr:g}-s{steps}-b{bs}" + (f"-{data}" if data else "")
            out.append(InnerConfig(name, alg, opt, float(lr), int(steps), int(bs), data))
    return out


class ResAlign(Method):
    name = "resalign"

    def __init__(
        self,
        problem: Any,
        spec: Any,
        seed: int = 0,
        callback: Any = None,
        phases: Any = None,
    ):
        super().__init__(problem, spec, seed, callback, phases)
        res = spec.resilience
        self.beta = float(res.beta)
        self.meta_seed = int(seed)  # base of the per-config seeds (part of the state)
        self.hyper = res.hypergradient
        self.meta = res.meta
        self.candidates = candidate_configs(self.meta)
        if not self.candidates:
            raise UserError(
                "unlearn.resilience.meta has no simulated fine-tuning configuration",
                where="unlearn.resilience.meta",
                hint="add 'configs:' or a 'distribution:' (or use method: plain)",
            )
        names = {c.data for c in self.candidates if c.data} | set(problem.default_pool)
        missing = sorted(n for n in names if n not in problem.pools)
        if missing:
            raise ValueError(f"fine-tuning datasets not loaded: {missing}")
        if any(c.data is None for c in self.candidates) and not problem.default_pool:
            raise UserError(
                "a simulated fine-tuning config has no 'data' and meta.data is empty",
                where="unlearn.resilience.meta",
                hint="list benign datasets under meta.data, or give each config its 'data'",
            )
        self._views: dict[tuple[str, str], InnerView] = {}

    def _view(self, cfg: InnerConfig) -> InnerView:
        key = (cfg.algorithm, cfg.lora_mode)
        if key not in self._views:
            self._views[key] = make_view(
                self.unet, self.names, self.problem.selection.kind, cfg.algorithm, cfg.lora_mode
            )
        return self._views[key]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "meta_seed": self.meta_seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.meta_seed = int(state.get("meta_seed", self.meta_seed))

    def sample_configs(self) -> list[InnerConfig]:
        j = int(self.meta.samples_per_step)
        if self.meta.over == "data":
            return [self.candidates[0]] * j
        idx = self.rng.sample(range(len(self.candidates)), min(j, len(self.candidates)))
        return [self.candidates[i] for i in idx]

    def _data(
        self, cfg: InnerConfig, rng: random.Random
    ) -> tuple[str, EncodedPairs, EncodedPairs | None]:
        name = cfg.data if cfg.data is not None else rng.choice(self.problem.default_pool)
        prior = self.problem.priors.get(name) if cfg.algorithm == "dreambooth" else None
        return name, self.problem.pools[name], prior

    def hypergradient(
        self,
        cfg: InnerConfig,
        theta: dict[str, Tensor],
        gen: torch.Generator | None = None,
        rng: random.Random | None = None,
        direct: list[Tensor] | None = None,
    ) -> tuple[list[Tensor], Stats]:
        """Simulate fine-tuning ``cfg`` from θ and return (h over θ, stats).

        ``gen`` / ``rng`` (default: the method's own) supply the run's batches, noise and
        dataset choice. ``direct`` is the direct part of the outer gradient at θ: with
        ``max_norm_on: config_gradient`` (published) the norm cap tests ‖direct + β·h‖, the
        whole gradient this config contributes."""
        gen = self.gen if gen is None else gen
        view = self._view(cfg)
        data_name, data, prior = self._data(cfg, self.rng if rng is None else rng)
        opt = FunctionalOptimizer(cfg.optimizer, cfg.lr, weight_decay=cfg.weight_decay)
        # the inner loop trains fp32 masters even where the frozen weights it starts from are
        # stored in half (full fine-tuning over half frozen weights): half updates at lr 1e-5
        # would round away
        psi0 = {
            k: (v.float() if v.dtype in memory.HALF_DTYPES else v).detach()
            for k, v in view.start(theta).items()
        }
        fixed = view.overrides()
        h = self.hyper
        st: Stats = {
            "config": cfg.name,
            "algorithm": cfg.algorithm,
            "optimizer": cfg.optimizer,
            "data": data_name,
            "lr": cfg.lr,
            "steps": float(cfg.steps),
            "batch_size": float(cfg.batch_size),
        }
        names = list(psi0)
        if h.kind == "unrolled":
            batches = []
            for _ in range(cfg.steps):
                nb = noise_batch(data.sample(cfg.batch_size, gen), self.den.objective, gen)
                pb = None
                if prior is not None:
                    pb = noise_batch(prior.sample(cfg.batch_size, gen), self.den.objective, gen)
                batches.append((nb, pb))
            hb, target = self.sample_harmful(gen)
            ft = finetune_loss(self.den, fixed, cfg.prior_weight)
            # the unrolled reference differentiates through the inner fine-tuning: its forwards
            # (inner steps and L_harm) run in the inner fine-tuning's precision
            with self.phase("inner"), math_attention(self.unet), self.den.low_precision():
                x, psi_star, losses = unrolled_hypergradient(
                    [psi0[n] for n in names],
                    lambda ps, k: ft(dict(zip(names, ps)), *batches[k]),
                    lambda ps: self.harm_loss({**fixed, **dict(zip(names, ps))}, hb, target),
                    cfg.steps,
                    opt,
                )
            b = self._harm_grad(names, psi_star, fixed, hb, target)
        else:
            with self.phase("inner"), self.den.low_precision():
                res = simulate_finetune(
                    self.den,
                    view,
                    psi0,
                    opt,
                    cfg.steps,
                    data,
                    cfg.batch_size,
                    gen,
                    prior,
                    cfg.prior_weight,
                )
            losses = list(res.losses)
            psi_star = [res.params[n] for n in names]
            last = (res.last_batch, res.last_prior)
            if self.memory.free_inner_state:
                # nothing of the inner run but θ* (and the last batch, for hvp_batch: last) is
                # read again: drop it before the HVP graphs are built
                memory.free_inner_state(vars(res))
            del res
            hb, target = self.sample_harmful(gen)
            b = self._harm_grad(names, psi_star, fixed, hb, target)
            if h.kind == "moreau":
                if h.hvp_batch == "fresh":
                    nb = noise_batch(data.sample(cfg.batch_size, gen), self.den.objective, gen)
                    pb = None
                    if prior is not None:
                        pb = noise_batch(prior.sample(cfg.batch_size, gen), self.den.objective, gen)
                else:
                    nb, pb = last
                del last
                ft = finetune_loss(self.den, fixed, cfg.prior_weight)
                norm_of = None
                if h.max_norm_on == "config_gradient" and direct is not None:
                    norm_of = self._config_gradient_norm(view, theta, names, direct)
                with self.phase("richardson"), math_attention(self.unet):
                    x, solve = moreau_hypergradient(
                        b,
                        lambda ps: ft(dict(zip(names, ps)), nb, pb),
                        psi_star,
                        gamma=h.gamma,
                        gamma_fraction=h.gamma_fraction,
                        power_iterations=h.power_iterations,
                        iterations=h.iterations,
                        tol=h.tol,
                        backend=h.hvp_backend,
                        damping=h.damping,
                        divergence_ratio=h.divergence_ratio,
                        divergence_norm=h.divergence_norm,
                        max_norm=h.max_norm,
                        norm_of=norm_of,
                        retries=h.retries,
                        fallback=h.fallback,
                    )
                st.update(solve.as_metrics())
            else:
                x = b
        hyper = view.pullback(theta, dict(zip(names, x)))
        first = view.pullback(theta, dict(zip(names, b)))
        hyper_l = [hyper[n] for n in self.names]
        direct_l = [first[n] for n in self.names]
        st["inner_loss"] = float(losses[-1])
        st["inner_loss_first"] = float(losses[0])
        st["hypergrad_norm"] = tensors_norm(hyper_l)
        st["cosine"] = tensors_cosine(hyper_l, direct_l)
        return hyper_l, st

    def _config_gradient_norm(
        self, view: InnerView, theta: dict[str, Tensor], names: list[str], direct: list[Tensor]
    ) -> Any:
        """x ↦ ‖direct + β·(∂ψ₀/∂θ)ᵀx‖: the published norm test's argument (the whole
        gradient one config contributes before averaging)."""

        def norm_of(x: list[Tensor]) -> float:
            pulled = view.pullback(theta, dict(zip(names, x)))
            return tensors_norm([d + self.beta * pulled[n] for n, d in zip(self.names, direct)])

        return norm_of

    def _harm_grad(
        self,
        names: list[str],
        psi: list[Tensor],
        fixed: dict[str, Tensor],
        hb: Any,
        target: Tensor | None,
    ) -> list[Tensor]:
        leaves = [p.detach().clone().requires_grad_(True) for p in psi]
        with self.phase("harm_grad"), torch.enable_grad():
            loss = self.harm_loss({**fixed, **dict(zip(names, leaves))}, hb, target)
            g = torch.autograd.grad(loss, leaves, allow_unused=True)
        return [torch.zeros_like(p) if gi is None else gi.detach() for p, gi in zip(leaves, g)]

    def outer_gradient(self) -> tuple[list[Tensor], Stats]:
        direct, stats = self.direct_terms(harm_coef=1.0 - self.beta)
        rate = float(self.meta.meta_rate)
        whole = self.meta.meta_rate_scope == "update"
        if self.beta == 0:
            return ([rate * d for d in direct] if whole else direct), stats
        theta = self.theta()
        configs = self.sample_configs()
        step = self.step_count

        def per_config(j: int, cfg: InnerConfig) -> tuple[list[Tensor], Stats]:
            seed = distributed.config_seed(self.meta_seed, step, j)
            return self.hypergradient(
                cfg, theta, torch.Generator().manual_seed(seed), random.Random(seed), direct
            )

        # Split over torchrun ranks when a process group is up; sequential otherwise.
        mean, per = distributed.meta_hypergradient(configs, per_config, direct)
        for j, st in enumerate(per):
            stats.update({f"meta{j}.{k}": v for k, v in st.items()})
        if whole:
            # published: meta_rate·(1/J)·Σⱼ [direct + β·hⱼ] (a dropped hⱼ counts as zero)
            grads = [rate * (d + self.beta * m) for d, m in zip(direct, mean)]
        else:
            grads = [d + self.beta * rate * m for d, m in zip(direct, mean)]
        stats["hypergrad_norm"] = tensors_norm(mean)
        # How the two parts of the applied step meet: with LoRA θ on the digits ResAlign did
        # not unlearn and these had to be inferred from the norms (README, ResAlign on LoRA).
        stats["resilience_cosine"] = tensors_cosine(mean, direct)
        resilience_weight = self.beta * (1.0 if whole else rate)
        d_norm = float(stats["direct_grad_norm"])
        stats["resilience_ratio"] = (
            resilience_weight * float(stats["hypergrad_norm"]) / d_norm if d_norm > 0 else 0.0
        )
        stats["retries"] = float(sum(float(s.get("retries", 0.0)) for s in per))
        stats["fallbacks"] = float(sum(float(s.get("fallback", 0.0)) for s in per))
        stats["cosine"] = sum(float(s["cosine"]) for s in per) / len(per)
        stats["inner_loss"] = sum(float(s["inner_loss"]) for s in per) / len(per)
        k = max((len([key for key in s if key.startswith("residual_")]) for s in per), default=0)
        for i in range(k):
            vals = [float(s[f"residual_{i}"]) for s in per if f"residual_{i}" in s]
            stats[f"residual_{i}"] = sum(vals) / len(vals)
        return grads, stats
