"""Shared machinery of the unlearning methods: the problem, the outer loop, state and RNG."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...errors import UserError
from ...models.trainable import TrainableSelection
from .. import memory
from ..callbacks import PhaseHook, Stats, StepCallback, no_phases
from ..hypergrad import tensors_norm
from ..objectives import (
    Denoiser,
    EncodedPairs,
    NoisedBatch,
    esd_loss,
    esd_target,
    neg_denoise_loss,
    noise_batch,
    regularizer,
    schedule_weight,
)


@dataclass
class UnlearnProblem:
    """Everything a method needs, already encoded and on the device.

    ``unet`` (the denoiser: a UNet, or SD3's transformer) carries the trainable selection
    (``selection.names`` require grad); ``objective`` is its training objective
    (:mod:`resalign.models.diffusion`: the bundle's, or a training scheduler). ``pools``
    are the simulated fine-tuning datasets by name, ``priors`` the class-prior sets of
    DreamBooth datasets by name, ``default_pool`` the names a config without ``data`` draws
    from. ``uncond`` is the empty-prompt embedding ``[1, L, D]`` (ESD needs it). ``idle`` are
    modules not used during unlearning once the data are encoded (VAE, text encoder): with
    ``unlearn.memory.offload_idle`` they are parked on the CPU.
    """

    unet: torch.nn.Module
    objective: Any
    selection: TrainableSelection
    harmful: EncodedPairs
    retain: EncodedPairs | None = None
    pools: dict[str, EncodedPairs] = field(default_factory=dict)
    priors: dict[str, EncodedPairs] = field(default_factory=dict)
    default_pool: list[str] = field(default_factory=list)
    uncond: Tensor | None = None
    idle: list[torch.nn.Module] = field(default_factory=list)


def original_overrides(unet: torch.nn.Module, selection: TrainableSelection) -> dict[str, Tensor]:
    """Substitutions that turn the model being trained back into the frozen original.

    LoRA: the up matrices at zero (adapter off, no copy of the UNet). Full / modules: a copy
    of the selected tensors as they are now (call before training).
    """
    params = dict(unet.named_parameters())
    if selection.kind == "lora":
        return {n: torch.zeros_like(params[n]) for n in selection.names if ".lora_B." in n}
    return {n: params[n].detach().clone() for n in selection.names}


class Method:
    """An unlearning method: ``step()`` takes one outer step and reports its statistics.

    Subclasses implement :meth:`outer_gradient`. The outer optimizer is ``torch.optim``
    (AdamW by default, published). All randomness comes from two generators the method owns
    (a ``torch.Generator`` for data, noise and timesteps; a ``random.Random`` for config and
    dataset choices), so a run is reproducible from its seed and resumable exactly.
    ``phases`` (:data:`resalign.algorithms.callbacks.PHASES`) wraps each phase of a step, for
    timers and memory peaks (the SD benchmark); it changes no arithmetic.
    """

    name: ClassVar[str]
    uses_regularizers: ClassVar[bool] = True
    harmful_kind: ClassVar[str | None] = None  # forced harmful loss kind, if any

    def __init__(
        self,
        problem: UnlearnProblem,
        spec: Any,
        seed: int = 0,
        callback: StepCallback | None = None,
        phases: PhaseHook | None = None,
    ):
        self.problem = problem
        self.spec = spec
        self.callback = callback
        self.phase: PhaseHook = phases or no_phases
        self.total_steps = int(spec.steps)
        self.unet = problem.unet
        all_params = dict(self.unet.named_parameters())
        self.names = list(problem.selection.names)
        self.params = [all_params[n] for n in self.names]
        for p in self.params:
            p.requires_grad_(True)
        self.memory = spec.memory
        self.offloader = self._apply_memory_levers(problem)
        self.den = Denoiser(
            self.unet,
            problem.objective,
            original_overrides(self.unet, problem.selection),
            autocast=self.memory.autocast,
            # half weights cannot meet fp32 activations: every forward runs under autocast
            everywhere=self.memory.frozen_dtype != "float32",
        )
        self.harmful_kind_used = self.harmful_kind or spec.harmful_loss.kind
        if self.harmful_kind_used == "esd" and problem.uncond is None:
            raise ValueError("the esd loss needs the empty-prompt embedding (problem.uncond)")
        self.regs = list(spec.regularizers) if self.uses_regularizers else []
        if self.regs and problem.retain is None:
            raise UserError(
                "unlearn.regularizers need retain data, but the concepts name no retain dataset",
                where="concepts",
                hint="add 'retain: [<dataset>]' to the concept, or set 'regularizers: []'",
            )
        self._reg_fns = [regularizer(r.kind) for r in self.regs]
        self.gen = torch.Generator().manual_seed(int(seed))
        self.rng = random.Random(int(seed))
        self.optimizer = self._make_optimizer(spec.optimizer)
        self.step_count = 0

    def _apply_memory_levers(self, problem: UnlearnProblem) -> memory.IdleOffloader:
        """The model-side levers of ``unlearn.memory`` (docs/benchmarks.md): block gradient
        checkpointing that rebinds substituted parameters at recomputation (diffusers' own is
        wrong under ``functional_call``), frozen weights stored in half, idle modules parked.
        The trained tensors stay fp32 (the master copy)."""
        mem = self.memory
        if mem.gradient_checkpointing and not getattr(
            self.unet, "_supports_gradient_checkpointing", False
        ):
            raise UserError(
                f"unlearn.memory.gradient_checkpointing: {type(self.unet).__name__} does not "
                "support gradient checkpointing",
                where="unlearn.memory.gradient_checkpointing",
                hint="set it to false for this model",
            )
        if mem.autocast != "none":
            half = [
                (n, p.dtype)
                for n, p in zip(self.names, self.params)
                if p.dtype in memory.HALF_DTYPES
            ]
            if half:
                raise UserError(
                    f"unlearn.memory.autocast needs fp32 trained tensors (master parameters); "
                    f"{half[0][0]} is {half[0][1]}",
                    where="unlearn.memory.autocast",
                    hint="load the model in float32 and let autocast lower the forward passes",
                )
        device = self.params[0].device if self.params else torch.device("cpu")
        return memory.apply_memory_levers(self.unet, mem, device, idle=problem.idle)

    # -- optimizer & state ------------------------------------------------------------------

    def _make_optimizer(self, o: Any) -> torch.optim.Optimizer:
        if o.name == "adamw":
            return torch.optim.AdamW(
                self.params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
            )
        if o.name == "adam":
            return torch.optim.Adam(
                self.params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
            )
        return torch.optim.SGD(
            self.params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay
        )

    def state_dict(self) -> dict[str, Any]:
        """Parameters, outer optimizer, both generators and the step counter."""
        return {
            "step": self.step_count,
            "params": {n: p.detach().clone() for n, p in zip(self.names, self.params)},
            "optimizer": self.optimizer.state_dict(),
            "torch_generator": self.gen.get_state(),
            "python_random": _encode_pystate(self.rng.getstate()),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        params = state["params"]
        if set(params) != set(self.names):
            raise ValueError("checkpoint tensors do not match the trainable selection")
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                p.copy_(params[n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.gen.set_state(state["torch_generator"])
        self.rng.setstate(_decode_pystate(state["python_random"]))
        self.step_count = int(state["step"])

    def trained_state(self) -> dict[str, Tensor]:
        """The trained tensors by parameter name (detached, on CPU)."""
        return {n: p.detach().cpu().clone() for n, p in zip(self.names, self.params)}

    # -- losses -------------------------------------------------------------------------------

    def theta(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in zip(self.names, self.params)}

    def sample_harmful(
        self, gen: torch.Generator | None = None
    ) -> tuple[NoisedBatch, Tensor | None]:
        """A harmful batch with its noise, and the ESD target where the loss is ESD.

        ``gen`` (default: the method's generator) lets a caller draw from its own stream."""
        hl = self.spec.harmful_loss
        g = self.gen if gen is None else gen
        nb = noise_batch(self.problem.harmful.sample(hl.batch_size, g), self.den.objective, g)
        target = None
        if self.harmful_kind_used == "esd":
            # the ESD target is part of L_harm: same precision as the loss it enters
            with self.den.low_precision():
                target = esd_target(self.den, nb, self.problem.uncond, hl.negative_guidance)
        return nb, target

    def harm_loss(
        self, params: Mapping[str, Tensor], nb: NoisedBatch, target: Tensor | None
    ) -> Tensor:
        """L_harm at ``params``; its forward runs under ``unlearn.memory.autocast`` (the loss
        and its gradient come back fp32)."""
        with self.den.low_precision():
            if self.harmful_kind_used == "esd":
                assert target is not None
                return esd_loss(self.den, params, nb, target)
            return neg_denoise_loss(self.den, params, nb)

    def reg_weights(self) -> list[float]:
        k = self.step_count
        return [
            schedule_weight(
                r.weight,
                r.schedule.kind,
                r.schedule.final_weight,
                r.schedule.start_fraction,
                r.schedule.sharpness,
                k,
                self.total_steps,
            )
            for r in self.regs
        ]

    def direct_terms(self, harm_coef: float) -> tuple[list[Tensor], Stats]:
        """∇[harm_coef·L_harm + Σ wᵢ Rᵢ] at θ, and the loss values."""
        with self.phase("direct"):
            return self._direct_terms(harm_coef)

    def _direct_terms(self, harm_coef: float) -> tuple[list[Tensor], Stats]:
        params = dict(zip(self.names, self.params))
        stats: Stats = {}
        with torch.enable_grad():
            nb, target = self.sample_harmful()
            lh = self.harm_loss(params, nb, target)
            total = harm_coef * lh
            stats["loss_harm"] = float(lh.detach())
            for i, (r, fn, w) in enumerate(zip(self.regs, self._reg_fns, self.reg_weights())):
                assert self.problem.retain is not None
                rb = noise_batch(
                    self.problem.retain.sample(r.batch_size, self.gen), self.den.objective, self.gen
                )
                lr_ = fn(self.den, params, rb)
                total = total + w * lr_
                stats[f"loss_reg_{i}"] = float(lr_.detach())
                stats[f"weight_reg_{i}"] = float(w)
            grads = torch.autograd.grad(total, self.params, allow_unused=True)
        stats["loss_total"] = float(total.detach())
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]
        stats["direct_grad_norm"] = tensors_norm(grads)
        return grads, stats

    # -- the outer step -----------------------------------------------------------------------

    def outer_gradient(self) -> tuple[list[Tensor], Stats]:
        raise NotImplementedError

    def step(self) -> Stats:
        """One outer step: compute the outer gradient, apply the optimizer, report."""
        self.unet.train(False)
        grads, stats = self.outer_gradient()
        with self.phase("update"):
            for p, g in zip(self.params, grads):
                p.grad = g.detach().to(p.dtype)
            clip = self.spec.optimizer.max_grad_norm
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(self.params, clip)
            stats["grad_norm"] = tensors_norm([p.grad for p in self.params])  # type: ignore[misc]
            stats["lr"] = float(self.optimizer.param_groups[0]["lr"])
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        stats["step"] = float(self.step_count)
        if self.callback is not None:
            self.callback(stats)
        return stats


def _encode_pystate(state: tuple) -> list:
    # random.Random state as plain lists/ints, so torch.load(weights_only=True) reads it back
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _decode_pystate(state: list | tuple) -> tuple:
    version, internal, gauss = state
    return (int(version), tuple(int(x) for x in internal), gauss)
