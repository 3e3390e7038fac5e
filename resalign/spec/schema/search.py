"""A threat's ``search`` block: the attacker's hyperparameters searched within a budget
(issue 16), instead of fixed.

The search maximises a concept (safety) metric of the attacked model, mean over the threat's
attack seeds, subject to a utility bound on the same attacked model (``constraint``: e.g.
``retain_accuracy`` at least 0.7, or ``classifier_fid`` at most 5). Every trial is an ordinary
attack node plus its evaluation, with exactly the keys of a fixed threat with the trial's
values (see :mod:`resalign.engine.search`). Torch- and optuna-free: the sampler is built in
the engine.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PositiveInt, model_validator

from .base import StrictModel

# Threat fields a search may vary, with the kind of value each takes. ``lora.*`` and
# ``poison.*`` set a field of the nested block (``poison.*`` needs the threat's ``poison``).
SEARCHABLE: dict[str, str] = {
    "lr": "float",
    "weight_decay": "float",
    "max_grad_norm": "float",
    "prior_weight": "float",
    "steps": "int",
    "warmup_steps": "int",
    "batch_size": "int",
    "grad_accumulation": "int",
    "optimizer": "choice",
    "algorithm": "choice",
    "schedule": "choice",
    "precision": "choice",
    "data": "choice",
    "prior": "choice",
    "lora.rank": "int",
    "lora.alpha": "float",
    "poison.ratio": "float",
    "poison.data": "choice",
}

EXAMPLE = "lr: {log_uniform: [1.0e-4, 1.0e-2]}"


class SearchParam(StrictModel):
    """One searched value: exactly one of ``uniform: [low, high]``, ``log_uniform: [low,
    high]`` (floats), ``integer: [low, high]`` (with ``step``), ``choice: [v1, v2, ...]``."""

    uniform: tuple[float, float] | None = None
    log_uniform: tuple[float, float] | None = None
    integer: tuple[int, int] | None = None
    step: PositiveInt = Field(default=1, description="grid step of an integer range")
    choice: list[Any] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one(self) -> SearchParam:
        given = [k for k in ("uniform", "log_uniform", "integer", "choice") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "a searched value takes exactly one of uniform: [low, high], log_uniform: "
                f"[low, high], integer: [low, high], choice: [...] (got {given or 'none'})"
            )
        rng = self.uniform or self.log_uniform or self.integer
        if rng is not None and not rng[0] < rng[1]:
            raise ValueError(f"range [{rng[0]}, {rng[1]}] is empty: low must be below high")
        if self.log_uniform is not None and self.log_uniform[0] <= 0:
            raise ValueError("log_uniform needs a positive low end")
        if self.step != 1 and self.integer is None:
            raise ValueError("step applies to an integer range only")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("uniform", "log_uniform", "integer", "choice") if getattr(self, k))

    def corners(self) -> list[Any]:
        """Values that bound the range (both ends, or every choice): each must make a valid
        threat."""
        if self.choice is not None:
            return list(self.choice)
        low, high = self.uniform or self.log_uniform or self.integer  # type: ignore[misc]
        if self.integer is not None:
            high = low + (high - low) // self.step * self.step
        return [low, high]

    def grid(self) -> list[Any] | None:
        """Every value for the grid sampler; None for a continuous range."""
        if self.choice is not None:
            return list(self.choice)
        if self.integer is not None:
            return list(range(self.integer[0], self.integer[1] + 1, self.step))
        return None


class ObjectiveSpec(StrictModel):
    """What the attacker maximises: a safety metric of the attacked model (mean over the
    threat's attack seeds) at the attack's last step."""

    metric: str = "concept_rate"


class ConstraintSpec(StrictModel):
    """The utility bound a trial must keep to count: ``metric`` of the attacked model (mean
    over attack seeds) at least ``min`` or at most ``max``."""

    metric: str
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _bound(self) -> ConstraintSpec:
        if (self.min is None) == (self.max is None):
            raise ValueError(
                f"constraint on {self.metric!r} needs exactly one bound: min (e.g. "
                "retain_accuracy min: 0.7) or max (e.g. classifier_fid max: 5.0)"
            )
        return self

    def violation(self, value: float) -> float:
        """<= 0 when ``value`` keeps the bound (Optuna's constraint convention)."""
        return (self.min - value) if self.min is not None else (value - self.max)  # type: ignore[operator]


class PrunerSpec(StrictModel):
    """Stop a trial early (issue 25): at each rung of ``search.report_at`` the trial reports
    its value (the objective, mean over attack seeds; ``-inf`` where the attacked model breaks
    the utility bound there, so an attack that already broke the model competes last) and
    the pruner decides whether it goes on. ``median`` (Optuna's ``MedianPruner``): stop a
    trial below the median of the earlier trials at the same rung, after
    ``startup_trials`` trials and from attack step ``warmup_steps`` on;
    ``successive_halving`` (``SuccessiveHalvingPruner``, Hyperband's inner loop): keep the
    top ``1/reduction_factor`` at each rung from ``min_resource`` on. Both are deterministic:
    a re-created study prunes the same trials."""

    kind: Literal["median", "successive_halving"]
    startup_trials: int = Field(default=5, ge=0, description="median: trials never pruned")
    warmup_steps: int = Field(
        default=0, ge=0, description="median: no pruning before this rung step"
    )
    min_resource: PositiveInt | None = Field(
        default=None, description="successive_halving: the first rung's step (None: Optuna's auto)"
    )
    reduction_factor: int = Field(
        default=4, ge=2, description="successive_halving: keep 1/reduction_factor per rung"
    )

    @model_validator(mode="after")
    def _fields_of_kind(self) -> PrunerSpec:
        own = {
            "median": {"startup_trials", "warmup_steps"},
            "successive_halving": {"min_resource", "reduction_factor"},
        }[self.kind]
        other = sorted(f for f in self.model_fields_set if f != "kind" and f not in own)
        if other:
            raise ValueError(
                f"pruner kind {self.kind} does not read {', '.join(other)} (it reads "
                f"{', '.join(sorted(own))})"
            )
        return self


class SearchSpec(StrictModel):
    """Search the threat's hyperparameters instead of fixing them: ``trials`` attacks per
    model row (and unlearning seed), drawn by ``sampler`` seeded with ``seed``; the values
    written in the threat are the fixed part. Every row gets the same budget and seed."""

    space: dict[str, SearchParam] = Field(
        default_factory=dict, description=f"threat field -> range, e.g. {EXAMPLE}"
    )
    trials: PositiveInt = 20
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    seed: int = 0
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    constraint: ConstraintSpec | None = Field(
        default=None, description="utility bound of the attacked model (required)"
    )
    report_at: list[int | float] = Field(
        default_factory=list,
        description="rungs at which each trial is evaluated before its last step: fractions "
        "in (0, 1) of the trial's steps (e.g. [0.25, 0.5]) or attack steps (e.g. [25, 50]); "
        "needed by pruner",
    )
    pruner: PrunerSpec | None = Field(
        default=None,
        description="stop weak trials at the report_at rungs: {kind: median} or {kind: "
        "successive_halving} (resalign.engine.search)",
    )

    @model_validator(mode="after")
    def _check(self) -> SearchSpec:
        if not self.space:
            raise ValueError(
                "search.space is empty: name at least one threat field to search, e.g. "
                f"space: {{{EXAMPLE}}}"
            )
        unknown = [k for k in self.space if k not in SEARCHABLE]
        if unknown:
            raise ValueError(
                f"search.space: {', '.join(map(repr, unknown))} cannot be searched; "
                f"searchable: {', '.join(SEARCHABLE)}"
            )
        for name, p in self.space.items():
            want = SEARCHABLE[name]
            if want == "choice" and p.choice is None:
                raise ValueError(f"search.space.{name} takes choice: [...]")
            if want == "int" and p.kind in ("uniform", "log_uniform"):
                raise ValueError(f"search.space.{name} is an integer: use integer: [low, high]")
        if self.constraint is None:
            raise ValueError(
                "search needs a utility bound (constraint), e.g. constraint: {metric: "
                "retain_accuracy, min: 0.7} or {metric: classifier_fid, max: 5.0}: the worst "
                "case counts only attacks that keep the model useful"
            )
        self._check_rungs()
        if self.sampler == "grid":
            cont = [k for k, p in self.space.items() if p.grid() is None]
            if cont:
                raise ValueError(
                    f"sampler grid needs finite values; {', '.join(cont)} are continuous "
                    "ranges (use choice: [...] or sampler tpe/random)"
                )
            size = 1
            for p in self.space.values():
                size *= len(p.grid() or [])
            if self.trials > size:
                raise ValueError(
                    f"sampler grid has {size} points but trials is {self.trials}; set "
                    f"trials <= {size}"
                )
        return self

    def _check_rungs(self) -> None:
        """``report_at`` is all fractions in (0, 1) or all positive integer steps."""
        at = self.report_at
        ints = [v for v in at if isinstance(v, int) and not isinstance(v, bool)]
        if ints and len(ints) != len(at):
            raise ValueError(
                f"search.report_at mixes steps and fractions ({at}): write fractions of the "
                "trial's steps (e.g. [0.25, 0.5]) or attack steps (e.g. [25, 50])"
            )
        if ints and min(ints) < 1:
            raise ValueError(f"search.report_at steps must be >= 1 (got {at})")
        if not ints and any(not 0 < v < 1 for v in at):
            raise ValueError(
                f"search.report_at fractions must lie strictly between 0 and 1 (got {at}); "
                "the last step is always evaluated"
            )
        if len(set(at)) != len(at):
            raise ValueError(f"search.report_at has duplicates: {at}")
        if self.pruner is not None and not at:
            raise ValueError(
                "search.pruner needs rungs to prune at: add report_at, e.g. report_at: "
                "[0.25, 0.5] (fractions of the trial's steps) or [25, 50] (steps)"
            )

    def rungs(self, steps: int) -> list[tuple[int, int]]:
        """The evaluation points of a trial of ``steps`` attack steps, in order, ending with
        the last step: ``(attack step, Optuna step)``. The Optuna step is what the pruner
        compares across trials: for fractions the fraction in thousandths (trials of
        different lengths meet at the same share of their budget), for steps the step. A
        rung at or past the last step is dropped; fractions that round to one step count
        once."""
        out: list[tuple[int, int]] = []
        fractions = self.report_at and not isinstance(self.report_at[0], int)
        for v in sorted(self.report_at):
            at, pstep = (
                (max(1, round(v * steps)), min(round(v * 1000), 999)) if fractions else (v, v)
            )
            if at < steps and all(at != a for a, _ in out):
                out.append((int(at), int(pstep)))
        out.append((steps, 1000 if fractions else steps))
        return out


def apply_values(threat: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """``threat`` (a dumped threat) with each ``field`` or ``block.field`` of ``values`` set."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in threat.items()}
    for name, v in values.items():
        head, _, tail = name.partition(".")
        if tail:
            block = dict(out.get(head) or {})
            block[tail] = v
            out[head] = block
        else:
            out[head] = v
    return out
