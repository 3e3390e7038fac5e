"""Hypergradient solvers against dense solves, finite differences and closed forms."""

from __future__ import annotations

import torch

from resalign.algorithms.hypergrad import power_iteration, tensors_norm
from resalign.algorithms.inner import FunctionalOptimizer
from resalign.algorithms.objectives import Denoiser, denoise_loss, noise_batch
from resalign.algorithms.toy import toy_pairs, toy_scheduler, toy_unet
from resalign.hypergrad import (
    make_hvp,
    moreau_hypergradient,
    richardson_solve,
    unrolled_hypergradient,
)
from resalign.models.attention import math_attention
from resalign.models.trainable import apply_trainable
from resalign.spec.schema.model import TrainableSpec

D = torch.float64


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def split(vec, like):
    out, i = [], 0
    for t in like:
        out.append(vec[i : i + t.numel()].reshape(t.shape))
        i += t.numel()
    return out


def sym_matrix(n, eigs, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    return q @ torch.diag(torch.as_tensor(eigs, dtype=D)) @ q.T


def dense_problem(eigs, seed=0):
    n = len(eigs)
    h = sym_matrix(n, eigs, seed)
    g = torch.Generator().manual_seed(seed + 1)
    like = [torch.zeros(3, dtype=D), torch.zeros(n - 3, dtype=D)]
    b = split(torch.randn(n, generator=g, dtype=D), like)
    return h, b, (lambda v: split(h @ flat(v), like)), like


def test_richardson_matches_dense_solve():
    gamma = 0.5
    eigs = torch.linspace(-1.2, 1.6, 12)  # indefinite, γ|λ| ≤ 0.8: plain Richardson converges
    h, b, hvp, _ = dense_problem(eigs)
    x, st = richardson_solve(b, hvp, gamma, iterations=400, tol=1e-14)
    exact = torch.linalg.solve(torch.eye(12, dtype=D) + gamma * h, flat(b))
    assert (flat(x) - exact).norm() / exact.norm() < 1e-8
    assert not st.fell_back and st.retries == 0
    assert st.residuals[-1] < 1e-13 and len(st.residuals) < 400  # stopped early at tol


def test_damped_richardson_converges_where_plain_diverges():
    gamma = 1.0
    eigs = torch.linspace(0.1, 2.8, 10)  # γλ up to 2.8: η = 1 diverges, η = 1/2 converges
    h, b, hvp, _ = dense_problem(eigs, seed=3)
    x, st = richardson_solve(
        b, hvp, gamma, iterations=600, tol=1e-13, divergence_ratio=1.0, retries=5
    )
    exact = torch.linalg.solve(torch.eye(10, dtype=D) + gamma * h, flat(b))
    assert st.retries >= 1 and not st.fell_back and st.damping < 1.0
    assert (flat(x) - exact).norm() / exact.norm() < 1e-8


def test_truncated_richardson_is_neumann_partial_sum():
    gamma = 0.7
    eigs = torch.linspace(-2.0, 2.0, 9)  # indefinite and not convergent: the sum is still exact
    h, b, hvp, _ = dense_problem(eigs, seed=5)
    x, st = richardson_solve(b, hvp, gamma, iterations=5, tol=0.0)
    term, total = flat(b), torch.zeros(9, dtype=D)
    for _ in range(5):
        total = total + term
        term = -gamma * h @ term
    assert torch.allclose(flat(x), total, rtol=1e-12, atol=1e-14)
    assert len(st.residuals) == 5 and st.hvps == 5
    # each reported residual is ‖(I+γH)x_k − b‖ of the k-th iterate: check the last one
    res = (torch.eye(9, dtype=D) + gamma * h) @ total - flat(b)
    assert abs(st.residuals[-1] - float(res.norm())) < 1e-10


def test_safeguards_damp_then_fall_back_and_report():
    gamma = 1.0
    eigs = torch.linspace(-4.0, 1.0, 10)  # 1 + γλ < 0: no damping can make Richardson converge
    _, b, hvp, _ = dense_problem(eigs, seed=7)
    x, st = richardson_solve(
        b, hvp, gamma, iterations=20, divergence_ratio=1.0, retries=3, fallback="first_order"
    )
    assert st.fell_back and st.retries == 3 and st.fallback == "first_order"
    assert abs(st.damping - 1.0 / 8) < 1e-15  # halved three times
    assert st.reason is not None and "divergence" in st.reason
    assert torch.equal(flat(x), flat(b))
    metrics = st.as_metrics()
    assert metrics["fallback"] == 1.0 and metrics["retries"] == 3.0
    # the published fallback (the default) drops the term
    x0, st0 = richardson_solve(b, hvp, gamma, iterations=20, divergence_ratio=1.0, retries=0)
    assert st0.fell_back and st0.fallback == "drop" and float(flat(x0).abs().max()) == 0.0
    # the norm cap alone also triggers the fallback
    good = torch.linspace(0.1, 0.5, 10)
    _, b2, hvp2, _ = dense_problem(good, seed=8)
    _, st2 = richardson_solve(b2, hvp2, gamma, iterations=10, max_norm=1e-3, retries=2)
    assert st2.fell_back and "max_norm" in st2.reason


def test_divergence_test_is_the_published_damped_map_per_tensor_mean():
    """The published map is J = (1 − η)I − ηγH (one damped proximal gradient step) and its test
    is the mean over tensors of ‖J xᵢ‖/‖xᵢ‖. Hand computation on a block-diagonal H: tensor 1
    sees H = 3·I, tensor 2 H = 0.1·I. First iterate x₁ = η·b, so with η = 1, γ = 1 the per-tensor
    ratios are |1 − 1 − 3| = 3 and |−0.1| = 0.1: mean 1.55 > 1 fails; the global ratio
    ‖Jx‖/‖x‖ with ‖b₁‖ = 0.1, ‖b₂‖ = 10 is ≈ 0.1 and passes. After one halving (η = ½) the
    per-tensor ratios are |½ − 3/2| = 1 and |½ − 0.05| = 0.45: mean 0.725 passes."""
    b = [torch.full((4,), 0.05, dtype=D), torch.full((25,), 2.0, dtype=D)]
    assert abs(tensors_norm([b[0]]) - 0.1) < 1e-12 and abs(tensors_norm([b[1]]) - 10) < 1e-12

    def hvp(v):
        return [3.0 * v[0], 0.1 * v[1]]

    _, st = richardson_solve(b, hvp, 1.0, iterations=1, divergence_ratio=1.0, retries=0)
    assert st.fell_back and abs(st.ratios[0] - 1.55) < 1e-12
    glob = ((0.1 * 3) ** 2 + (10 * 0.1) ** 2) ** 0.5 / (0.1**2 + 10**2) ** 0.5
    _, sg = richardson_solve(
        b, hvp, 1.0, iterations=1, divergence_ratio=1.0, divergence_norm="global"
    )
    assert not sg.fell_back and abs(sg.ratios[0] - glob) < 1e-12
    _, s2 = richardson_solve(b, hvp, 1.0, iterations=1, divergence_ratio=1.0, retries=1)
    assert s2.retries == 1 and not s2.fell_back and abs(s2.ratios[0] - 0.725) < 1e-12


def test_norm_cap_tests_what_the_caller_says():
    """``norm_of``: the published cap is on the whole per-config gradient d + β·x, not ‖x‖.
    H = 0 and one iteration make x = η·b exactly; with d ⟂ b, ‖d + βx‖² = ‖d‖² + β²η²‖b‖² by hand."""
    b = [torch.tensor([0.0, 0.3], dtype=D)]
    d = [torch.tensor([0.4, 0.0], dtype=D)]
    beta = 0.5

    def zero(v):
        return [torch.zeros_like(t) for t in v]

    def whole(x):
        return tensors_norm([di + beta * xi for di, xi in zip(d, x)])

    # ‖x‖ = 0.3 passes a 0.35 cap; the whole gradient (0.4² + 0.15²)^½ = 0.427 does not, and
    # halving η only shrinks the β·x part: (0.4² + 0.075²)^½ = 0.407 still fails → dropped
    x, st = richardson_solve(b, zero, 1.0, 1, max_norm=0.35)
    assert not st.fell_back and torch.allclose(x[0], b[0])
    x, st = richardson_solve(b, zero, 1.0, 1, max_norm=0.35, norm_of=whole, retries=1)
    assert st.fell_back and st.damping == 0.5 and float(x[0].abs().max()) == 0.0
    assert "0.407" in str(st.reason)
    # a cap of 0.41 passes after one halving: x = ½·b
    x, st = richardson_solve(b, zero, 1.0, 1, max_norm=0.41, norm_of=whole, retries=1)
    assert st.retries == 1 and not st.fell_back and torch.allclose(x[0], 0.5 * b[0])


def test_power_iteration_matches_dense_eigensolve():
    # PSD with a gap at the top, and an indefinite one whose largest |λ| is negative
    for eigs, seed in (
        (torch.linspace(0.01, 3.0, 11).tolist() + [6.0], 11),
        ([-5.0, 0.5, 1.0, 2.0, 3.0], 12),
    ):
        h, _, hvp, like = dense_problem(eigs, seed=seed)
        top = torch.linalg.eigvalsh(h)
        want = float(top[top.abs().argmax()])
        lam, n = power_iteration(hvp, like, iterations=200, tol=1e-10)
        assert abs(lam - want) < 1e-6 * abs(want), (lam, want)
        assert n < 200


def test_power_iteration_magnitude_when_the_top_pair_has_opposite_signs():
    """Eigenvalues +4 and −4 at the top (an indefinite fine-tuning Hessian): the iterate
    mixes both eigenvectors for ever, so its Rayleigh quotient hovers near 0 and stops
    changing; the estimate of |λ|max, which γ auto divides by, must still be 4 (it was the
    Rayleigh quotient, which gave γ many times too large: issue 26's end-to-end check saw
    λ_max 0.02-0.03 on the toy LoRA problem and a hypergradient 8-42x the true norm)."""
    h, _, hvp, like = dense_problem([-4.0, 0.3, 1.0, 2.0, 4.0], seed=14)
    lam, _ = power_iteration(hvp, like, iterations=50, tol=1e-3)
    assert abs(abs(lam) - 4.0) < 1e-2, lam


def test_gamma_auto_solves_where_gamma_one_diverges():
    """λ_max = 40: with γ = 1 the published solve must halve its step 4 times to pass the
    divergence test, and its 5 iterations then leave a residual above half of ‖b‖; γ = auto takes
    γ = ½/λ_max from power iteration and K = 5 undamped iterations reach the dense solution
    of (I + γH)x = b to the contraction bound ½⁵ (all eigenvalues of γH in [0, ½])."""
    eigs = torch.linspace(0.05, 10.0, 14).tolist() + [40.0]
    h, b, _, like = dense_problem(eigs, seed=13)
    params = [torch.zeros_like(t) for t in like]

    def ft(ps):  # ½ψᵀHψ: its Hessian is H
        v = flat(ps)
        return 0.5 * v @ h @ v

    _, s1 = moreau_hypergradient(b, ft, params, gamma=1.0, max_norm=None)
    assert s1.retries >= 4 and s1.residuals[-1] > 0.5 * tensors_norm(b), s1
    x, st = moreau_hypergradient(
        b, ft, params, gamma="auto", max_norm=None, tol=0.0, power_iterations=100
    )
    assert not st.fell_back and st.retries == 0
    assert abs(st.lambda_max - 40.0) < 1e-3 * 40 and abs(st.gamma - 0.5 / st.lambda_max) < 1e-15
    exact = torch.linalg.solve(torch.eye(15, dtype=D) + st.gamma * h, flat(b))
    err = float((flat(x) - exact).norm() / exact.norm())
    assert err < 0.5**5, err
    assert st.hvps > 5  # the power iteration's products are counted
    assert st.as_metrics()["gamma"] == st.gamma


def _tiny_lora(seed=0):
    unet = toy_unet("tiny", D, seed=seed)
    sel = apply_trainable(unet, TrainableSpec(), torch.Generator().manual_seed(1))
    return unet, sel


def test_hvp_of_tiny_unet_matches_finite_differences_and_backends_agree():
    unet, sel = _tiny_lora()
    sched = toy_scheduler()
    params = dict(unet.named_parameters())
    names = sel.names
    den = Denoiser(unet, sched, {})
    nb = noise_batch(toy_pairs(2, 8, seed=0), sched, torch.Generator().manual_seed(2))
    theta = [params[n].detach().clone() for n in names]

    def loss(ps):
        return denoise_loss(den, dict(zip(names, ps)), nb)

    g = torch.Generator().manual_seed(4)
    v = [torch.randn(t.shape, generator=g, dtype=D) for t in theta]
    with math_attention(unet):
        h_db = make_hvp(loss, theta, "double_backward")(v)
        h_fr = make_hvp(loss, theta, "forward_over_reverse")(v)

        def grad_at(ps):
            ps = [p.clone().requires_grad_(True) for p in ps]
            return torch.autograd.grad(loss(ps), ps)

        eps = 1e-5
        gp = grad_at([t + eps * vi for t, vi in zip(theta, v)])
        gm = grad_at([t - eps * vi for t, vi in zip(theta, v)])
    fd = [(a - b) / (2 * eps) for a, b in zip(gp, gm)]
    assert (flat(h_db) - flat(fd)).norm() / flat(fd).norm() < 1e-6
    assert (flat(h_db) - flat(h_fr)).norm() / flat(h_db).norm() < 1e-10


def _quadratic(n=7, seed=11):
    g = torch.Generator().manual_seed(seed)
    a = sym_matrix(n, torch.linspace(-0.3, 2.0, n), seed)  # indefinite fine-tuning Hessian
    c = torch.randn(n, generator=g, dtype=D)
    d = torch.randn(n, generator=g, dtype=D)
    like = [torch.zeros(3, dtype=D), torch.zeros(2, 2, dtype=D)]

    def ft(ps):
        x = flat(ps)
        return 0.5 * x @ a @ x - c @ x

    def harm(ps):
        x = flat(ps)
        return torch.sin(x).sum() + 0.5 * ((x - d) ** 2).sum()

    return a, c, like, ft, harm


def test_moreau_matches_closed_form_implicit_gradient():
    a, c, like, ft, harm = _quadratic()
    gamma = 0.4  # A + I/γ positive definite, γ‖A‖ < 1
    theta = torch.randn(7, generator=torch.Generator().manual_seed(0), dtype=D)
    # exact: θ* = argmin ½ψᵀAψ − cᵀψ + ‖ψ−θ‖²/(2γ) = (A + I/γ)⁻¹(c + θ/γ), differentiated by autograd
    t = theta.clone().requires_grad_(True)
    star = torch.linalg.solve(a + torch.eye(7, dtype=D) / gamma, c + t / gamma)
    (exact,) = torch.autograd.grad(harm(split(star, like)), t)
    star_l = split(star.detach(), like)
    leaves = [s.clone().requires_grad_(True) for s in star_l]
    b = torch.autograd.grad(harm(leaves), leaves)
    for backend in ("double_backward", "forward_over_reverse"):
        h, st = moreau_hypergradient(
            b,
            ft,
            star_l,
            gamma=gamma,
            iterations=300,
            tol=1e-15,
            backend=backend,
            divergence_ratio=None,
            max_norm=None,
            retries=0,
        )
        assert (flat(h) - exact).norm() / exact.norm() < 1e-8, backend
        assert not st.fell_back


def test_unrolled_matches_closed_form_on_quadratic():
    a, c, like, ft, harm = _quadratic()
    lr, steps = 0.1, 6
    theta = torch.randn(7, generator=torch.Generator().manual_seed(1), dtype=D)
    h, star, losses = unrolled_hypergradient(
        split(theta, like), lambda ps, k: ft(ps), harm, steps, FunctionalOptimizer("sgd", lr)
    )
    m = torch.eye(7, dtype=D) - lr * a
    x = theta.clone()
    for _ in range(steps):
        x = x - lr * (a @ x - c)
    assert torch.allclose(flat(star), x, rtol=1e-12, atol=1e-13)
    xs = x.clone().requires_grad_(True)
    (b,) = torch.autograd.grad(harm(split(xs, like)), xs)
    exact = torch.linalg.matrix_power(m, steps).T @ b
    assert torch.allclose(flat(h), exact, rtol=1e-10, atol=1e-12)
    assert len(losses) == steps


def test_moreau_and_unrolled_agree_to_second_order_on_tiny_unet():
    """With γ = S·lr, unrolled SGD gives Π(I − lr·H_k)b and Moreau (I + γH)⁻¹b: both are
    b − γHb + O((γ‖H‖)²). Their difference must shrink ~4× when lr halves."""
    unet, sel = _tiny_lora()
    sched = toy_scheduler()
    names = sel.names
    params = dict(unet.named_parameters())
    den = Denoiser(unet, sched, {})
    nb = noise_batch(toy_pairs(2, 8, seed=3), sched, torch.Generator().manual_seed(5))
    hb = noise_batch(toy_pairs(2, 8, seed=4, shift=1.0), sched, torch.Generator().manual_seed(6))
    theta = [params[n].detach().clone() for n in names]

    def ft(ps, k=0):
        return denoise_loss(den, dict(zip(names, ps)), nb)

    def harm(ps):
        return -denoise_loss(den, dict(zip(names, ps)), hb)

    steps, diffs, devs = 3, [], []
    with math_attention(unet):
        for lr in (0.5, 0.25):
            h_u, star, _ = unrolled_hypergradient(
                theta, ft, harm, steps, FunctionalOptimizer("sgd", lr)
            )
            leaves = [s.clone().requires_grad_(True) for s in star]
            b = torch.autograd.grad(harm(leaves), leaves)
            h_m, st = moreau_hypergradient(
                b,
                ft,
                star,
                gamma=steps * lr,
                iterations=10,
                tol=0.0,
                divergence_ratio=None,
                max_norm=None,
                retries=0,
            )
            assert st.residuals[-1] < 1e-6 * tensors_norm(b)
            devs.append(float((flat(h_u) - flat(b)).norm()))
            diffs.append(float((flat(h_u) - flat(h_m)).norm()))
    # both deviate from b at first order (≈ γHb: halves with lr) and agree with each other at
    # second order (the difference drops ≈ 4× when lr halves)
    assert 1.7 < devs[0] / devs[1] < 2.3
    assert diffs[1] < 0.1 * devs[1]
    assert 3.0 < diffs[0] / diffs[1] < 5.5


def test_flow_matching_hypergradient_of_tiny_sd3_matches_dense_solve():
    """The same numerics on the flow-matching model: a tiny SD3 transformer (joint attention
    on SDPA's math backend) with a rank-1 LoRA, the velocity loss at drawn σ. The HVP
    matches central finite differences and both backends agree; the Hessian assembled from
    HVPs is symmetric; the Moreau hypergradient equals the dense solve (I + γH)⁻¹b."""
    from resalign.algorithms.toy import toy_flow_scheduler, toy_transformer
    from resalign.models.diffusion import FlowMatchObjective

    model = toy_transformer(D)
    spec = TrainableSpec(rank=1, targets=["attn.to_q"])
    sel = apply_trainable(model, spec, torch.Generator().manual_seed(1))
    names = sel.names
    params = dict(model.named_parameters())
    obj = FlowMatchObjective(toy_flow_scheduler())
    den = Denoiser(model, obj, {})
    nb = noise_batch(toy_pairs(2, 8, seed=3, pooled_dim=8), obj, torch.Generator().manual_seed(5))
    hb = noise_batch(
        toy_pairs(2, 8, seed=4, shift=1.0, pooled_dim=8), obj, torch.Generator().manual_seed(6)
    )
    theta = [params[n].detach().clone() for n in names]
    n = sum(t.numel() for t in theta)
    assert n == 2 * 2 * 8  # rank 1 on the 8→8 image-stream query of each of two blocks

    def ft(ps):
        return denoise_loss(den, dict(zip(names, ps)), nb)

    def harm(ps):
        return -denoise_loss(den, dict(zip(names, ps)), hb)

    g = torch.Generator().manual_seed(4)
    v = [torch.randn(t.shape, generator=g, dtype=D) for t in theta]
    with math_attention(model):
        hvp = make_hvp(ft, theta, "double_backward")
        h_db = hvp(v)
        h_fr = make_hvp(ft, theta, "forward_over_reverse")(v)

        def grad_at(ps):
            ps = [p.clone().requires_grad_(True) for p in ps]
            return torch.autograd.grad(ft(ps), ps)

        eps = 1e-5
        gp = grad_at([t + eps * vi for t, vi in zip(theta, v)])
        gm = grad_at([t - eps * vi for t, vi in zip(theta, v)])
        fd = [(a - b) / (2 * eps) for a, b in zip(gp, gm)]
        hess = torch.stack([flat(hvp(split(e, theta))) for e in torch.eye(n, dtype=D)])
        leaves = [t.clone().requires_grad_(True) for t in theta]
        b = torch.autograd.grad(harm(leaves), leaves)
        lam = float(torch.linalg.eigvalsh(0.5 * (hess + hess.T)).abs().max())
        gamma = 0.5 / lam
        x, st = moreau_hypergradient(
            list(b),
            ft,
            theta,
            gamma=gamma,
            iterations=200,
            tol=1e-15,
            divergence_ratio=None,
            max_norm=None,
            retries=0,
        )
    assert (flat(h_db) - flat(fd)).norm() / flat(fd).norm() < 1e-6
    assert (flat(h_db) - flat(h_fr)).norm() / flat(h_db).norm() < 1e-10
    assert (hess - hess.T).abs().max() < 1e-10 * hess.abs().max()
    exact = torch.linalg.solve(torch.eye(n, dtype=D) + gamma * hess, flat(b))
    assert (flat(x) - exact).norm() / exact.norm() < 1e-8
    assert not st.fell_back
