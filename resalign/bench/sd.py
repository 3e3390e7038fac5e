"""SD-scale benchmark of one ResAlign outer step per memory-lever combination.

``python -m resalign.bench sd --arch sd14|sdxl [--latent 16] [--levers fp32,bf16+ckpt,...]
--json out.json``

Builds the UNet of the architecture from its published config with random weights
(:mod:`resalign.models.sd_arch`: memory and time depend on the architecture, not on the
weights), adds the published trainable LoRA (rank 4 on to_q/to_k/to_v/to_out.0, published init)
and runs one outer step of the published configuration with the project's own algorithm units
(:mod:`resalign.algorithms.objectives`, ``inner``, ``hypergrad``): the direct gradient of
L_harm + α·R (distillation to the frozen original), then for each of J = 3 inner configurations
sampled from the published distribution (lr {1e-4, 1e-5, 1e-6}, steps {5, 10, 20, 30}, SGD or
Adam, batch 1) a simulated LoRA fine-tune, ∇L_harm(θ*) and K = 5 Richardson iterations on HVPs
(γ = 1) on one fresh fine-tuning batch; the outer gradient is
∇L_harm + α∇R + β·meta_rate·mean_j(h_j − ∇L_harm(θ)).

Inputs are random latents and random text embeddings shaped like the encoders' outputs (the
VAE and text encoder are not part of an outer step once data are encoded). Every combination
runs in a fresh subprocess with the same seed, so the configurations, batches and noise are
identical, and its peak memory is its own: the CUDA allocator peak on a GPU, the peak resident
set (VmHWM, reset after the model is built) on a CPU; ``setup_peak`` and the child's
``ru_maxrss`` include building the model. Accuracy is reported against the ``fp32``
combination: relative norm difference and cosine of the mean hypergradient and of the outer
gradient. The hypergradient is the one the published method uses: the Richardson solve with
the published safeguards (divergence test ‖Jv‖/‖v‖ > 1 or norm > 0.2: halve the step, up to
5 times, then fall back to ∇L_harm(θ*)); retries and fallbacks are reported per
configuration, since a lever that flips one of these decisions changes the hypergradient.

Lever tokens (joined by ``+``): ``fp32`` (no lever: the reference), ``published`` (fp32 plus
the published design's second frozen UNet copy for the regularizer target), ``bf16`` /
``fp16`` (autocast forward passes of the inner fine-tuning and ∇L_harm), ``ahvp`` (the
HVPs under autocast too), ``ckpt`` (gradient checkpointing,
:func:`resalign.algorithms.memory.enable_gradient_checkpointing`), ``half`` (frozen weights
stored in the autocast dtype; forces autocast on the regularizer and HVPs), ``fr`` (forward-over-reverse HVPs instead of double backward).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text

PUBLISHED = {
    "rank": 4,
    "targets": ["to_q", "to_k", "to_v", "to_out.0"],
    "samples_per_step": 3,
    "iterations": 5,
    "gamma": 1.0,
    "beta": 0.8,
    "meta_rate": 0.3,
    "alpha": 1.6,
    "harm_batch": 1,
    "retain_batch": 4,
    "inner_batch": 1,
    "lr": [1e-4, 1e-5, 1e-6],
    "steps": [5, 10, 20, 30],
    "optimizer": ["sgd", "adam"],
    "max_norm": 0.2,
    "divergence_ratio": 1.0,
    "retries": 5,
}

TOKENS = ("fp32", "published", "bf16", "fp16", "ckpt", "half", "fr", "ahvp")
DEFAULT_COMBOS = "published,fp32,ckpt,bf16,bf16+ckpt,bf16+half,bf16+half+ckpt"
PHASES = ("direct", "inner", "harm_grad", "richardson")


@dataclass
class Levers:
    """A lever combination parsed from ``bf16+ckpt``-style tokens."""

    name: str
    autocast: str = "none"
    gradient_checkpointing: bool = False
    frozen_half: bool = False
    second_copy: bool = False
    hvp_backend: str = "double_backward"
    autocast_hvp: bool = False

    @classmethod
    def parse(cls, combo: str) -> Levers:
        tokens = [t for t in combo.split("+") if t]
        bad = [t for t in tokens if t not in TOKENS]
        if bad or not tokens:
            raise ValueError(f"unknown lever token(s) {bad or combo!r}; known: {', '.join(TOKENS)}")
        lv = cls(name=combo)
        for t in tokens:
            if t == "published":
                lv.second_copy = True
            elif t in ("bf16", "fp16"):
                lv.autocast = t
            elif t == "ckpt":
                lv.gradient_checkpointing = True
            elif t == "half":
                lv.frozen_half = True
            elif t == "fr":
                lv.hvp_backend = "forward_over_reverse"
            elif t == "ahvp":
                lv.autocast_hvp = True
        if (lv.frozen_half or lv.autocast_hvp) and lv.autocast == "none":
            raise ValueError(f"{combo}: 'half' and 'ahvp' need 'bf16' or 'fp16'")
        return lv


@dataclass
class StepResult:
    """What one outer step measured."""

    phase_seconds: dict[str, float] = field(default_factory=dict)
    phase_peak_bytes: dict[str, int] = field(default_factory=dict)
    step_seconds: float = 0.0
    configs: list[dict[str, Any]] = field(default_factory=list)
    hvps: int = 0


def _flat(tensors: list[Any]) -> Any:
    import torch

    return torch.cat([t.detach().reshape(-1).float().cpu() for t in tensors])


def outer_step(
    unet: Any,
    arch: str,
    levers: Levers,
    *,
    latent: int,
    inner_steps_cap: int | None,
    seed: int,
    device: str,
    original_unet: Any = None,
    gamma: float | None = None,
    samples_per_step: int | None = None,
) -> tuple[StepResult, Any, Any]:
    """One outer step of the published configuration on ``unet`` (LoRA already added), with
    ``levers`` applied by the caller to the model. Returns (measurements, flat mean
    hypergradient, flat outer gradient), both fp32 on the CPU. ``gamma`` overrides the
    published γ = 1 (tests use a smaller one so that no safeguard decision sits on its
    threshold); ``samples_per_step`` overrides the published J = 3 (the CPU table runs fewer
    configurations per step to fit its time budget)."""
    import torch
    from diffusers import DDPMScheduler
    from torch.func import functional_call

    from ..algorithms import memory
    from ..algorithms.hypergrad import richardson_solve
    from ..algorithms.inner import FunctionalOptimizer, InnerView, simulate_finetune
    from ..algorithms.objectives import Denoiser, EncodedPairs, NoisedBatch, noise_batch
    from ..models.sd_arch import TEXT_SHAPE, conditioning

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    gen = torch.Generator().manual_seed(seed)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    in_ch = unet.config.in_channels

    def pairs(n: int) -> EncodedPairs:
        cond = conditioning(arch, n, generator=gen)
        lat = torch.randn(n, in_ch, latent, latent, generator=gen)
        return EncodedPairs(lat, cond["encoder_hidden_states"]).to(device)

    harmful, retain, benign = pairs(4), pairs(8), pairs(8)
    added = None
    if TEXT_SHAPE[arch][2] is not None:
        extra = conditioning(arch, 1, generator=gen, device=device)["added_cond_kwargs"]
        added = extra

    class BenchDenoiser(Denoiser):
        # SDXL needs its pooled-text/time conditioning; the frozen original is the same UNet
        # with adapters disabled, or the published design's second copy.
        def _kw(self, emb: Any) -> dict[str, Any]:
            kw: dict[str, Any] = {"encoder_hidden_states": emb, "return_dict": False}
            if added is not None:
                n = emb.shape[0]
                kw["added_cond_kwargs"] = {k: v.expand(n, *v.shape[1:]) for k, v in added.items()}
            return kw

        def eps(self, params: Mapping[str, Any], nb: NoisedBatch, embeddings: Any = None) -> Any:
            emb = nb.embeddings if embeddings is None else embeddings
            out = functional_call(
                self.unet, dict(params), (nb.noisy, nb.timesteps), self._kw(emb), strict=False
            )
            return out[0]

        @torch.no_grad()
        def eps_original(self, nb: NoisedBatch, embeddings: Any = None) -> Any:
            emb = nb.embeddings if embeddings is None else embeddings
            if original_unet is not None:
                return original_unet(nb.noisy, nb.timesteps, **self._kw(emb))[0].detach()
            with memory.frozen_original(self.unet):
                return self.unet(nb.noisy, nb.timesteps, **self._kw(emb))[0].detach()

    den = BenchDenoiser(unet, scheduler, {})
    theta = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    names = list(theta)
    P = PUBLISHED
    mode = levers.autocast

    def harm_loss(params: Mapping[str, Any], nb: NoisedBatch) -> Any:
        return -memory.squared_error(den.eps(params, nb), nb.target)

    def reg_loss(params: Mapping[str, Any], nb: NoisedBatch) -> Any:
        return memory.squared_error(den.eps(params, nb), den.eps_original(nb))

    def ft_loss(params: Mapping[str, Any], nb: NoisedBatch) -> Any:
        return memory.squared_error(den.eps(params, nb), nb.target)

    # Autocast scope: the inner fine-tuning and ∇L_harm always; the distillation regularizer
    # and the HVPs stay fp32 unless the frozen weights are half (they cannot meet fp32
    # activations) or ``ahvp`` asks for it. Measured on the tiny UNet: bf16 distillation
    # loses the ε_θ − ε₀ difference to rounding (outer gradient 126% off) and bf16 HVPs flip
    # the published divergence test (hypergradient 50% off).
    low = levers.frozen_half
    harm_l = memory.autocast_loss(harm_loss, mode, device)
    reg_l = memory.autocast_loss(reg_loss, mode if low else "none", device)
    ft_l = memory.autocast_loss(ft_loss, mode if (low or levers.autocast_hvp) else "none", device)

    class AutocastDenoiser(BenchDenoiser):
        # the inner loop calls den.eps through the objectives; run it under autocast too
        def eps(self, params: Mapping[str, Any], nb: NoisedBatch, embeddings: Any = None) -> Any:
            with memory.autocast(mode, device):
                return super().eps(params, nb, embeddings).float()

    inner_den = AutocastDenoiser(unet, scheduler, {})
    res = StepResult(
        phase_seconds=dict.fromkeys(PHASES, 0.0), phase_peak_bytes=dict.fromkeys(PHASES, 0)
    )

    def phase(name: str, fn: Any) -> Any:
        sync()
        memory.reset_peak_memory(device)
        t0 = time.perf_counter()
        out = fn()
        sync()
        res.phase_seconds[name] += time.perf_counter() - t0
        res.phase_peak_bytes[name] = max(res.phase_peak_bytes[name], memory.peak_memory(device))
        return out

    def grad_of(loss_fn: Any, params: dict[str, Any], nb: NoisedBatch) -> list[Any]:
        leaves = [params[n].detach().requires_grad_(True) for n in names]
        with torch.enable_grad():
            loss = loss_fn(dict(zip(names, leaves)), nb)
            return [g.detach() for g in torch.autograd.grad(loss, leaves)]

    t_step = time.perf_counter()
    harm_nb = noise_batch(harmful.sample(P["harm_batch"], gen), scheduler, gen)
    ret_nb = noise_batch(retain.sample(P["retain_batch"], gen), scheduler, gen)

    def direct() -> tuple[list[Any], list[Any]]:
        g_h = grad_of(harm_l, theta, harm_nb)
        g_r = grad_of(reg_l, theta, ret_nb)
        return g_h, g_r

    g_harm, g_reg = phase("direct", direct)
    view = InnerView("identity", names, names)
    hyper_sum = [torch.zeros_like(t, dtype=torch.float32) for t in g_harm]
    J = P["samples_per_step"] if samples_per_step is None else int(samples_per_step)
    for _ in range(J):
        lr = P["lr"][int(torch.randint(len(P["lr"]), (1,), generator=gen))]
        steps = P["steps"][int(torch.randint(len(P["steps"]), (1,), generator=gen))]
        opt = P["optimizer"][int(torch.randint(len(P["optimizer"]), (1,), generator=gen))]
        run_steps = steps if inner_steps_cap is None else min(steps, inner_steps_cap)
        optimizer = FunctionalOptimizer(opt, lr)
        psi0 = {n: theta[n].detach() for n in names}
        inner = phase(
            "inner",
            lambda o=optimizer, s=run_steps, p=psi0: simulate_finetune(
                inner_den, view, p, o, s, benign, P["inner_batch"], gen
            ),
        )
        star, losses = dict(inner.params), list(inner.losses)
        inner.params = {}
        # the inner optimizer state is already dropped by simulate_finetune; release the
        # rest (last batches, graphs held by stray references) before the Richardson phase
        memory.free_inner_state(inner.__dict__, collect=True)
        del inner
        b_nb = noise_batch(harmful.sample(P["harm_batch"], gen), scheduler, gen)
        b = phase("harm_grad", lambda s=star, nb=b_nb: grad_of(harm_l, s, nb))
        h_nb = noise_batch(benign.sample(P["inner_batch"], gen), scheduler, gen)

        def solve(s: dict[str, Any] = star, nb: NoisedBatch = h_nb, rhs: list[Any] = b) -> Any:
            from ..algorithms.hypergrad import make_hvp

            def loss_fn(ps: Any) -> Any:
                return ft_l(dict(zip(names, ps)), nb)

            hvp = make_hvp(loss_fn, [s[n] for n in names], levers.hvp_backend)
            return richardson_solve(
                rhs,
                hvp,
                P["gamma"] if gamma is None else gamma,
                P["iterations"],
                divergence_ratio=P["divergence_ratio"],
                max_norm=P["max_norm"],
                retries=P["retries"],
                fallback="direct",
            )

        x, stats = phase("richardson", solve)
        res.hvps += stats.hvps
        for acc, xi in zip(hyper_sum, x):
            acc.add_(xi.float())
        xn = math.sqrt(sum(float((xi.double() ** 2).sum()) for xi in x))
        res.configs.append(
            {
                "lr": lr,
                "steps": steps,
                "steps_run": run_steps,
                "optimizer": opt,
                "inner_loss_last": losses[-1] if losses else None,
                "harm_timesteps": [int(t) for t in b_nb.timesteps.tolist()],
                "hvp_timesteps": [int(t) for t in h_nb.timesteps.tolist()],
                "residuals": stats.residuals,
                "hypergrad_norm": xn,
                "damping": stats.damping,
                "retries": stats.retries,
                "fell_back": stats.fell_back,
                "hvps": stats.hvps,
            }
        )
        del star, b, x
    hyper = [h / J for h in hyper_sum]
    scale = P["beta"] * P["meta_rate"]
    outer = [
        gh.float() + P["alpha"] * gr.float() + scale * (h - gh.float())
        for gh, gr, h in zip(g_harm, g_reg, hyper)
    ]
    sync()
    res.step_seconds = time.perf_counter() - t_step
    return res, _flat(hyper), _flat(outer)


def prepare_unet(
    arch: str, levers: Levers, *, seed: int = 0, device: str = "cpu", dtype: Any = None
) -> tuple[Any, Any, Any]:
    """Build ``arch``'s UNet (random weights under ``seed``), add the published LoRA and apply
    the model-side levers. Returns (unet, second frozen copy or None, trainable selection)."""
    import torch

    from ..algorithms import memory
    from ..models.sd_arch import build_unet
    from ..models.trainable import apply_trainable

    unet = build_unet(arch, seed=seed, device=device, dtype=dtype or torch.float32)
    original = copy.deepcopy(unet).requires_grad_(False) if levers.second_copy else None
    sel = apply_trainable(
        unet,
        {"kind": "lora", "rank": PUBLISHED["rank"], "targets": PUBLISHED["targets"]},
        torch.Generator().manual_seed(seed),
    )
    unet.to(device=device, dtype=dtype or torch.float32)
    if levers.gradient_checkpointing:
        memory.enable_gradient_checkpointing(unet)
    if levers.frozen_half:
        memory.cast_frozen_weights(unet, memory.AUTOCAST_DTYPES[levers.autocast])
    unet.train()
    return unet, original, sel


def _worker(args: argparse.Namespace) -> None:
    import torch

    from ..algorithms import memory
    from ..models.attention import math_attention

    torch.set_num_threads(args.threads)
    device = args.device
    levers = Levers.parse(args.combo)
    t0 = time.perf_counter()
    unet, original, sel = prepare_unet(args.arch, levers, seed=args.seed, device=device)
    build_s = time.perf_counter() - t0
    setup_peak = memory.peak_memory(device)
    memory.reset_peak_memory(device)
    # Double backward through attention needs the math path (fused SDPA kernels lack it).
    with math_attention(unet):
        res, hyper, outer = outer_step(
            unet,
            args.arch,
            levers,
            latent=args.latent,
            inner_steps_cap=args.inner_steps,
            seed=args.seed,
            device=device,
            original_unet=original,
            samples_per_step=args.configs,
        )
    step_peak = max(res.phase_peak_bytes.values())
    torch.save({"hyper": hyper, "outer": outer}, args.tensors)
    report = {
        "combo": args.combo,
        "levers": asdict(levers),
        "arch": args.arch,
        "latent": args.latent,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "trainable_params": sel.num_params,
        "unet_params": sum(p.numel() for p in unet.parameters()) - sel.num_params,
        "build_seconds": build_s,
        "setup_peak_bytes": setup_peak,
        "step_peak_bytes": step_peak,
        **asdict(res),
    }
    Path(args.report).write_text(json.dumps(report), encoding="utf-8")


def _compare(ref: Any, other: Any) -> dict[str, float]:
    import torch

    rn = float(torch.linalg.vector_norm(ref.double()))
    diff = float(torch.linalg.vector_norm(other.double() - ref.double()))
    on = float(torch.linalg.vector_norm(other.double()))
    cos = float(torch.dot(ref.double(), other.double())) / (rn * on) if rn and on else 0.0
    return {"rel_diff": diff / rn if rn else math.inf, "cosine": cos}


def _run_combo(args: argparse.Namespace, combo: str, tmp: Path) -> dict[str, Any]:
    tensors = tmp / f"{combo}.pt"
    report = tmp / f"{combo}.json"
    cmd = [
        sys.executable,
        "-m",
        "resalign.bench.sd",
        "--worker",
        "--arch",
        args.arch,
        "--latent",
        str(args.latent),
        "--seed",
        str(args.seed),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--combo",
        combo,
        "--tensors",
        str(tensors),
        "--report",
        str(report),
    ]
    if args.inner_steps is not None:
        cmd += ["--inner-steps", str(args.inner_steps)]
    if args.configs is not None:
        cmd += ["--configs", str(args.configs)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    timer = None
    if args.combo_timeout:
        timer = threading.Timer(args.combo_timeout, proc.kill)
        timer.start()
    _, status, usage = os.wait4(proc.pid, 0)
    if timer is not None:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not report.exists():
        why = f"worker exited with {proc.returncode}"
        if args.combo_timeout and wall >= args.combo_timeout:
            why = f"killed after {args.combo_timeout:.0f} s"
        return {"combo": combo, "error": why, "wall_seconds": wall}
    out = json.loads(report.read_text(encoding="utf-8"))
    # ru_maxrss is in KiB on Linux: the child's whole-life peak, model build included.
    out["child_maxrss_bytes"] = int(usage.ru_maxrss) * 1024
    out["wall_seconds"] = wall
    out["tensors"] = str(tensors)
    return out


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def table(results: list[dict[str, Any]]) -> str:
    """A markdown table of the combinations (peak of the outer step, ratio to fp32)."""
    base = next((r for r in results if r["combo"] == "fp32" and "error" not in r), None)
    head = (
        "| levers | step peak GiB | × fp32 | setup peak GiB | step s | direct s | inner s "
        "| ∇L_harm(θ*) s | HVP/Richardson s | hypergrad rel diff | cosine | outer rel diff "
        "| safeguard flips |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['combo']} | {r['error']} | | | | | | | | | | | |")
            continue
        ratio = r["step_peak_bytes"] / base["step_peak_bytes"] if base else math.nan
        acc = r.get("accuracy", {})
        hyp = acc.get("hyper", {})
        out = acc.get("outer", {})
        rows.append(
            f"| {r['combo']} | {_gib(r['step_peak_bytes'])} | {ratio:.2f} | "
            f"{_gib(r['setup_peak_bytes'])} | {r['step_seconds']:.1f} | "
            + " | ".join(f"{r['phase_seconds'][p]:.1f}" for p in PHASES)
            + " | "
            f"{hyp.get('rel_diff', math.nan):.2e} | {hyp.get('cosine', math.nan):.6f} | "
            f"{out.get('rel_diff', math.nan):.2e} | {acc.get('safeguard_flips', '')} |"
        )
    return "\n".join(rows)


def _write_json(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    payload = {
        "arch": args.arch,
        "latent": args.latent,
        "device": args.device,
        "inner_steps_cap": args.inner_steps,
        "samples_per_step": args.configs or PUBLISHED["samples_per_step"],
        "threads": args.threads,
        "published": PUBLISHED,
        "results": results,
    }
    path = Path(args.json_path)
    atomic_write_text(path, json.dumps(payload, indent=2))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m resalign.bench sd``."""
    ap = argparse.ArgumentParser(prog="resalign bench sd", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=["sd14", "sdxl", "tiny"], default="sd14")
    ap.add_argument(
        "--latent", type=int, default=None, help="latent side (default: 64 on GPU, 16 on CPU)"
    )
    ap.add_argument(
        "--levers", default=DEFAULT_COMBOS, help=f"comma-separated combinations; tokens {TOKENS}"
    )
    ap.add_argument(
        "--inner-steps", type=int, default=None, help="cap on simulated fine-tuning steps"
    )
    ap.add_argument(
        "--configs",
        type=int,
        default=None,
        help="inner configurations J per outer step (default: the published 3)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument(
        "--combo-timeout", type=float, default=None, help="seconds before a combination is killed"
    )
    ap.add_argument("--json", dest="json_path", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--combo", help=argparse.SUPPRESS)
    ap.add_argument("--tensors", help=argparse.SUPPRESS)
    ap.add_argument("--report", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.latent is None:
        args.latent = 64 if args.device.startswith("cuda") else 16
    if args.worker:
        _worker(args)
        return 0
    combos = [c.strip() for c in args.levers.split(",") if c.strip()]
    try:
        for c in combos:
            Levers.parse(c)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # the reference runs first, so every later row gets its accuracy as soon as it finishes
    # and the JSON written after each combination is complete up to that point
    combos = ["fp32"] + [c for c in combos if c != "fp32"]
    import torch

    results: list[dict[str, Any]] = []
    ref_t = None
    with tempfile.TemporaryDirectory(prefix="resalign-bench-sd-") as tmp:
        for combo in combos:
            print(
                f"[bench sd] {args.arch} latent {args.latent} on {args.device}: {combo}", flush=True
            )
            r = _run_combo(args, combo, Path(tmp))
            tensors = r.pop("tensors", None)
            if tensors is not None:
                t = torch.load(tensors, weights_only=True)
                if combo == "fp32":
                    ref_t, ref = t, r
                if ref_t is not None:
                    r["accuracy"] = {k: _compare(ref_t[k], t[k]) for k in ("hyper", "outer")}
                    # a lever that changes a safeguard decision (retries, fallback) changes
                    # the hypergradient discontinuously: count such configurations
                    r["accuracy"]["safeguard_flips"] = sum(
                        (a["retries"], a["fell_back"]) != (b["retries"], b["fell_back"])
                        for a, b in zip(r["configs"], ref["configs"])
                    )
            results.append(r)
            if args.json_path:
                _write_json(args, results)
    print(table(results))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
