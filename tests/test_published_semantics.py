"""The published aggregation of ResAlign, pinned on the real method (tiny UNet, float64).

Published (AntigoneRandy/ResAlign, ``BiLevelOptimizer.step`` / ``fixed_point``): every sampled
config j yields a whole outer gradient gⱼ = (1 − β)∇L_harm(θ) + α∇R(θ) + β·hⱼ; a config whose
solve fails its safeguards (divergence, or ‖gⱼ‖ > max_norm, after halving retries) yields its
direct terms only; the update is meta_rate·(1/J)·Σⱼ gⱼ. With the outer optimizer SGD at lr 1
and no decay, a step's parameter change is exactly minus that gradient, and the direct terms
are recomputed independently by a twin built from the same seed (same batches).
"""

from __future__ import annotations

from typing import Any

import torch

from resalign.algorithms.hypergrad import tensors_norm
from resalign.algorithms.methods import METHODS, UnlearnProblem, build_method
from resalign.algorithms.toy import toy_problem
from resalign.spec.schema.unlearn import UnlearnSpec

D = torch.float64
BETA = 0.8


def _problem() -> UnlearnProblem:
    return toy_problem(dtype=D)


def _spec(rate: float = 1.0, scope: str = "update", **hyper: Any) -> UnlearnSpec:
    return UnlearnSpec.model_validate(
        {
            "steps": 4,
            "optimizer": {"name": "sgd", "lr": 1.0, "weight_decay": 0.0},
            "regularizers": [{"kind": "distill", "weight": 1.6, "batch_size": 2}],
            "resilience": {
                "beta": BETA,
                "hypergradient": {"iterations": 3, "gamma": 0.5, "max_norm": None, **hyper},
                "meta": {
                    "samples_per_step": 2,
                    "meta_rate": rate,
                    "meta_rate_scope": scope,
                    "data": ["benign"],
                    "distribution": {"lr": [1e-2], "steps": [2], "optimizer": ["sgd", "adam"]},
                },
            },
        }
    )


def _grad(spec: UnlearnSpec) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """The outer gradient one real ``step()`` applied, and its stats."""
    seen: list[dict[str, Any]] = []
    m = build_method("resalign", _problem(), spec, seed=3, callback=seen.append)
    before = [p.detach().clone() for p in m.params]
    m.step()
    return [b - p.detach() for b, p in zip(before, m.params)], seen[0]


def _direct(spec: UnlearnSpec) -> list[torch.Tensor]:
    twin = build_method("resalign", _problem(), spec, seed=3)
    return twin.direct_terms(harm_coef=1.0 - BETA)[0]


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    diff = tensors_norm([x - y for x, y in zip(a, b)])
    return diff <= 1e-12 * max(tensors_norm(b), 1e-300)


def test_meta_rate_scales_the_whole_update_by_default() -> None:
    one, st = _grad(_spec(1.0))
    assert (st["fallbacks"], st["retries"]) == (0.0, 0.0)
    direct = _direct(_spec(1.0))
    mean_h = [(g - d) / BETA for g, d in zip(one, direct)]
    assert tensors_norm(mean_h) > 1e-3 * tensors_norm(direct)  # the term is really there
    published, _ = _grad(_spec(0.3))
    assert _close(published, [0.3 * g for g in one])
    # the named departure: meta_rate on the hypergradient term only
    ours, _ = _grad(_spec(0.3, scope="hypergradient"))
    assert _close(ours, [d + BETA * 0.3 * h for d, h in zip(direct, mean_h)])


def test_failed_solve_drops_the_fine_tuned_harm_term() -> None:
    # γ = 1e4: γ·ρ(H) ≫ 1, no halving passes the divergence test; both configs fall back
    spec = _spec(0.3, gamma=1e4, retries=2)
    grad, st = _grad(spec)
    assert st["fallbacks"] == 2.0 and st["retries"] == 4.0
    assert _close(grad, [0.3 * d for d in _direct(spec)])
    # the named departure: the first-order term ∇L_harm(θ*) replaces the failed solve
    first, st1 = _grad(_spec(0.3, gamma=1e4, retries=2, fallback="first_order"))
    assert st1["fallbacks"] == 2.0
    assert tensors_norm([a - b for a, b in zip(first, grad)]) > 1e-3 * tensors_norm(grad)


def test_norm_cap_is_on_the_whole_per_config_gradient() -> None:
    """One config (J = 1): the cap is placed halfway between ‖h‖ and ‖direct + β·h‖, so exactly
    one of the two tests fails it: the published one (whole gradient) and the departure
    (hypergradient alone) must decide oppositely, each dropping the term when it fails."""

    def spec(**hyper: Any) -> UnlearnSpec:
        s = _spec(1.0, retries=0, **hyper)
        s.resilience.meta.samples_per_step = 1
        return s

    free, _ = _grad(spec())
    direct = _direct(spec())
    h = [(g - d) / BETA for g, d in zip(free, direct)]
    # identity inner view (LoRA own): the solve's x is h itself
    alone_norm, whole_norm = tensors_norm(h), tensors_norm(free)
    assert abs(alone_norm - whole_norm) > 0.05 * whole_norm, (alone_norm, whole_norm)
    cap = (alone_norm + whole_norm) / 2
    for on, norm in (("config_gradient", whole_norm), ("hypergradient", alone_norm)):
        got, st = _grad(spec(max_norm=cap, max_norm_on=on))
        dropped = norm > cap
        assert st["fallbacks"] == float(dropped), on
        assert _close(got, direct if dropped else free), on


def test_registry_and_schema_name_the_same_methods() -> None:
    from typing import get_args

    declared = set(get_args(UnlearnSpec.model_fields["method"].annotation))
    # "none" is the schema's "no unlearning" (the original model), not a method class
    assert declared - {"none"} == set(METHODS)
    assert "none" not in METHODS


def test_defaults_are_the_published_ones() -> None:
    h = UnlearnSpec().resilience.hypergradient
    assert (h.fallback, h.max_norm, h.max_norm_on, h.divergence_norm) == (
        "drop",
        0.2,
        "config_gradient",
        "tensor_mean",
    )
    meta = UnlearnSpec().resilience.meta
    assert (meta.meta_rate, meta.meta_rate_scope) == (0.3, "update")
