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
