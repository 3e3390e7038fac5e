"""Hypergradients of the post-fine-tuning harmful loss.

Everything here works on *lists of tensors* (one entry per trained tensor), so it is
independent of how parameters are named or which model they belong to.

- :func:`richardson_solve` solves ``(I + γH) x = b`` by (damped) Richardson iteration on
  Hessian-vector products, with the published safeguards (divergence test, norm cap, halving
  retries, fallback) all configurable and all reported in :class:`SolveStats`.
- :func:`make_hvp` builds ``v ↦ H v`` for a scalar loss, by double backward or by
  forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``).
- :func:`moreau_hypergradient` is the Moreau-envelope (implicit) hypergradient
  ``(I + γH)⁻¹ ∇L_harm(θ*)`` with ``H = ∇²L_FT(θ*)``.
- :func:`unrolled_hypergradient` is the exact derivative through S inner optimizer steps
  (memory grows with S; used by tests, the ablation and the benchmark).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

Tensors = list[Tensor]
HVP = Callable[[Sequence[Tensor]], Tensors]
Backend = Literal["double_backward", "forward_over_reverse"]
DivergenceNorm = Literal["tensor_mean", "global"]
Fallback = Literal["drop", "first_order"]


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def squared_norms(a: Sequence[Tensor]) -> list[float]:
    """Each tensor's squared Euclidean norm, summed in float64: one host transfer for all of
    them (a ``float()`` per tensor cost 299 transfers per norm of the demo's UNet)."""
    if not a:
        return []
    return torch.stack([(x.double() ** 2).sum() for x in a]).tolist()


def _root(squares: Sequence[float]) -> float:
    # sum in list order from 0, as tensors_norm always summed: the same float
    return math.sqrt(float(sum(squares)))


def tensors_norm(a: Sequence[Tensor]) -> float:
    """Euclidean norm of a list of tensors seen as one vector."""
    return _root(squared_norms(a))


def tensors_cosine(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """Cosine similarity of two lists of tensors seen as vectors (0 when one is zero)."""
    na, nb = tensors_norm(a), tensors_norm(b)
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))) / (na * nb)


@dataclass
class SolveStats:
    """What a Richardson solve did.

    ``residuals[i]`` is ‖(I+γH)x_{i+1} − b‖ after iteration i+1 of the attempt that was kept;
    ``ratios`` the divergence test value ‖Jx‖/‖x‖ of the damped iteration map J = I − η(I+γH)
    at each iterate; ``retries`` how many times the damping was halved; ``fell_back`` whether
    the safeguards gave up (the result is then the fallback, see ``fallback``); ``damping`` the
    step η of the kept attempt; ``hvps`` the number of Hessian-vector products spent in total.
    """

    residuals: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    retries: int = 0
    fell_back: bool = False
    fallback: str | None = None
    damping: float = 1.0
    hvps: int = 0
    norm: float = 0.0
    reason: str | None = None
    gamma: float | None = None
    lambda_max: float | None = None

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        out = {
            f"{prefix}retries": float(self.retries),
            f"{prefix}fallback": float(self.fell_back),
            f"{prefix}damping": float(self.damping),
            f"{prefix}hvps": float(self.hvps),
        }
        for i, r in enumerate(self.residuals):
            out[f"{prefix}residual_{i}"] = float(r)
        if self.ratios:
            out[f"{prefix}max_ratio"] = float(max(self.ratios))
        if self.gamma is not None:
            out[f"{prefix}gamma"] = float(self.gamma)
        if self.lambda_max is not None:
            out[f"{prefix}lambda_max"] = float(self.lambda_max)
        return out


def _map_ratio(
    jx: Sequence[Tensor], x_squares: Sequence[float], xn: float, how: DivergenceNorm
) -> float:
    """‖Jx‖/‖x‖ over the whole vector (``global``), or the mean over tensors of the per-tensor
    ratios, tensors with x = 0 left out (``tensor_mean``, as the published code tests).
    ``x_squares`` are x's per-tensor squared norms (:func:`squared_norms`), computed once for
    ‖x‖ and the per-tensor ratios."""
    j_squares = squared_norms(jx)
    if how == "global":
        return _root(j_squares) / xn
    per = []
    for a, b in zip(j_squares, x_squares, strict=True):
        nb = _root([b])
        if nb > 0:
            per.append(_root([a]) / nb)
    return sum(per) / len(per)


def _attempt(
    b: Sequence[Tensor],
    hvp: HVP,
    gamma: float,
    iterations: int,
    eta: float,
    tol: float,
    divergence_ratio: float | None,
    divergence_norm: DivergenceNorm = "tensor_mean",
) -> tuple[Tensors, float, list[float], list[float], int, str | None]:
    # x0 = 0, so the first iterate is η·b without an HVP (H·0 = 0); each later HVP at x_k
    # gives both the residual of x_k and the next iterate, and one last HVP the residual of
    # the final iterate: K iterations cost K HVPs and every residual is reported.
    b = [t.detach() for t in b]
    x = [eta * t for t in b]
    residuals: list[float] = []
    ratios: list[float] = []
    hvps = 0
    for k in range(iterations):
        hx = [h.detach() for h in hvp(x)]
        hvps += 1
        r = [xi + gamma * hi - bi for xi, hi, bi in zip(x, hx, b)]  # (I+γH)x − b
        rn = tensors_norm(r)
        residuals.append(rn)
        x_squares = squared_norms(x)
        xn = _root(x_squares)
        if not math.isfinite(rn) or not math.isfinite(xn):
            return x, xn, residuals, ratios, hvps, "non-finite iterate"
        if xn > 0:
            jx = [xi - eta * (xi + gamma * hi) for xi, hi in zip(x, hx)]
            ratios.append(_map_ratio(jx, x_squares, xn, divergence_norm))
            if divergence_ratio is not None and ratios[-1] > divergence_ratio:
                return x, xn, residuals, ratios, hvps, f"divergence ratio {ratios[-1]:.3g}"
        if rn < tol or k == iterations - 1:
            break
        x = [xi - eta * ri for xi, ri in zip(x, r)]
    # every exit returns the x whose norm xn is (the caller needs ‖x‖ and it is computed)
    return x, xn, residuals, ratios, hvps, None


def richardson_solve(
    b: Sequence[Tensor],
    hvp: HVP,
    gamma: float,
    iterations: int,
    damping: float = 1.0,
    tol: float = 1e-10,
    *,
    divergence_ratio: float | None = None,
    divergence_norm: DivergenceNorm = "tensor_mean",
    max_norm: float | None = None,
    norm_of: Callable[[Tensors], float] | None = None,
    retries: int = 0,
    fallback: Fallback = "drop",
) -> tuple[Tensors, SolveStats]:
    """Solve ``(I + γH) x = b`` from ``x₀ = 0`` by damped Richardson iteration.

    ``x_{k+1} = x_k − η·((I+γH)x_k − b)``; with η = 1 this is the published
    ``x_{k+1} = b − γH x_k`` and K iterations give the K-term Neumann sum
    ``Σ_{j<K} (−γH)^j b``. It stops early once the residual falls below ``tol``.

    Safeguards (published: divergence_ratio 1 on the per-tensor mean, max_norm 0.2, 5 retries,
    then the term is dropped): an attempt fails when the divergence test ‖Jx‖/‖x‖ of the
    iteration map ``J = (1 − η)I − ηγH`` exceeds ``divergence_ratio`` at any iterate, when an
    iterate is not finite, or when ``norm_of(x)`` (default ‖x‖) exceeds ``max_norm``; a failed
    attempt is restarted with η halved, up to ``retries`` times. Then the result falls back to
    zeros (``"drop"``, published: the caller's gradient keeps only its other terms) or to ``b``
    (``"first_order"``: the first-order hypergradient). ``None`` disables a test.

    The published code iterates ``v ← Jᵀv + b`` with the map of one damped proximal gradient
    step, J = (1 − lr)·I − lr·H (γ = 1), and returns lr·v: that is this iteration with η = lr
    and x = η·v, so the test and the halving are the published ones. ``divergence_norm``:
    ``tensor_mean`` averages ‖J xᵢ‖/‖xᵢ‖ over tensors (published), ``global`` uses the whole
    vector. ``norm_of`` lets the caller test the norm of what x enters (the published test is on
    the whole per-config outer gradient, see :class:`resalign.algorithms.methods.ResAlign`).
    """
    if gamma <= 0 or iterations < 1 or not (0 < damping <= 1):
        raise ValueError("need gamma > 0, iterations >= 1 and 0 < damping <= 1")
    stats = SolveStats()
    eta = float(damping)
    for attempt in range(retries + 1):
        x, xnorm, res, ratios, n, reason = _attempt(
            b, hvp, gamma, iterations, eta, tol, divergence_ratio, divergence_norm
        )
        stats.hvps += n
        if reason is None and max_norm is not None:
            tested = xnorm if norm_of is None else norm_of(x)
            if tested > max_norm:
                reason = f"norm {tested:.3g} > max_norm {max_norm:.3g}"
        stats.residuals, stats.ratios, stats.damping, stats.norm = res, ratios, eta, xnorm
        stats.reason = reason
        if reason is None:
            stats.retries = attempt
            return x, stats
        if attempt < retries:
            eta /= 2
    stats.retries = retries
    stats.fell_back = True
    stats.fallback = fallback
    if fallback == "first_order":
        out = [t.detach().clone() for t in b]
    elif fallback == "drop":
        out = [torch.zeros_like(t) for t in b]
    else:
        raise ValueError(f"unknown fallback {fallback!r}")
    stats.norm = tensors_norm(out)
    return out, stats


def make_hvp(
    loss_fn: Callable[[Sequence[Tensor]], Tensor],
    params: Sequence[Tensor],
    backend: Backend = "double_backward",
) -> HVP:
    """Return ``hvp(v) = ∇²loss(params)·v`` (a list shaped like ``params``).

    ``double_backward`` builds the gradient graph once and differentiates it again for every
    ``v`` (one forward + backward, then one extra backward per product);
    ``forward_over_reverse`` runs ``torch.func.jvp`` over ``torch.func.grad`` for every ``v``
    (no retained graph). ``loss_fn`` must be deterministic (fixed batch, noise, timesteps) and
    must write squared errors out: forward-mode AD does not support ``F.mse_loss`` here.
    Models with attention must run it under :func:`resalign.models.attention.math_attention`.
    """
    base = [p.detach() for p in params]
    if backend == "double_backward":
        leaves = [p.clone().requires_grad_(True) for p in base]
        with torch.enable_grad():
            loss = loss_fn(leaves)
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]

        def hvp(v: Sequence[Tensor]) -> Tensors:
            if not live:
                return [torch.zeros_like(p) for p in base]
            hv = torch.autograd.grad(
                [grads[i] for i in live],
                leaves,
                grad_outputs=[v[i].detach() for i in live],
                retain_graph=True,
                allow_unused=True,
            )
            # zeros only where H has no path (they were allocated for every tensor, then
            # overwritten)
            return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(base, hv)]

        return hvp
    if backend == "forward_over_reverse":
        grad_fn = torch.func.grad(lambda ps: loss_fn(list(ps)))

        def hvp(v: Sequence[Tensor]) -> Tensors:
            _, tangent = torch.func.jvp(grad_fn, (tuple(base),), (tuple(t.detach() for t in v),))
            return [t.detach() for t in tangent]

        return hvp
    raise ValueError(f"unknown HVP backend {backend!r}")


def power_iteration(
    hvp: HVP,
    like: Sequence[Tensor],
    iterations: int = 20,
    generator: torch.Generator | None = None,
    tol: float = 1e-3,
) -> tuple[float, int]:
    """Estimate the eigenvalue of largest magnitude of H by power iteration on HVPs.

    Starts from a random unit vector (on ``generator``) and iterates v ← Hv/‖Hv‖. The
    magnitude is ‖Hv‖ of the unit iterate, the sign that of its Rayleigh quotient vᵀHv
    (an indefinite H can have its largest magnitude at a negative eigenvalue); returns
    (estimate, HVPs spent). It stops when the magnitude changes by less than ``tol``
    (relative). Why ‖Hv‖, not vᵀHv: when the top two eigenvalues are ±λ (or close in
    magnitude and opposite in sign) the iterate keeps mixing both eigenvectors, its Rayleigh
    quotient stalls near 0 and passes the stopping test, while ‖Hv‖ → |λ| from below
    (measured: toy LoRA fine-tuning Hessian, Rayleigh 0.02-0.03, a γ auto 3-5x too large).
    The damped Richardson iteration of :func:`richardson_solve` converges iff every
    eigenvalue λ of H satisfies |1 − η(1 + γλ)| < 1, so γ·|λ|max is the number that decides
    whether a γ is usable.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    v = [torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device) for t in like]
    n = tensors_norm(v)
    v = [t / n for t in v]
    rq, mag, prev = 0.0, 0.0, None
    for k in range(1, iterations + 1):
        hv = [h.detach() for h in hvp(v)]
        rq = float(_dot(v, hv))
        mag = tensors_norm(hv)
        if mag == 0.0 or not math.isfinite(mag):
            return rq, k
        v = [t / mag for t in hv]
        if prev is not None and abs(mag - prev) <= tol * mag:
            return math.copysign(mag, rq), k
        prev = mag
    return math.copysign(mag, rq), iterations


def moreau_hypergradient(
    harm_grad: Sequence[Tensor],
    ft_loss_fn: Callable[[Sequence[Tensor]], Tensor],
    params_star: Sequence[Tensor],
    *,
    gamma: float | Literal["auto"] = 1.0,
    iterations: int = 5,
    tol: float = 1e-10,
    backend: Backend = "double_backward",
    gamma_fraction: float = 0.5,
    power_iterations: int = 20,
    damping: float = 1.0,
    divergence_ratio: float | None = 1.0,
    divergence_norm: DivergenceNorm = "tensor_mean",
    max_norm: float | None = 0.2,
    norm_of: Callable[[Tensors], float] | None = None,
    retries: int = 5,
    fallback: Fallback = "drop",
) -> tuple[Tensors, SolveStats]:
    """``d L_harm(θ*)/dθ₀ ≈ (I + γH)⁻¹ ∇L_harm(θ*)`` with ``H = ∇²L_FT(θ*)``.

    θ* stands for the Moreau-envelope fine-tuning solution
    ``argmin_θ' L_FT(θ') + ‖θ' − θ₀‖²/(2γ)``; implicit differentiation of its first-order
    condition gives the linear system solved here by :func:`richardson_solve`.
    ``harm_grad`` is ∇L_harm at θ*, ``ft_loss_fn`` the fine-tuning loss whose Hessian is used.
    Defaults are the published ones.

    ``gamma="auto"`` (ours): γ = ``gamma_fraction``/|λ|max with |λ|max of this H estimated by
    :func:`power_iteration` (at most ``power_iterations`` extra HVPs, on the same graph). With
    the fraction ½ every eigenvalue of γH lies in [−½, ½], so the undamped iteration contracts
    the error by ½ or better per step (K = 5: residual ≤ 1/32 of ‖b‖) and never trips the
    divergence test; a fixed γ = 1 needs λ_max < 1, which the measured UNets do not have
    (docs/algorithm.md). The γ used and the estimate are reported in the stats.
    """
    hvp = make_hvp(ft_loss_fn, params_star, backend)
    lam: float | None = None
    spent = 0
    if gamma == "auto":
        lam, spent = power_iteration(hvp, params_star, power_iterations)
        gamma = gamma_fraction / abs(lam) if lam != 0.0 and math.isfinite(lam) else 1.0
    x, stats = richardson_solve(
        harm_grad,
        hvp,
        float(gamma),
        iterations,
        damping,
        tol,
        divergence_ratio=divergence_ratio,
        divergence_norm=divergence_norm,
        max_norm=max_norm,
        norm_of=norm_of,
        retries=retries,
        fallback=fallback,
    )
    stats.hvps += spent
    stats.gamma, stats.lambda_max = float(gamma), lam
    return x, stats


def unrolled_hypergradient(
    params0: Sequence[Tensor],
    inner_loss_fn: Callable[[Sequence[Tensor], int], Tensor],
    harm_loss_fn: Callable[[Sequence[Tensor]], Tensor],
    steps: int,
    optimizer: object,
) -> tuple[Tensors, Tensors, list[float]]:
    """Exact ``d L_harm(θ_S)/dθ₀`` through ``steps`` inner updates of ``optimizer``.

    ``optimizer`` is a :class:`resalign.algorithms.inner.FunctionalOptimizer`;
    ``inner_loss_fn(params, k)`` the loss of inner step k. The whole trajectory stays in the
    autograd graph (memory grows linearly with ``steps``): this is the reference the Moreau
    approximation is checked against, not a training path. Returns
    ``(hypergradient, θ_S detached, inner losses)``.
    """
    leaves = [p.detach().clone().requires_grad_(True) for p in params0]
    with torch.enable_grad():
        state = optimizer.init(leaves)  # type: ignore[attr-defined]
        cur: Tensors = list(leaves)
        losses: list[float] = []
        for k in range(steps):
            loss = inner_loss_fn(cur, k)
            losses.append(float(loss.detach()))
            grads = torch.autograd.grad(loss, cur, create_graph=True, allow_unused=True)
            grads = [torch.zeros_like(c) if g is None else g for c, g in zip(cur, grads)]
            cur, state = optimizer.step(cur, grads, state)  # type: ignore[attr-defined]
        harm = harm_loss_fn(cur)
        hyper = torch.autograd.grad(harm, leaves, allow_unused=True)
    out = [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(leaves, hyper)]
    return out, [c.detach() for c in cur], losses
