"""The ``probes`` section: cheap diagnostics of each model row that might predict resurgence
(issue 26, "what decides resurgence").

With a ``probes`` block the graph gains one ``probe`` node per report row and unlearning seed
on the model before fine-tuning (``probe/<row>[/seed<u>]/pre``) and, for the quantities in
``along_attack``, one per attack segment (``probe/<row>[/seed<u>]/<threat>/seed<a>/step<n>``);
the report then says, per threat and row, how well each quantity separates the unlearned
models that resurged from those that did not (:mod:`resalign.evaluation.predictors`).
A top-level section, like ``controls``: no existing node reads it, so adding it leaves every
existing key as it was and only adds nodes (and re-keys the report, which reads them).

Quantities (:mod:`resalign.algorithms.probes`), all on every UNet parameter:

- ``weight_distance``: ‖θ − θ₀‖ / ‖θ₀‖ from the model the row starts from (global, and per
  block type: attention, resnet, other);
- ``harmful_loss``: the denoising loss on ``batch_size`` items of ``data`` with noise and
  timesteps drawn from ``seed`` (the same for every model, so values compare across models);
- ``harmful_grad_norm``: the norm of its gradient;
- ``lambda_max``: the eigenvalue of largest magnitude of its Hessian (power iteration on
  Hessian-vector products);
- ``hessian_trace``: a Hutchinson estimate of the Hessian's trace (Rademacher vectors).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt, field_validator

from .base import StrictModel

ProbeQuantity = Literal[
    "weight_distance", "harmful_loss", "harmful_grad_norm", "lambda_max", "hessian_trace"
]
ALL_QUANTITIES: tuple[str, ...] = (
    "weight_distance",
    "harmful_loss",
    "harmful_grad_norm",
    "lambda_max",
    "hessian_trace",
)


class ProbesSpec(StrictModel):
    """Diagnostics per model row (see the module docstring)."""

    data: str = Field(
        description="image–caption pairs of the concept the harmful loss is measured on "
        "(a dataset name; held-out images of the concept, e.g. the demo's held_out)"
    )
    quantities: list[ProbeQuantity] = Field(
        default_factory=lambda: list(ALL_QUANTITIES),
        min_length=1,
        description="what the probe node before fine-tuning measures",
    )
    along_attack: list[ProbeQuantity] = Field(
        default_factory=list,
        description="what is also measured after every attack segment (a probe node per "
        "segment; e.g. [harmful_loss] shows the harmful loss along a benign fine-tune); "
        "empty: no segment probes. Attacks that leave the UNet unchanged (embedding) get none",
    )
    batch_size: PositiveInt = Field(
        default=64,
        description="items the harmful loss and its curvature are measured on: the data "
        "cycled in a seeded order (so a batch larger than the data draws each image's noise "
        "more than once)",
    )
    power_iterations: PositiveInt = Field(
        default=20, description="at most this many Hessian-vector products for lambda_max"
    )
    power_tol: float = Field(
        default=1.0e-3,
        ge=0,
        allow_inf_nan=False,
        description="power iteration stops when lambda_max changes by less than this "
        "(relative); 0: always power_iterations products",
    )
    hutchinson_samples: PositiveInt = Field(
        default=10, description="Rademacher vectors of the Hutchinson trace estimate"
    )
    seed: int = Field(
        default=0,
        description="seed of the batch order, its noise and timesteps, the power "
        "iteration's start vector and the Hutchinson vectors (the same for every model)",
    )

    @field_validator("quantities", "along_attack")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        """Each quantity once, in the canonical order (so the order written is not a key)."""
        return [q for q in ALL_QUANTITIES if q in v]
