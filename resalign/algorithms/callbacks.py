"""Per-step statistics: what every method reports through its one callback.

A method calls ``callback(stats)`` once per outer step with a flat dict. Values are floats
(loss terms, norms, residuals, counts) or strings (the sampled inner configuration's name,
algorithm, optimizer, dataset). Keys:

- ``loss_harm``, ``loss_reg_<i>`` and ``weight_reg_<i>`` (regularizer i), ``loss_total``;
  ``grad_norm`` (the applied outer gradient), ``direct_grad_norm``; ``lr``.
- resilience (``resalign`` only): ``hypergrad_norm`` (norm of the mean hypergradient),
  ``retries``, ``fallbacks``, ``cosine`` (mean cosine between each hypergradient and the direct
  gradient at θ*), ``resilience_cosine`` (cosine between the mean hypergradient and the direct
  gradient at θ, the two parts of the applied step), ``resilience_ratio`` (the resilience
  part's norm over the direct part's, β·‖mean‖/‖direct‖ times the meta rate where it scales
  only the hypergradient), ``inner_loss`` (mean final inner loss), ``residual_<i>`` (mean Richardson
  residual after iteration i+1), and per sampled configuration j the same under ``meta<j>.``
  plus ``meta<j>.config``, ``.algorithm``, ``.optimizer``, ``.data`` (strings) and ``.lr``,
  ``.steps``, ``.batch_size`` (numbers).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext

StatValue = float | str
Stats = dict[str, StatValue]
StepCallback = Callable[[Stats], None]

# Phases of an outer step a method enters, in order of first use: ``direct`` (∇ of the direct
# terms at θ), ``inner`` (each simulated fine-tune; all of ``unrolled``), ``harm_grad``
# (∇L_harm at θ*), ``richardson`` (the HVP graph and the Moreau solve), ``update`` (the outer
# optimizer step). A ``PhaseHook`` is called with the name and returns the context the method
# runs that phase in (timers, memory peaks: resalign/bench/sd.py); phases never nest.
PHASES = ("direct", "inner", "harm_grad", "richardson", "update")
PhaseHook = Callable[[str], AbstractContextManager[None]]


def no_phases(name: str) -> AbstractContextManager[None]:
    """The default hook: run every phase as is."""
    return nullcontext()


def numeric(stats: Mapping[str, StatValue]) -> dict[str, float]:
    """The numeric part of ``stats`` (what goes to a metrics logger)."""
    return {k: float(v) for k, v in stats.items() if isinstance(v, int | float)}


def textual(stats: Mapping[str, StatValue]) -> dict[str, str]:
    """The string part of ``stats`` (sampled configuration names and kinds)."""
    return {k: v for k, v in stats.items() if isinstance(v, str)}
