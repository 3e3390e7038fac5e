"""End-to-end check of ResAlign's hypergradient against the true total derivative.

``python -m resalign.bench hypercheck [--problems toy-lora,toy-full] [--demo-model DIR]``

For one simulated fine-tuning configuration (K steps of SGD or Adam from θ on fixed batches)
the true resilience derivative is ``d/dθ L_harm(θ_FT(θ))``. Three things are compared:

- **applied**: what the method's outer step uses, :meth:`ResAlign.hypergradient` itself
  (``moreau`` at several γ with the demo's solver settings, ``none``, ``unrolled``), called with
  the generators the outer step would pass (:func:`applied_hypergradient`);
- **(a) reference**: autograd through the K steps written here, independently of
  :mod:`resalign.algorithms.inner` and :mod:`resalign.algorithms.hypergrad`: own SGD/Adam/AdamW
  update formulas, ``create_graph`` on every inner gradient (:func:`reference_hypergradient`);
- **(b) finite differences**: central differences in float64 of ``L_harm(θ_FT(θ ± εu))``
  where θ_FT is an actual ``torch.optim`` fine-tune (:func:`finetuned_harm`), along random
  unit directions u and along the reference's own direction (there the value must be
  ‖reference‖).

The batches, noise and timesteps are the ones the method draws: the K inner batches, then the
harmful batch, from ``torch.Generator().manual_seed(seed)`` (:func:`draws`, the order of
:func:`resalign.algorithms.inner.simulate_finetune` and ``ResAlign.hypergradient``). ``none``
must then equal ∇L_harm(θ_K) of the reference exactly, which checks that both ran the same
fine-tune. Besides the cosine of h with the truth, ``cos Δ`` compares the part that is
specific to resilience, h − ∇L_harm(θ) versus h_true − ∇L_harm(θ) on the same harmful batch:
h ≈ ∇L_harm(θ) when the fine-tune moves little, and cos(h, h_true) ≈ 1 then says nothing.

What agreement theory predicts (docs/algorithm.md, "The hypergradient, checked end to end"):
``unrolled`` is exact for any K and optimizer; ``none`` and ``moreau`` are approximations.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..atomic import atomic_write_text

Tensors = list[Tensor]
GAMMAS: tuple[float | str, ...] = (0.001, 0.01, 0.1, 1.0, "auto")
# The demo's solver (specs/digits_demo.yaml): K = 5 undamped iterations, published divergence
# test and retries, no norm cap.
DEMO_SOLVER: dict[str, Any] = {"iterations": 5, "max_norm": None}


def _cos(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    fa = torch.cat([t.reshape(-1).double() for t in a])
    fb = torch.cat([t.reshape(-1).double() for t in b])
    na, nb = float(fa.norm()), float(fb.norm())
    return float(fa @ fb) / (na * nb) if na and nb else 0.0


def _rel(a: Sequence[Tensor], ref: Sequence[Tensor]) -> float:
    fa = torch.cat([t.reshape(-1).double() for t in a])
    fr = torch.cat([t.reshape(-1).double() for t in ref])
    return float((fa - fr).norm() / fr.norm())


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return float(sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b, strict=True)))


def draws(
    method: Any, cfg: Any, seed: int
) -> tuple[Any, list[Any], Any, Tensor | None, torch.Generator]:
    """The data of config ``cfg`` run with ``seed`` as ``ResAlign.hypergradient`` draws it:
    (dataset, the K inner noised batches, the harmful batch, its ESD target, the generator
    after them: the Moreau solve's fresh HVP batch comes next)."""
    from ..algorithms.objectives import noise_batch

    gen = torch.Generator().manual_seed(seed)
    _, data, prior = method._data(cfg, random.Random(seed))
    if prior is not None:
        raise ValueError("the end-to-end check covers configs without a class prior")
    batches = [
        noise_batch(data.sample(cfg.batch_size, gen), method.den.objective, gen)
        for _ in range(cfg.steps)
    ]
    hb, target = method.sample_harmful(gen)
    return data, batches, hb, target, gen


def _reference_step(
    cfg: Any, params: Tensors, grads: Tensors, state: dict[str, Any]
) -> tuple[Tensors, dict[str, Any]]:
    """One step of torch.optim's SGD / Adam (L2) / AdamW (decoupled), betas (0.9, 0.999),
    ε 1e-8 (torch's defaults), written from their documented update rules."""
    lr, wd, t = cfg.lr, cfg.weight_decay, state["t"] + 1
    if cfg.optimizer == "sgd":
        return [p - lr * (g + wd * p) for p, g in zip(params, grads)], {"t": t}
    b1, b2, eps = 0.9, 0.999, 1e-8
    if cfg.optimizer == "adamw":
        params = [p * (1 - lr * wd) for p in params]
    else:
        grads = [g + wd * p for p, g in zip(params, grads)]
    m = [b1 * mi + (1 - b1) * g for mi, g in zip(state.get("m", [0.0] * len(params)), grads)]
    v = [b2 * vi + (1 - b2) * g * g for vi, g in zip(state.get("v", [0.0] * len(params)), grads)]
    # √ clamped at 1e-300: its derivative is 0 where v̂ = 0 (an entry whose gradients were all
    # exactly 0; there m = 0 too, so the exact contribution is 0), where autograd's ∞·0 = NaN
    new = [
        p - lr * (mi / (1 - b1**t)) / ((vi / (1 - b2**t)).clamp_min(1e-300).sqrt() + eps)
        for p, mi, vi in zip(params, m, v)
    ]
    return new, {"t": t, "m": m, "v": v}


def reference_hypergradient(
    method: Any, cfg: Any, theta: Mapping[str, Tensor], seed: int
) -> dict[str, Any]:
    """(a): ``d/dθ L_harm(θ_K(θ))`` by autograd through K inner steps written here.

    Returns ``total`` (the true derivative over ``theta``'s tensors), ``first_order``
    (∇L_harm at θ_K pulled back to θ: what ``none`` should equal), ``direct`` (∇L_harm(θ) on the
    same harmful batch) and ``losses`` (the inner losses)."""
    from ..algorithms.objectives import denoise_loss
    from ..models.attention import math_attention

    _, batches, hb, target, _ = draws(method, cfg, seed)
    view = method._view(cfg)
    fixed = view.overrides()
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in theta.items()}
    order = list(leaves.values())
    with torch.enable_grad(), math_attention(method.unet):
        psi = dict(view.start(leaves))
        names = list(psi)
        cur = [psi[n] for n in names]
        state: dict[str, Any] = {"t": 0}
        losses = []
        for nb in batches:
            loss = denoise_loss(method.den, {**fixed, **dict(zip(names, cur))}, nb)
            losses.append(float(loss.detach()))
            gs = torch.autograd.grad(loss, cur, create_graph=True, allow_unused=True)
            gs = [torch.zeros_like(c) if g is None else g for c, g in zip(cur, gs)]
            cur, state = _reference_step(cfg, cur, gs, state)
        harm = method.harm_loss({**fixed, **dict(zip(names, cur))}, hb, target)
        total = torch.autograd.grad(harm, order, retain_graph=True, allow_unused=True)
        # ∇L_harm(θ_K) with θ_K held fixed, carried back through ψ₀ = g(θ) only
        star = [c.detach().requires_grad_(True) for c in cur]
        hs = method.harm_loss({**fixed, **dict(zip(names, star))}, hb, target)
        b = torch.autograd.grad(hs, star, allow_unused=True)
        b = [torch.zeros_like(s) if g is None else g for s, g in zip(star, b)]
        psi0 = dict(view.start(leaves))
        keys = [k for k in names if psi0[k].requires_grad]
        first = torch.autograd.grad(
            [psi0[k] for k in keys],
            order,
            grad_outputs=[b[names.index(k)] for k in keys],
            allow_unused=True,
        )
        h0 = method.harm_loss({**fixed, **view.start(leaves)}, hb, target)
        direct = torch.autograd.grad(h0, order, allow_unused=True)

    def fill(gs: Sequence[Tensor | None]) -> Tensors:
        return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(order, gs)]

    return {
        "total": fill(total),
        "first_order": fill(first),
        "direct": fill(direct),
        "losses": losses,
        "theta_k": [c.detach() for c in cur],
    }


def finetuned_harm(method: Any, cfg: Any, theta: Mapping[str, Tensor], seed: int) -> float:
    """``L_harm(θ_FT(θ))`` after an actual K-step ``torch.optim`` fine-tune (no graph kept),
    on the batches the method draws for ``seed``."""
    from ..algorithms.objectives import denoise_loss

    _, batches, hb, target, _ = draws(method, cfg, seed)
    view = method._view(cfg)
    fixed = view.overrides()
    psi = {n: t.detach().clone().requires_grad_(True) for n, t in view.start(theta).items()}
    ps = list(psi.values())
    kw = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    opt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[
        cfg.optimizer
    ](ps, **kw)
    for nb in batches:
        opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            denoise_loss(method.den, {**fixed, **psi}, nb).backward()
        opt.step()
    with torch.no_grad():
        return float(method.harm_loss({**fixed, **psi}, hb, target))


def directional_fd(
    method: Any,
    cfg: Any,
    theta: Mapping[str, Tensor],
    seed: int,
    direction: Sequence[Tensor],
    eps: float,
) -> float:
    """(b): ``(L(θ + εu) − L(θ − εu))/(2ε)`` with L = :func:`finetuned_harm`."""
    names = list(theta)

    def at(s: float) -> float:
        return finetuned_harm(
            method, cfg, {n: theta[n] + s * u for n, u in zip(names, direction)}, seed
        )

    return (at(eps) - at(-eps)) / (2 * eps)


def applied_hypergradient(
    method: Any, cfg: Any, theta: Mapping[str, Tensor], seed: int, hyper: Any
) -> tuple[Tensors, dict[str, Any]]:
    """The hypergradient ResAlign's outer step applies for this config (the term β·h of
    ``ResAlign.outer_gradient``), computed by the method itself with hypergradient spec
    ``hyper`` and the generators ``outer_gradient`` passes (seeded by ``seed``)."""
    saved = method.hyper
    method.hyper = hyper
    try:
        return method.hypergradient(
            cfg, dict(theta), torch.Generator().manual_seed(seed), random.Random(seed)
        )
    finally:
        method.hyper = saved


def hyper_specs(gammas: Sequence[float | str] = GAMMAS) -> dict[str, Any]:
    """The hypergradient settings compared: ``none``, ``moreau`` with the demo's solver at each
    γ, ``unrolled``."""
    from ..spec.schema.unlearn import HypergradientSpec

    out = {"none": HypergradientSpec(kind="none")}
    for g in gammas:
        out[f"moreau γ={g}"] = HypergradientSpec(kind="moreau", gamma=g, **DEMO_SOLVER)
    out["unrolled"] = HypergradientSpec(kind="unrolled")
    return out


def unit_directions(like: Sequence[Tensor], n: int, seed: int) -> list[Tensors]:
    """``n`` random directions of global norm 1, shaped like ``like``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        v = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in like]
        s = math.sqrt(sum(float((x**2).sum()) for x in v))
        out.append([x / s for x in v])
    return out


def check(
    method: Any,
    cfg: Any,
    seed: int,
    hypers: Mapping[str, Any],
    fd_eps: float = 1e-5,
    fd_directions: int = 2,
) -> dict[str, Any]:
    """One (problem, config): the reference, its finite-difference validation and each applied
    hypergradient's cosine / relative error against it."""
    theta = method.theta()
    t0 = time.perf_counter()
    ref = reference_hypergradient(method, cfg, theta, seed)
    total = ref["total"]
    tn = math.sqrt(_dot(total, total))
    fd = []
    dirs = unit_directions(total, fd_directions, seed + 1)
    dirs.append([t / tn for t in total])
    for u in dirs:
        want = _dot(total, u)
        got = directional_fd(method, cfg, theta, seed, u, fd_eps)
        fd.append({"autograd": want, "fd": got, "rel": abs(got - want) / max(abs(got), 1e-300)})
    delta_true = [t - d for t, d in zip(total, ref["direct"])]
    row: dict[str, Any] = {
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "K": cfg.steps,
        "batch_size": cfg.batch_size,
        "params": sum(t.numel() for t in theta.values()),
        "ref_norm": tn,
        "cos_true_first_order": _cos(total, ref["first_order"]),
        "fd": fd,
        "inner_loss_first_last": [ref["losses"][0], ref["losses"][-1]],
        "kinds": {},
    }
    for label, hyper in hypers.items():
        h, st = applied_hypergradient(method, cfg, theta, seed, hyper)
        delta = [a - d for a, d in zip(h, ref["direct"])]
        row["kinds"][label] = {
            "cos": _cos(h, total),
            "rel": _rel(h, total),
            "cos_delta": _cos(delta, delta_true),
            "rel_delta": _rel(delta, delta_true),
            "rel_to_first_order": _rel(h, ref["first_order"]),
            "fallback": float(st.get("fallback", 0.0)),
            "retries": float(st.get("retries", 0.0)),
            "gamma": st.get("gamma"),
            "lambda_max": st.get("lambda_max"),
        }
    row["seconds"] = time.perf_counter() - t0
    return row


# --- problems -------------------------------------------------------------------------------


def toy_method(
    trainable: str = "lora", harm_batch: int = 4, seed: int = 0, problem: Any = None
) -> Any:
    """A ResAlign method on :func:`resalign.algorithms.toy.toy_problem` in float64 (LoRA
    1,376 or full 13,385 parameters), or on ``problem``; its configs are supplied per check."""
    from ..algorithms.methods import build_method
    from ..algorithms.toy import toy_problem
    from ..spec.schema.model import TrainableSpec
    from ..spec.schema.unlearn import UnlearnSpec

    prob = problem or toy_problem(TrainableSpec(kind=trainable), torch.float64)
    alg = "lora" if trainable == "lora" else "full"
    spec = UnlearnSpec.model_validate(
        {
            "steps": 1,
            "harmful_loss": {"batch_size": harm_batch},
            "resilience": {
                "beta": 0.5,
                "hypergradient": {"kind": "moreau", "gamma": 0.01, **DEMO_SOLVER},
                "meta": {
                    "samples_per_step": 1,
                    "meta_rate": 1.0,
                    "data": ["benign"],
                    # the method needs one candidate; the checked configs are the caller's
                    "configs": {"c": {"algorithm": alg, "data": "benign"}},
                },
            },
        }
    )
    return build_method("resalign", prob, spec, seed=seed)


def inner_config(
    optimizer: str, lr: float, steps: int, batch: int, data: str, algorithm: str
) -> Any:
    """The method's :class:`InnerConfig` for one simulated fine-tuning."""
    from ..algorithms.methods import InnerConfig

    name = f"{algorithm}-{optimizer}-lr{lr:g}-s{steps}-b{batch}"
    return InnerConfig(name, algorithm, optimizer, float(lr), int(steps), int(batch), data)


class _Captured(Exception):
    pass


def demo_method(spec_path: Path, model_dir: Path, work: Path) -> tuple[Any, str]:
    """The ResAlign method of ``spec_path``'s unlearn row, built by the unlearn step from the
    (already built) model node ``model_dir`` exactly as ``resalign run`` builds it, then
    converted to float64. Returns it with the name of the spec's first meta data pool."""
    import resalign.algorithms.methods as methods

    from ..engine.context import NodeContext
    from ..graph.compile import compile_spec
    from ..spec.loader import load_spec_text
    from ..steps.unlearn import UnlearnStep

    resolved = load_spec_text(spec_path.read_text(), base_dir=spec_path.parent)
    graph = compile_spec(resolved)
    real = methods.build_method
    got: dict[str, Any] = {}

    def capture(name: str, problem: Any, spec: Any, seed: int = 0, *a: Any, **k: Any) -> Any:
        d = torch.float64
        problem.unet.to(d)
        problem.harmful = problem.harmful.to("cpu", d)
        if problem.retain is not None:
            problem.retain = problem.retain.to("cpu", d)
        problem.pools = {n: p.to("cpu", d) for n, p in problem.pools.items()}
        if isinstance(problem.uncond, Tensor):
            problem.uncond = problem.uncond.to(d)
        got["m"] = real(name, problem, spec, seed)
        raise _Captured

    node = next(n for n in graph.of_kind("unlearn") if n.name.startswith("unlearn/resalign"))
    out = work / "unlearn"
    out.mkdir(parents=True, exist_ok=True)
    ctx = NodeContext(
        node=node, spec=resolved, inputs={"model": model_dir}, out=out, state=work / "state"
    )
    methods.build_method = capture  # type: ignore[assignment]
    try:
        UnlearnStep().run(ctx)
    except _Captured:
        pass
    finally:
        methods.build_method = real  # type: ignore[assignment]
    m = got["m"]
    return m, m.problem.default_pool[0]


# --- the command ----------------------------------------------------------------------------


def _fmt(k: dict[str, Any]) -> str:
    if k["fallback"]:
        return "dropped"
    return f"{k['cos']:+.3f} / {k['rel']:.2f} / {k['cos_delta']:+.2f}"


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per (problem, optimizer, K), one column per hypergradient setting;
    cells 'cos / rel err / cos Δ'."""
    labels = list(rows[0]["kinds"])
    head = "| problem | inner | K | FD rel err (a) | " + " | ".join(labels) + " |"
    lines = [head, "|" + "---|" * (4 + len(labels))]
    for r in rows:
        fd = max(x["rel"] for x in r["fd"])
        cells = " | ".join(_fmt(r["kinds"][lab]) for lab in labels)
        lines.append(
            f"| {r['problem']} | {r['optimizer']} {r['lr']:g} | {r['K']} | {fd:.1e} | {cells} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="resalign bench hypercheck", description=__doc__)
    ap.add_argument("--problems", default="toy-lora,toy-full", help="toy-lora, toy-full, demo")
    ap.add_argument("--steps", default="1,5,10,20", help="inner steps K")
    ap.add_argument("--optimizers", default="sgd:0.01,adam:3e-4", help="name:lr,...")
    ap.add_argument("--batch", type=int, default=4, help="inner batch (toy problems)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fd-eps", type=float, default=1e-5)
    ap.add_argument("--fd-directions", type=int, default=2)
    ap.add_argument("--spec", default="specs/digits_demo.yaml", help="for the demo problem")
    ap.add_argument("--demo-model", help="the spec's built model node folder (demo problem)")
    ap.add_argument("--demo-batch", type=int, default=16)
    ap.add_argument("--work", default="runs/bench/hypercheck")
    ap.add_argument("--out", default="runs/bench/hypercheck.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    hypers = hyper_specs()
    opts = [(o.split(":")[0], float(o.split(":")[1])) for o in a.optimizers.split(",")]
    rows = []
    for prob in a.problems.split(","):
        if prob == "demo":
            if not a.demo_model:
                ap.error("the demo problem needs --demo-model (the spec's model node folder)")
            m, pool = demo_method(Path(a.spec), Path(a.demo_model), Path(a.work))
            alg, batch = "full", a.demo_batch
        elif prob in ("toy-lora", "toy-full"):
            kind = prob.split("-")[1]
            m, pool, batch = toy_method(kind), "benign", a.batch
            alg = "lora" if kind == "lora" else "full"
        else:
            ap.error(f"unknown problem {prob!r}")
        for opt, lr in opts:
            for k in (int(x) for x in a.steps.split(",")):
                cfg = inner_config(opt, lr, k, batch, pool, alg)
                row = {"problem": prob, **check(m, cfg, a.seed, hypers, a.fd_eps, a.fd_directions)}
                rows.append(row)
                print(table([row]).splitlines()[-1], f"({row['seconds']:.0f} s)", flush=True)
    print(table(rows))
    out = Path(a.out)
    atomic_write_text(out, json.dumps(rows, indent=1, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
