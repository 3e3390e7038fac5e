"""The ``threats`` section: downstream fine-tuning attacks on every model row."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PositiveInt, ValidationError, model_validator

from .base import StrictModel
from .search import SearchSpec, apply_values
from .unlearn import LoraAttackSpec

PositiveFloat = Annotated[float, Field(gt=0)]


class PoisonSpec(StrictModel):
    """Replace ``ratio`` of the benign data by harmful pairs from ``data``."""

    data: str
    ratio: float = Field(ge=0, le=1)


class ThreatLoraSpec(LoraAttackSpec):
    """The LoRA adapter of a ``lora`` attack: always a fresh one (the attacker has no access
    to the unlearned model's own adapter; ``own`` applies to simulated fine-tunes only)."""

    mode: Literal["fresh"] = Field(
        default="fresh", description="threats fine-tune a fresh adapter ('own' is meta-only)"
    )


class ThreatSpec(StrictModel):
    """A fine-tuning attack. Defaults are the published attack: full UNet, 200 steps, lr 1e-5
    constant, AdamW, effective batch 4, fp16, seed 42. These defaults are the only ones:
    ``resalign.algorithms.attack.AttackConfig`` is built from this model.

    ``poison`` replaces ``ratio`` of ``data`` by items of ``poison.data``, exactly as a
    ``mix`` dataset does (``resalign.data.pairs.mix_pairs``), with the attack seed as the mix
    seed."""

    data: str
    poison: PoisonSpec | None = None
    algorithm: Literal["full", "lora", "dreambooth"] = "full"
    lora: ThreatLoraSpec = Field(default_factory=ThreatLoraSpec)
    prior: str | None = Field(default=None, description="class-prior dataset for dreambooth")
    prior_weight: float = Field(default=1.0, ge=0)
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: PositiveFloat = 1e-5
    weight_decay: float = Field(default=1e-2, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    steps: PositiveInt = 200
    batch_size: PositiveInt = 1
    grad_accumulation: PositiveInt = 4
    precision: Literal["fp32", "fp16", "bf16"] = "fp16"
    max_grad_norm: PositiveFloat | None = None
    seeds: list[int] = Field(default_factory=lambda: [42], min_length=1)
    eval_at: list[PositiveInt] = Field(
        default_factory=list, description="steps at which to evaluate; default: the last step"
    )
    checkpoint_every: PositiveInt = 100
    search: SearchSpec | None = Field(
        default=None,
        description="search these hyperparameters within a trial budget instead of fixing "
        "them (resalign.engine.search); the fields written here are the fixed part",
    )

    @model_validator(mode="after")
    def _check(self) -> ThreatSpec:
        if self.search is not None:
            self._check_search(self.search)
        late = [s for s in self.eval_at if s > self.steps]
        if late:
            raise ValueError(
                f"eval_at has checkpoint(s) {late} after the last step ({self.steps}); "
                f"use values in 1..{self.steps}"
            )
        if not self.eval_at:
            self.eval_at = [self.steps]
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds has duplicates: {self.seeds}")
        return self

    def _check_search(self, search: SearchSpec) -> None:
        if "eval_at" in self.model_fields_set:
            raise ValueError(
                "a searched threat evaluates each trial at its last step: remove eval_at"
            )
        if self.poison is None and any(k.startswith("poison.") for k in search.space):
            raise ValueError("search.space has poison.* but the threat has no poison block")
        for name, p in search.space.items():
            for v in p.corners():
                try:
                    self.trial({name: v})
                except ValidationError as e:
                    err = e.errors()[0]
                    where = ".".join(map(str, err["loc"])) or "threat"
                    raise ValueError(
                        f"search.space.{name}: value {v!r} makes an invalid threat: "
                        f"{where}: {err['msg']}"
                    ) from None

    def trial(self, values: dict) -> ThreatSpec:
        """The fixed threat of one search trial: this threat with ``values`` (``field`` or
        ``block.field``) set and no ``search``; evaluated at its last step."""
        base = self.model_dump(mode="json", exclude={"search", "eval_at"})
        return ThreatSpec.model_validate(apply_values(base, values))
