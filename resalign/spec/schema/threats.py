"""The ``threats`` section: downstream fine-tuning attacks on every model row."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, PositiveInt, ValidationError, field_validator, model_validator

from .base import StrictModel
from .search import SearchSpec, apply_values
from .unlearn import LoraAttackSpec

PositiveFloat = Annotated[float, Field(gt=0)]


class PoisonSpec(StrictModel):
    """Replace ``ratio`` of the benign data by harmful pairs from ``data``."""

    data: str
    ratio: float = Field(ge=0, le=1)


class StageSpec(StrictModel):
    """One stage of a staged fine-tuning attack: ``steps`` optimizer steps on ``data``
    (optionally with ``poison.ratio`` of it replaced by ``poison.data``, the attack seed as
    the mix seed, as a threat's own ``poison``)."""

    data: str
    steps: PositiveInt
    poison: PoisonSpec | None = None


class ThreatLoraSpec(LoraAttackSpec):
    """The LoRA adapter of a ``lora`` attack: always a fresh one (the attacker has no access
    to the unlearned model's own adapter; ``own`` applies to simulated fine-tunes only)."""

    mode: Literal["fresh"] = Field(
        default="fresh", description="threats fine-tune a fresh adapter ('own' is meta-only)"
    )


_WORD = re.compile(r"\w+")


class EmbeddingAttackSpec(StrictModel):
    """The new token(s) of an ``embedding`` (textual-inversion) attack: ``vectors`` new rows
    of the text encoder's input embeddings (SDXL: of both encoders) are the only trained
    weights. The training captions and the evaluation prompts say ``token`` (with ``vectors``
    > 1: ``token token_v1 ...``) where they said the word ``replaces``
    (``resalign.models.embeddings``, ``resalign.algorithms.embedding_attack``)."""

    token: str = Field(
        default="<concept>",
        description="the placeholder token added to the tokenizer (not a word of its vocabulary)",
    )
    replaces: str = Field(
        description="the word of the training captions and the evaluation prompts that the "
        "token stands for (e.g. 'zero' for the digits demo)"
    )
    init: str | None = Field(
        default=None,
        description="a word (one token of the tokenizer) whose embedding initialises the new "
        "vector(s); default: the replaces word",
    )
    vectors: PositiveInt = Field(default=1, le=64, description="number of new vectors")

    @field_validator("token")
    @classmethod
    def _token(cls, v: str) -> str:
        if not v or any(c.isspace() for c in v):
            raise ValueError(f"token {v!r} must be one non-empty string without spaces")
        return v

    @field_validator("replaces", "init")
    @classmethod
    def _single_word(cls, v: str | None) -> str | None:
        if v is not None and not _WORD.fullmatch(v):
            raise ValueError(
                f"{v!r} is not a single word (letters, digits, _; no spaces or punctuation): "
                "the embedding stands for one word"
            )
        return v

    @model_validator(mode="after")
    def _init_default(self) -> EmbeddingAttackSpec:
        if self.init is None:
            self.init = self.replaces
        return self


class PerturbSpec(StrictModel):
    """The neighbourhood probe of an ``algorithm: perturb`` threat: no data (except for
    ``direction: gradient``), no optimizer, no training. Each radius ``r`` of ``radii`` is
    one attack node that moves every perturbed tensor θᵢ (every UNet parameter, or those of
    the modules ``targets`` names) to θᵢ + r·‖θᵢ‖·dᵢ/‖dᵢ‖; the tensors are disjoint blocks,
    so the whole move has length exactly r·‖θ‖ (θ the perturbed set). ``d`` is a Gaussian
    drawn from the attack seed (``random``), or minus the gradient of the benign denoising
    loss on ``batches`` batches of ``batch_size`` items of the threat's ``data`` drawn by the
    attack seed (``gradient``: a normalised descent step on benign data, the first move of a
    benign fine-tune). Why per tensor (``resalign.algorithms.perturb``)."""

    radii: list[PositiveFloat] = Field(
        min_length=1,
        description="relative radii r (the move is r times the perturbed weights' norm), "
        "strictly increasing; one attack node and one evaluation each, as eval_at's steps",
    )
    direction: Literal["random", "gradient"] = Field(
        default="random",
        description="random: a Gaussian direction drawn from the attack seed; gradient: "
        "minus the benign loss's gradient on the threat's data",
    )
    targets: list[str] | None = Field(
        default=None,
        description="module name suffixes whose parameters are perturbed (e.g. [to_q, to_k, "
        "to_v, to_out.0]); default: every UNet parameter, the full fine-tune's set",
    )
    batches: PositiveInt | None = Field(
        default=None, description="direction gradient: number of batches the gradient "
        "averages (default 1)"
    )  # fmt: skip
    batch_size: PositiveInt | None = Field(
        default=None, description="direction gradient: items per batch (default 16)"
    )

    @field_validator("radii")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(
                f"radii {v} must be strictly increasing (step k of the threat is its k-th "
                "radius; adding one at the end keeps the others' node keys)"
            )
        return v

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or any(not t for t in v)):
            raise ValueError("targets must name at least one module (or be left out)")
        return v

    @model_validator(mode="after")
    def _gradient_fields(self) -> PerturbSpec:
        if self.direction == "gradient":
            self.batches = 1 if self.batches is None else self.batches
            self.batch_size = 16 if self.batch_size is None else self.batch_size
        else:
            written = [k for k in ("batches", "batch_size") if getattr(self, k) is not None]
            if written:
                raise ValueError(
                    f"{' and '.join(written)} {'is' if len(written) == 1 else 'are'} read by "
                    "direction gradient only: remove it or set direction: gradient"
                )
        return self


# A perturb threat reads these fields of the threat and no other (ThreatSpec._check_perturb).
PERTURB_READS = ("algorithm", "perturb", "seeds", "data")


class ThreatSpec(StrictModel):
    """A fine-tuning attack. Defaults are the published attack: full UNet, 200 steps, lr 1e-5
    constant, AdamW, effective batch 4, fp16, seed 42. These defaults are the only ones:
    ``resalign.algorithms.attack.AttackConfig`` is built from this model.

    ``poison`` replaces ``ratio`` of ``data`` by items of ``poison.data``, exactly as a
    ``mix`` dataset does (``resalign.data.pairs.mix_pairs``), with the attack seed as the mix
    seed.

    ``stages`` (instead of ``data``/``poison``) makes a staged attack, as in the
    fine-tuning-attack literature: e.g. ``[{data: benign, steps: 80}, {data: harm, steps:
    20}]`` fine-tunes on benign data first and then on a small harmful set. Rules, chosen so
    that one written value never silently contradicts another: ``data`` and ``poison`` are
    per stage and forbidden on a staged threat (a stage reads exactly what it says); the
    threat's ``steps`` is the sum of the stages' steps (written or not; a written value that
    differs is an error); at least two stages (one is a plain threat: write ``data``). All
    stages share one optimizer, one LR schedule over all ``steps`` (warm-up once, at the
    start; cosine/linear decay across the boundary: the attacker runs one fine-tuning job
    that changes data) and the attack seed's one generator; ``eval_at`` may fall in any
    stage (``resalign.algorithms.attack.run_attack``).

    ``algorithm: perturb`` (with a ``perturb`` block, :class:`PerturbSpec`) is no
    fine-tuning: it moves the row's weights by given relative radii and trains nothing. Rule:
    it reads ``algorithm``, ``perturb``, ``seeds`` and, for ``direction: gradient`` only,
    ``data``; every other field must be left out (an error names each one written with a
    value other than its default), and ``data`` is required with ``gradient`` and an error
    with ``random``. Its ``steps`` is the number of radii and ``eval_at`` is ``1..K``: step
    ``k`` of a perturb threat (node names ``.../step<k>``) is its ``k``-th radius."""

    data: str | None = Field(
        default=None, description="the fine-tuning data set (a plain threat; not with stages)"
    )
    poison: PoisonSpec | None = None
    stages: list[StageSpec] | None = Field(
        default=None,
        description="a staged attack: [{data, steps, poison?}, ...] run in order with one "
        "optimizer and one LR schedule; replaces data/poison, steps is their sum",
    )
    algorithm: Literal["full", "lora", "dreambooth", "embedding", "perturb"] = "full"
    lora: ThreatLoraSpec = Field(default_factory=ThreatLoraSpec)
    embedding: EmbeddingAttackSpec | None = Field(
        default=None,
        description="algorithm embedding (textual inversion): the new token(s), their "
        "initialisation and the word they stand for",
    )
    perturb: PerturbSpec | None = Field(
        default=None,
        description="algorithm perturb (the neighbourhood probe): radii, direction, targets",
    )
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
        if self.algorithm == "perturb" or self.perturb is not None:
            self._check_perturb()
            return self
        self._check_stages()
        self._check_embedding()
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

    def _check_stages(self) -> None:
        """One data source (``data`` or ``stages``); a staged threat's ``steps`` is the sum."""
        if self.stages is None:
            if self.data is None:
                raise ValueError(
                    "a threat needs 'data' (the fine-tuning data set) or 'stages' (a staged "
                    "attack: [{data, steps}, ...])"
                )
            return
        if self.data is not None or self.poison is not None:
            both = " and ".join(k for k in ("data", "poison") if getattr(self, k) is not None)
            raise ValueError(
                f"a staged threat reads its data from its stages: remove {both} (write "
                "each stage's data and poison in its own entry of stages)"
            )
        if len(self.stages) < 2:
            raise ValueError(
                "stages needs at least two stages; a single stage is a plain threat: write "
                "its data and steps on the threat instead"
            )
        total = sum(s.steps for s in self.stages)
        if "steps" in self.model_fields_set and self.steps != total:
            per = " + ".join(str(s.steps) for s in self.stages)
            raise ValueError(
                f"steps is {self.steps} but the stages add up to {per} = {total}: a staged "
                "threat's steps is the sum of its stages' steps; remove steps or make them agree"
            )
        self.steps = total

    def _check_embedding(self) -> None:
        """The ``embedding`` block goes with ``algorithm: embedding`` and only with it."""
        if self.algorithm == "embedding" and self.embedding is None:
            raise ValueError(
                "algorithm embedding trains new token embeddings and needs an embedding "
                "block naming the word they stand for, e.g. embedding: {replaces: zero}"
            )
        if self.algorithm != "embedding" and self.embedding is not None:
            raise ValueError(
                f"the embedding block is read by algorithm embedding only, and this threat's "
                f"algorithm is {self.algorithm}: remove the block or set algorithm: embedding"
            )

    def _check_perturb(self) -> None:
        """The rule of ``algorithm: perturb`` (class notes): only what it reads is written."""
        p = self.perturb
        if self.algorithm != "perturb":
            raise ValueError(
                f"the perturb block is read by algorithm perturb only, and this threat's "
                f"algorithm is {self.algorithm}: remove the block or set algorithm: perturb"
            )
        if p is None:
            raise ValueError(
                "algorithm perturb moves the weights by given relative radii and needs a "
                "perturb block, e.g. perturb: {radii: [0.01, 0.05, 0.1]}"
            )
        k = len(p.radii)
        # steps and eval_at are derived (K and 1..K): written with other values is an error
        unread = [
            f
            for f, info in type(self).model_fields.items()
            if f not in (*PERTURB_READS, "steps", "eval_at")
            and getattr(self, f) != info.get_default(call_default_factory=True)
        ]
        if "steps" in self.model_fields_set and self.steps != k:
            unread.append("steps")
        if "eval_at" in self.model_fields_set and self.eval_at != list(range(1, k + 1)):
            unread.append("eval_at")
        if unread:
            many = len(unread) > 1
            names = ", ".join(unread[:-1]) + " and " + unread[-1] if many else unread[0]
            raise ValueError(
                f"{names} {'are' if many else 'is'} not read by algorithm perturb (it trains "
                "nothing; its evaluation points are perturb.radii): remove "
                f"{'them' if many else 'it'}; a perturb threat reads algorithm, perturb, "
                "seeds and (with perturb.direction gradient) data"
            )
        if p.direction == "random" and self.data is not None:
            raise ValueError(
                "data is not read by a random perturbation: remove it, or set "
                "perturb.direction: gradient to step along the benign loss's gradient on it"
            )
        if p.direction == "gradient" and self.data is None:
            raise ValueError(
                "perturb.direction gradient steps along the gradient of the denoising loss on "
                "the threat's data: add data (a benign data set)"
            )
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds has duplicates: {self.seeds}")
        self.steps = k
        self.eval_at = list(range(1, k + 1))

    def _check_search(self, search: SearchSpec) -> None:
        if "eval_at" in self.model_fields_set:
            raise ValueError(
                "a searched threat evaluates each trial at its last step: remove eval_at "
                "(search.report_at adds evaluations before it, e.g. report_at: [0.25, 0.5])"
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
