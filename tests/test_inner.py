"""The functional inner loop against torch.optim and the real module."""

from __future__ import annotations

import copy

import pytest
import torch

from resalign.algorithms.inner import FunctionalOptimizer, make_view, simulate_finetune
from resalign.algorithms.objectives import Denoiser, noise_batch
from resalign.algorithms.toy import toy_pairs, toy_scheduler, toy_unet
from resalign.errors import UserError
from resalign.models.trainable import apply_trainable
from resalign.spec.schema.model import TrainableSpec

D = torch.float64


@pytest.mark.parametrize(
    "name,kw",
    [
        ("sgd", {"weight_decay": 0.1, "momentum": 0.9}),
        ("sgd", {}),
        ("adam", {"weight_decay": 0.05}),
        ("adamw", {"weight_decay": 0.05}),
    ],
)
def test_functional_optimizer_equals_torch_optim(name, kw):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=g, dtype=D)
    x0 = [torch.randn(5, generator=g, dtype=D), torch.randn(2, 3, generator=g, dtype=D)]
    lr = 0.05

    def loss(ps, k):
        return (
            ((0.3 * a @ ps[0]) ** 2).sum() * (1 + 0.1 * k)
            + 0.1 * (ps[1] ** 4).sum()
            + ps[0][:3] @ ps[1][0]
        )

    ref = [t.clone().requires_grad_(True) for t in x0]
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    opt = cls(ref, lr=lr, **kw)
    fo = FunctionalOptimizer(name, lr, **kw)
    cur, st = [t.clone() for t in x0], fo.init(x0)
    for k in range(12):
        opt.zero_grad()
        loss(ref, k).backward()
        opt.step()
        leaves = [c.requires_grad_(True) for c in cur]
        grads = torch.autograd.grad(loss(leaves, k), leaves)
        with torch.no_grad():
            cur, st = fo.step([c.detach() for c in leaves], list(grads), st)
        cur = [c.detach() for c in cur]
        for r, c in zip(ref, cur):
            assert torch.isfinite(c).all()
            torch.testing.assert_close(c, r.detach(), rtol=1e-12, atol=1e-14)


def _lora():
    unet = toy_unet("tiny", D)
    sel = apply_trainable(unet, TrainableSpec(), torch.Generator().manual_seed(1))
    return unet, sel


def test_simulated_finetune_equals_torch_optim_on_the_module():
    unet, sel = _lora()
    sched = toy_scheduler()
    data = toy_pairs(6, 8, seed=2)
    den = Denoiser(unet, sched, {})
    view = make_view(unet, sel.names, "lora", "lora", "own")
    params = dict(unet.named_parameters())
    theta = {n: params[n].detach().clone() for n in sel.names}
    res = simulate_finetune(
        den,
        view,
        theta,
        FunctionalOptimizer("adam", 1e-2),
        4,
        data,
        2,
        torch.Generator().manual_seed(7),
    )
    # the same fine-tuning with the module's own parameters and torch.optim.Adam
    ref = copy.deepcopy(unet)
    rp = dict(ref.named_parameters())
    opt = torch.optim.Adam([rp[n] for n in sel.names], lr=1e-2)
    g = torch.Generator().manual_seed(7)
    losses = []
    for _ in range(4):
        nb = noise_batch(data.sample(2, g), sched, g)
        pred = ref(nb.noisy, nb.timesteps, encoder_hidden_states=nb.embeddings).sample
        loss = torch.nn.functional.mse_loss(pred, nb.target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    for n in sel.names:
        torch.testing.assert_close(res.params[n], rp[n].detach(), rtol=1e-10, atol=1e-12)
    assert res.losses == pytest.approx(losses, rel=1e-10)
    # the module itself is untouched by the functional inner loop
    for n in sel.names:
        assert torch.equal(params[n].detach(), theta[n])


def test_inner_runs_start_fresh():
    unet, sel = _lora()
    sched = toy_scheduler()
    den = Denoiser(unet, sched, {})
    view = make_view(unet, sel.names, "lora", "lora", "own")
    theta = {n: p.detach() for n, p in unet.named_parameters() if n in set(sel.names)}
    opt = FunctionalOptimizer("adam", 1e-2)
    data = toy_pairs(4, 8, seed=3)
    a = simulate_finetune(den, view, theta, opt, 2, data, 1, torch.Generator().manual_seed(1))
    simulate_finetune(den, view, theta, opt, 3, data, 1, torch.Generator().manual_seed(9))
    b = simulate_finetune(den, view, theta, opt, 2, data, 1, torch.Generator().manual_seed(1))
    for n in sel.names:
        assert torch.equal(a.params[n], b.params[n])


def test_full_view_over_lora_merges_and_pulls_back():
    unet, sel = _lora()
    sched = toy_scheduler()
    den = Denoiser(unet, sched, {})
    view = make_view(unet, sel.names, "lora", "full", "own")
    params = dict(unet.named_parameters())
    theta = {n: params[n].detach() for n in sel.names}
    psi = view.start(theta)
    nb = noise_batch(toy_pairs(2, 8, seed=4), sched, torch.Generator().manual_seed(0))
    merged = den.eps({**view.overrides(), **psi}, nb)
    with torch.no_grad():
        live = unet(nb.noisy, nb.timesteps, encoder_hidden_states=nb.embeddings).sample
    torch.testing.assert_close(merged, live, rtol=1e-10, atol=1e-12)
    assert not any("lora_" in n for n in view.names)
    # pullback = autograd of the loss through the merge, computed independently on the module
    x = {n: torch.randn_like(psi[n]) for n in view.names}
    pb = view.pullback(theta, x)
    leaves = {n: params[n].detach().clone().requires_grad_(True) for n in sel.names}
    with torch.enable_grad():
        out = view.start(leaves)
        s = sum((out[n] * x[n]).sum() for n in view.names)
        ref = torch.autograd.grad(s, list(leaves.values()))
    for n, r in zip(sel.names, ref):
        torch.testing.assert_close(pb[n], r)


def test_view_errors_are_user_errors():
    unet = toy_unet("tiny", D)
    sel = apply_trainable(unet, TrainableSpec(kind="full"))
    with pytest.raises(UserError, match="needs model.trainable.kind 'lora'"):
        make_view(unet, sel.names, "full", "lora", "own")
    with pytest.raises(UserError, match="fresh"):
        make_view(unet, sel.names, "full", "lora", "fresh")
    assert make_view(unet, sel.names, "full", "full", "own").kind == "identity"


# --- differentiating through Adam (unrolled hypergradients) -------------------------------


def _adam_problem():
    """θ = [a (3,), kb (2,)]. The fine-tuning loss is a smooth non-quadratic in a and does not
    depend on kb (written 0·‖kb‖² so its gradient is an exact zero inside the graph, as the
    key bias of softmax attention pooling has); the harmful loss reads both."""
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 3, generator=g, dtype=D), torch.randn(6, generator=g, dtype=D)
    xh, u = torch.randn(4, 3, generator=g, dtype=D), torch.randn(2, generator=g, dtype=D)
    theta = [torch.randn(3, generator=g, dtype=D), torch.randn(2, generator=g, dtype=D)]

    def ft(ps, k):
        return (torch.tanh(x @ ps[0]) - y).pow(2).mean() * (1 + 0.2 * k) + 0.0 * ps[1].pow(2).sum()

    def harm(ps):
        return -torch.log1p((xh @ ps[0]).pow(2)).mean() + u @ ps[1]

    return theta, ft, harm, u


def _fd(theta, ft, harm, steps, opt, h=1e-6):
    """Central finite differences of L_harm(θ_S(θ₀)) through the forward Adam steps (float64)."""
    from resalign.algorithms.inner import FunctionalOptimizer as _  # noqa: F401

    def final(ps):
        cur = [p.clone().requires_grad_(True) for p in ps]
        st = opt.init(cur)
        for k in range(steps):
            gr = torch.autograd.grad(ft(cur, k), cur)
            with torch.no_grad():
                cur, st = opt.step([c.detach() for c in cur], list(gr), st)
            cur = [c.detach().requires_grad_(True) for c in cur]
        with torch.no_grad():
            return float(harm(cur))

    out = []
    for i, t in enumerate(theta):
        g = torch.zeros_like(t)
        for j in range(t.numel()):
            plus = [p.clone() for p in theta]
            minus = [p.clone() for p in theta]
            plus[i].view(-1)[j] += h
            minus[i].view(-1)[j] -= h
            g.view(-1)[j] = (final(plus) - final(minus)) / (2 * h)
        out.append(g)
    return out


def test_unrolled_adam_is_finite_and_exact_where_a_gradient_is_exactly_zero(monkeypatch):
    from resalign.algorithms import inner
    from resalign.algorithms.hypergrad import unrolled_hypergradient

    theta, ft, harm, u = _adam_problem()
    opt = FunctionalOptimizer("adam", 0.05)
    steps = 6
    hyper, _, _ = unrolled_hypergradient(theta, ft, harm, steps, opt)
    assert all(torch.isfinite(t).all() for t in hyper)
    # kb never moves (Adam's update of an all-zero gradient is 0/(0 + ε)): d/dkb₀ = u exactly
    assert torch.equal(hyper[1], u)
    # a, where v̂ > 0 and the safe √ is not active: equal to float64 finite differences
    fd = _fd(theta, ft, harm, steps, opt)
    assert torch.allclose(hyper[0], fd[0], rtol=1e-6, atol=1e-9), (hyper[0], fd[0])
    assert torch.allclose(hyper[1], fd[1], rtol=1e-6, atol=1e-9)
    # autograd's own √ (what the optimizer used before) gives NaN on the same problem
    monkeypatch.setattr(inner, "_sqrt", torch.sqrt)
    broken, _, _ = unrolled_hypergradient(theta, ft, harm, steps, opt)
    assert not torch.isfinite(broken[1]).all()


def test_unrolled_adam_on_the_demo_unet_is_finite():
    """The digits demo's UNet layout (text-pooled time embedding, cross-attention blocks) at
    the demo's width: under math attention the pooling's key bias gets an exactly-zero gradient,
    and one unrolled Adam step used to turn every hypergradient tensor NaN."""
    from resalign.algorithms.hypergrad import unrolled_hypergradient
    from resalign.algorithms.objectives import EncodedPairs, denoise_loss
    from resalign.models.attention import math_attention
    from resalign.models.tiny import build_unet
    from resalign.spec.schema.model import TinyModelSpec

    torch.manual_seed(0)
    spec = TinyModelSpec(block_out_channels=[16, 32], cross_attention_dim=32, text_hidden_size=32)
    f32 = torch.float32  # the demo's dtype: in float64 the zero is not exact
    unet = build_unet(spec, 1, 8).to(f32).eval()
    sched = toy_scheduler()
    names = [n for n, _ in unet.named_parameters()]
    params = dict(unet.named_parameters())
    den = Denoiser(unet, sched, {})
    g = torch.Generator().manual_seed(0)

    def pairs(n, shift=0.0):
        lat = torch.randn(n, 1, 8, 8, generator=g, dtype=f32) * 0.5 + shift
        return EncodedPairs(lat, torch.randn(n, 8, 32, generator=g, dtype=f32))

    batches = [noise_batch(pairs(4), sched, g)]
    hb = noise_batch(pairs(4, 1.0), sched, g)
    theta = [params[n].detach().clone() for n in names]
    with math_attention(unet):
        leaves = [t.clone().requires_grad_(True) for t in theta]
        first = torch.autograd.grad(denoise_loss(den, dict(zip(names, leaves)), batches[0]), leaves)
        assert any(bool((t == 0).any()) for t in first)  # the case the fix is for
        hyper, _, _ = unrolled_hypergradient(
            theta,
            lambda ps, k: denoise_loss(den, dict(zip(names, ps)), batches[k]),
            lambda ps: -denoise_loss(den, dict(zip(names, ps)), hb),
            1,
            FunctionalOptimizer("adam", 1e-3),
        )
    assert all(torch.isfinite(t).all() for t in hyper)
    assert sum(float(t.pow(2).sum()) for t in hyper) > 0
