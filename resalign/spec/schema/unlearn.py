"""The ``unlearn`` section: method, objectives, the resilience term and its meta-learning."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, NonNegativeInt, PositiveInt, model_validator

from .base import StrictModel

Prob = Annotated[float, Field(ge=0, le=1)]
PositiveFloat = Annotated[float, Field(gt=0)]


class OptimizerSpec(StrictModel):
    """Outer optimizer. Default: AdamW lr 2e-4, weight decay 0.01, constant (published)."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: PositiveFloat = 2e-4
    weight_decay: float = Field(default=0.01, ge=0)
    betas: tuple[Prob, Prob] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    momentum: float = Field(default=0.0, ge=0, lt=1)
    max_grad_norm: PositiveFloat | None = None


class HarmfulLossSpec(StrictModel):
    """neg_denoise: negative ε-MSE on harmful pairs (published). esd: ESD target against the
    frozen original (esd_u trains on all layers' unconditional guidance target, esd_x the same
    loss restricted by trainable selection to cross-attention)."""

    kind: Literal["neg_denoise", "esd"] = "neg_denoise"
    batch_size: PositiveInt = 1
    negative_guidance: float = Field(default=1.0, ge=0)
    variant: Literal["esd_u", "esd_x"] = "esd_u"


class ScheduleSpec(StrictModel):
    """Weight schedule: constant, or constant then a sigmoid ramp to ``final_weight`` that
    starts at ``start_fraction`` of training (published: 1.6 → 2.0 over the second half)."""

    kind: Literal["constant", "sigmoid_ramp"] = "constant"
    final_weight: float | None = None
    start_fraction: Prob = 0.5
    sharpness: PositiveFloat = 10.0


class RegularizerSpec(StrictModel):
    """A retain regularizer by registered name. distill: MSE to the frozen original's noise
    prediction on retain pairs."""

    kind: str = "distill"
    weight: float = Field(default=1.6, ge=0)
    batch_size: PositiveInt = 4
    schedule: ScheduleSpec = Field(
        default_factory=lambda: ScheduleSpec(kind="sigmoid_ramp", final_weight=2.0)
    )


class HypergradientSpec(StrictModel):
    """How d L_harm(θ*_FT)/dθ is computed. moreau: implicit (I + γH)⁻¹ b by K Richardson
    iterations on HVPs; unrolled: exact backprop through the inner steps (reference); none:
    first-order (the direct gradient at θ*_FT)."""

    kind: Literal["moreau", "unrolled", "none"] = "moreau"
    gamma: PositiveFloat | Literal["auto"] = Field(
        default=1.0,
        description="Moreau proximal weight (published 1). auto: gamma_fraction / lambda_max "
        "of the fine-tuning Hessian at theta*, estimated per solve by power iteration",
    )
    gamma_fraction: Annotated[float, Field(gt=0, le=1)] = 0.5
    power_iterations: PositiveInt = 20
    iterations: PositiveInt = 5
    tol: float = Field(default=1e-10, ge=0)
    hvp_backend: Literal["double_backward", "forward_over_reverse"] = "double_backward"
    damping: Annotated[float, Field(gt=0, le=1)] = 1.0
    divergence_ratio: PositiveFloat = 1.0
    divergence_norm: Literal["tensor_mean", "global"] = Field(
        default="tensor_mean",
        description="tensor_mean: mean over tensors of ||J x_i||/||x_i|| (published); global: "
        "the whole vector",
    )
    max_norm: PositiveFloat | None = 0.2
    max_norm_on: Literal["config_gradient", "hypergradient"] = Field(
        default="config_gradient",
        description="config_gradient: the norm cap tests the whole per-config outer gradient "
        "(published); hypergradient: the solve's result alone",
    )
    retries: NonNegativeInt = 5
    fallback: Literal["drop", "first_order"] = Field(
        default="drop",
        description="after the retries: drop the fine-tuned-harm term (published) or use the "
        "first-order hypergradient (the harm gradient at the fine-tuned weights)",
    )
    hvp_batch: Literal["fresh", "last"] = Field(
        default="fresh", description="fresh: one new inner batch for all K HVPs (published)"
    )


class LoraAttackSpec(StrictModel):
    """LoRA used by a (simulated or real) fine-tuning run."""

    mode: Literal["own", "fresh"] = Field(
        default="own",
        description="own: fine-tune the model's trainable LoRA (published); fresh: a new adapter",
    )
    rank: PositiveInt = 4
    alpha: float | None = None
    targets: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


class InnerConfigSpec(StrictModel):
    """One simulated downstream fine-tuning configuration."""

    algorithm: Literal["full", "lora", "dreambooth"] = "lora"
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: PositiveFloat = 1e-5
    steps: PositiveInt = 10
    batch_size: PositiveInt = 1
    data: str | None = Field(default=None, description="dataset name; default: meta.data pool")
    lora: LoraAttackSpec = Field(default_factory=LoraAttackSpec)
    prior_weight: float = Field(default=1.0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)


class DistributionSpec(StrictModel):
    """A product distribution over inner configurations (sampled uniformly per axis)."""

    lr: list[PositiveFloat] = Field(default_factory=lambda: [1e-4, 1e-5, 1e-6])
    steps: list[PositiveInt] = Field(default_factory=lambda: [5, 10, 20, 30])
    algorithm: list[Literal["full", "lora", "dreambooth"]] = Field(default_factory=lambda: ["lora"])
    optimizer: list[Literal["sgd", "adam", "adamw"]] = Field(
        default_factory=lambda: ["sgd", "adam"]
    )
    batch_size: list[PositiveInt] = Field(default_factory=lambda: [1])
    data: list[str] = Field(default_factory=list)


class MetaSpec(StrictModel):
    """Meta-learning over simulated fine-tuning: J configs per outer step, without replacement,
    from the explicit ``configs`` and/or the product ``distribution``."""

    samples_per_step: PositiveInt = 3
    meta_rate: PositiveFloat = 0.3
    meta_rate_scope: Literal["update", "hypergradient"] = Field(
        default="update",
        description="update: meta_rate scales the whole averaged outer gradient (published); "
        "hypergradient: only the fine-tuned-harm term (then beta 0 is exactly plain)",
    )
    over: Literal["data", "data_and_configs"] = "data_and_configs"
    data: list[str] = Field(default_factory=list)
    configs: dict[str, InnerConfigSpec] = Field(default_factory=dict)
    distribution: DistributionSpec | None = None


class ResilienceSpec(StrictModel):
    """The resilience term β·[L_harm(θ*_FT) − L_harm(θ)]."""

    beta: float = Field(default=0.8, ge=0)
    hypergradient: HypergradientSpec = Field(default_factory=HypergradientSpec)
    meta: MetaSpec = Field(default_factory=MetaSpec)


class MemorySpec(StrictModel):
    """Memory levers (see docs/benchmarks.md for their measured effect)."""

    autocast: Literal["none", "bf16", "fp16"] = "none"
    gradient_checkpointing: bool = False
    free_inner_state: bool = True
    offload_idle: bool = False
    frozen_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32",
        description="storage dtype of the frozen (non-trained) UNet weights; trained tensors "
        "stay float32. A half dtype needs autocast of the same precision",
    )

    @model_validator(mode="after")
    def _check_frozen_dtype(self) -> MemorySpec:
        needs = {"bfloat16": "bf16", "float16": "fp16"}.get(self.frozen_dtype)
        if needs is not None and self.autocast != needs:
            raise ValueError(
                f"memory.frozen_dtype {self.frozen_dtype} needs memory.autocast {needs} "
                f"(it is {self.autocast}): half weights cannot meet float32 activations"
            )
        return self


class UnlearnSpec(StrictModel):
    """Unlearning: one registered method and its objective."""

    method: Literal["resalign", "plain", "esd", "gradient_ascent", "none"] = "resalign"
    label: str | None = Field(default=None, description="row name in reports; default: method")
    steps: PositiveInt = 160
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    harmful_loss: HarmfulLossSpec = Field(default_factory=HarmfulLossSpec)
    regularizers: list[RegularizerSpec] = Field(default_factory=lambda: [RegularizerSpec()])
    resilience: ResilienceSpec = Field(default_factory=ResilienceSpec)
    memory: MemorySpec = Field(default_factory=MemorySpec)
    checkpoint_every: PositiveInt = 20
    seed: int | None = Field(default=None, description="default: the spec's seed")
    seeds: list[int] | None = Field(
        default=None,
        min_length=1,
        description="unlearning seeds: one unlearn node (with its attacks and evaluations) per "
        "seed; default: [seed]. Reports aggregate over them and pair rows by seed",
    )

    @model_validator(mode="after")
    def _check(self) -> UnlearnSpec:
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds has duplicates: {self.seeds}")
        if self.method == "esd" and self.harmful_loss.kind != "esd":
            self.harmful_loss = self.harmful_loss.model_copy(update={"kind": "esd"})
        return self
