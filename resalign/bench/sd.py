"""SD-scale benchmark of one ResAlign outer step per memory-lever combination.

``python -m resalign.bench sd --arch sd14|sdxl|sd3-toy|flux-toy [--latent 16]
[--levers fp32,bf16+ckpt,...] --json out.json``

Builds the denoiser of the architecture with random weights (memory and time depend on the
architecture, not on the weights): a UNet from its published config
(:mod:`resalign.models.sd_arch`) with the published trainable LoRA (rank 4 on
to_q/to_k/to_v/to_out.0, published init) and SD's DDPM objective, or a flow-matching
transformer at the toy rehearsal's widths (``sd3-toy``: SD 3.5 Medium's block types;
``flux-toy``: FLUX.1-dev's; ``sd3-tiny``: the tiny family's, test size) with its family's
LoRA targets, flow-matching objective and conditioning, as a run of that family trains it
(:func:`prepare`). It builds the :class:`~resalign.algorithms.methods.UnlearnProblem` the
unlearn step would (random latents and text conditioning shaped as the encoders produce them:
the VAE and text encoders take no part in an outer step once data are encoded) and calls
``step()`` of the real
``resalign`` method once, on the published configuration (:func:`bench_spec`: J = 3 inner
configurations sampled from lr {1e-4, 1e-5, 1e-6}, steps {5, 10, 20, 30}, SGD or Adam, batch 1;
γ = 1, K = 5 with the published safeguards; β = 0.8, α = 1.6, meta_rate 0.3; AdamW 2e-4). The
phases are timed through the method's phase hook (:data:`resalign.algorithms.callbacks.PHASES`:
direct terms, inner fine-tunes, ∇L_harm(θ*), HVP graph + Richardson, the optimizer update).
The lever combination becomes the spec's ``unlearn.memory`` (and ``hvp_backend``), so what is
measured is exactly what ``resalign run`` executes.

Every combination runs in a fresh subprocess with the same seed, so the configurations, batches
and noise are identical, and its peak memory is its own: the CUDA allocator peak on a GPU, the
peak resident set (VmHWM, reset after the model is built) on a CPU; ``setup_peak`` and the
child's ``ru_maxrss`` include building the model; ``step_base_bytes`` is what the process
held when the step started, so ``step Δ`` (peak − base) is the step's own peak, the number
that matters at toy size, where the torch runtime dwarfs the model. A lever that leaves the
model as it was (checkpointing on no block or without the rebinding wrapper, frozen weights
not in half: :func:`lever_problems`) makes its row an error, never a silent no-op
measurement. Accuracy is reported against the ``fp32``
combination: relative norm difference and cosine of the mean hypergradient and of the outer
gradient; retries and fallbacks are reported per configuration, since a lever that flips one
of these safeguard decisions changes the hypergradient discontinuously.

Lever tokens (joined by ``+``): ``fp32`` (no lever: the reference), ``bf16`` / ``fp16``
(``memory.autocast``), ``ckpt`` (``memory.gradient_checkpointing``), ``half``
(``memory.frozen_dtype`` in the autocast dtype), ``fr`` (``hvp_backend:
forward_over_reverse``), ``published`` (the published design's memory: a second frozen UNet,
copied before the LoRA is added, computes the regularizer's target instead of the same UNet
with its adapters off; same values). The former ``ahvp`` token (HVPs under autocast without
half weights) is not an option of the method and is gone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..algorithms.callbacks import PHASES
from ..atomic import atomic_write_text
from .sd_models import ARCH_CHOICES, PUBLISHED, BenchModel, prepare
from .sd_table import table

TOKENS = ("fp32", "published", "bf16", "fp16", "ckpt", "half", "fr")
DEFAULT_COMBOS = "published,fp32,ckpt,bf16,bf16+ckpt,bf16+half,bf16+half+ckpt"


@dataclass
class Levers:
    """A lever combination parsed from ``bf16+ckpt``-style tokens."""

    name: str
    autocast: str = "none"
    gradient_checkpointing: bool = False
    frozen_half: bool = False
    second_copy: bool = False
    hvp_backend: str = "double_backward"

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
        if lv.frozen_half and lv.autocast == "none":
            raise ValueError(f"{combo}: 'half' needs 'bf16' or 'fp16'")
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


HALF = {"bf16": "bfloat16", "fp16": "float16"}


def bench_spec(
    levers: Levers,
    *,
    inner_steps_cap: int | None = None,
    samples_per_step: int | None = None,
    gamma: float | None = None,
    max_norm: float | None | str = "published",
) -> Any:
    """The ``unlearn`` section of the published configuration with ``levers`` as
    ``unlearn.memory`` (and ``hvp_backend``): what the benchmark's method runs. The inner step
    counts are capped at ``inner_steps_cap`` (CPU budgets); ``gamma`` / ``max_norm`` override
    the published 1 / 0.2 (tests keep every safeguard decision off its threshold)."""
    from ..spec.schema.unlearn import UnlearnSpec

    P = PUBLISHED
    steps = sorted({s if inner_steps_cap is None else min(s, inner_steps_cap) for s in P["steps"]})
    return UnlearnSpec.model_validate(
        {
            "method": "resalign",
            "steps": 1,
            "harmful_loss": {"batch_size": P["harm_batch"]},
            "regularizers": [
                {"kind": "distill", "weight": P["alpha"], "batch_size": P["retain_batch"]}
            ],
            "resilience": {
                "beta": P["beta"],
                "hypergradient": {
                    "kind": "moreau",
                    "gamma": P["gamma"] if gamma is None else gamma,
                    "iterations": P["iterations"],
                    "max_norm": P["max_norm"] if max_norm == "published" else max_norm,
                    "divergence_ratio": P["divergence_ratio"],
                    "retries": P["retries"],
                    "hvp_backend": levers.hvp_backend,
                },
                "meta": {
                    "samples_per_step": samples_per_step or P["samples_per_step"],
                    "meta_rate": P["meta_rate"],
                    "data": ["benign"],
                    "distribution": {
                        "lr": P["lr"],
                        "steps": steps,
                        "optimizer": P["optimizer"],
                        "batch_size": [P["inner_batch"]],
                    },
                },
            },
            "memory": {
                "autocast": levers.autocast,
                "gradient_checkpointing": levers.gradient_checkpointing,
                "frozen_dtype": HALF[levers.autocast] if levers.frozen_half else "float32",
            },
        }
    )


def bench_problem(model: BenchModel, *, latent: int, seed: int, device: str) -> Any:
    """The :class:`~resalign.algorithms.methods.UnlearnProblem` the unlearn step would build,
    with random latents and random text conditioning shaped as ``model``'s encoders produce
    it (the VAE and text encoders take no part in an outer step once data are encoded)."""
    import torch

    from ..algorithms.methods import UnlearnProblem
    from ..algorithms.objectives import EncodedPairs

    gen = torch.Generator().manual_seed(seed)

    def pairs(n: int) -> EncodedPairs:
        cond = model.condition(n, gen, device)
        lat = torch.randn(n, model.channels, latent, latent, generator=gen).to(device)
        return EncodedPairs.from_condition(lat, cond)

    harmful, retain, benign = pairs(4), pairs(8), pairs(8)
    return UnlearnProblem(
        model.denoiser,
        model.objective,
        model.selection,
        harmful=harmful,
        retain=retain,
        pools={"benign": benign},
        default_pool=["benign"],
    )


def outer_step(
    model: BenchModel,
    levers: Levers,
    *,
    latent: int,
    seed: int,
    device: str,
    inner_steps_cap: int | None = None,
    gamma: float | None = None,
    max_norm: float | None | str = "published",
    samples_per_step: int | None = None,
) -> tuple[StepResult, Any, Any]:
    """One outer step of the real ``resalign`` method (:func:`bench_spec` on
    :func:`bench_problem`), each phase timed through the method's phase hook. Returns
    (measurements, flat mean hypergradient, flat outer gradient), both fp32 on the CPU: the
    mean over configs of what the method's ``hypergradient`` returned (a dropped one counts as
    zero) and the gradient its ``step`` handed to the optimizer. ``model.original``: the
    ``published`` lever's second frozen copy. Raises :class:`LeverNotApplied` when a lever
    of ``levers`` left the model as it was (:func:`lever_problems`)."""
    import torch

    from ..algorithms import memory
    from ..algorithms.methods import build_method

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    res = StepResult(
        phase_seconds=dict.fromkeys(PHASES, 0.0),
        phase_peak_bytes=dict.fromkeys(PHASES, 0),
    )

    @contextmanager
    def phase(name: str) -> Iterator[None]:
        sync()
        memory.reset_peak_memory(device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync()
            res.phase_seconds[name] += time.perf_counter() - t0
            res.phase_peak_bytes[name] = max(res.phase_peak_bytes[name], memory.peak_memory(device))

    problem = bench_problem(model, latent=latent, seed=seed, device=device)
    spec = bench_spec(
        levers,
        inner_steps_cap=inner_steps_cap,
        samples_per_step=samples_per_step,
        gamma=gamma,
        max_norm=max_norm,
    )
    seen: list[dict[str, Any]] = []
    method = build_method("resalign", problem, spec, seed, seen.append, phases=phase)
    problems = lever_problems(method.unet, levers)
    if problems:
        raise LeverNotApplied("; ".join(problems))
    # observe (not change) what the step computes: the per-config hypergradients and the
    # outer gradient, copied to the CPU in fp32 outside every timed phase
    hypers: list[list[Any]] = []
    outer: list[Any] = []
    own_hyper, own_outer = method.hypergradient, method.outer_gradient

    def hypergradient(*a: Any, **kw: Any) -> Any:
        h, st = own_hyper(*a, **kw)
        hypers.append([t.detach().float().cpu() for t in h])
        return h, st

    def outer_gradient() -> Any:
        g, st = own_outer()
        outer.extend(t.detach().float().cpu() for t in g)
        return g, st

    original = model.original
    if original is not None:
        # ``published``: the regularizer's target comes from the second frozen copy, called
        # as every trainer calls the denoiser (Flux's transformer packed)
        from ..models.bundle import as_condition
        from ..models.diffusion import predict

        def eps_original(nb: Any, cond: Any = None) -> Any:
            kwargs = nb.condition if cond is None else as_condition(cond)
            with torch.no_grad():
                return predict(original, nb.noisy, nb.timesteps, kwargs)

        method.den.eps_original = eps_original  # type: ignore[method-assign]
    method.hypergradient = hypergradient  # type: ignore[method-assign]
    method.outer_gradient = outer_gradient  # type: ignore[method-assign]
    sync()
    t_step = time.perf_counter()
    method.step()
    sync()
    res.step_seconds = time.perf_counter() - t_step
    st = seen[0]
    for j in range(len(hypers)):
        c = {k[len(f"meta{j}.") :]: v for k, v in st.items() if k.startswith(f"meta{j}.")}
        residuals = [
            c[f"residual_{i}"] for i in range(int(c.get("hvps", 0))) if f"residual_{i}" in c
        ]
        res.configs.append(
            {
                "config": c.get("config"),
                "lr": c.get("lr"),
                "steps": int(c.get("steps", 0)),
                "optimizer": c.get("optimizer"),
                "inner_loss_last": c.get("inner_loss"),
                "residuals": residuals,
                "hypergrad_norm": c.get("hypergrad_norm"),
                "damping": c.get("damping"),
                "retries": int(c.get("retries", 0)),
                "fell_back": bool(c.get("fallback", 0.0)),
                "hvps": int(c.get("hvps", 0)),
            }
        )
        res.hvps += int(c.get("hvps", 0))
    mean = [sum(parts) / len(hypers) for parts in zip(*hypers)]
    return res, _flat(mean), _flat(outer)


class LeverNotApplied(RuntimeError):
    """A lever of the combination left the model as it was: nothing would be measured."""


def lever_problems(denoiser: Any, levers: Levers) -> list[str]:
    """What of ``levers`` did not take effect on ``denoiser`` once the method applied
    ``unlearn.memory``: gradient checkpointing on no block, or blocks whose checkpointing
    function is not the rebinding one of :mod:`resalign.algorithms.memory` (diffusers' own
    recomputes with the module's parameters instead of θ*); frozen weights left in fp32.
    Empty when every lever applied."""
    import torch

    from ..algorithms import memory

    problems = []
    name = type(denoiser).__name__
    if levers.gradient_checkpointing:
        blocks = [m for m in denoiser.modules() if getattr(m, "gradient_checkpointing", False)]
        if not blocks:
            problems.append(f"ckpt: no module of {name} has gradient checkpointing on")
        elif any(
            getattr(m, "_gradient_checkpointing_func", None) is not memory._checkpoint_call
            for m in blocks
        ):
            problems.append(f"ckpt: {name} checkpoints without the rebinding wrapper")
    if levers.frozen_half:
        want = torch.bfloat16 if levers.autocast == "bf16" else torch.float16
        frozen = [p for p in denoiser.parameters() if not p.requires_grad]
        if not frozen or any(p.dtype != want for p in frozen):
            problems.append(f"half: frozen weights of {name} are not all {want}")
    return problems


def _worker(args: argparse.Namespace) -> None:
    import torch

    from ..algorithms import memory

    torch.set_num_threads(args.threads)
    device = args.device
    levers = Levers.parse(args.combo)
    t0 = time.perf_counter()
    model = prepare(
        args.arch,
        seed=args.seed,
        device=device,
        latent=args.latent,
        second_copy=levers.second_copy,
    )
    build_s = time.perf_counter() - t0
    setup_peak = memory.peak_memory(device)
    memory.reset_peak_memory(device)
    # what the process holds when the step starts (model, data, the torch runtime): at toy
    # size it dwarfs the step's own allocations, so the table also shows peak - base
    step_base = memory.current_memory(device)
    sel = model.selection
    try:
        # the method itself switches to the math attention path around its HVPs
        res, hyper, outer = outer_step(
            model,
            levers,
            latent=args.latent,
            inner_steps_cap=args.inner_steps,
            seed=args.seed,
            device=device,
            samples_per_step=args.configs,
        )
    except LeverNotApplied as e:
        report = {"combo": args.combo, "error": f"lever not applied: {e}"}
        Path(args.report).write_text(json.dumps(report), encoding="utf-8")
        return
    step_peak = max(res.phase_peak_bytes.values())
    torch.save({"hyper": hyper, "outer": outer}, args.tensors)
    report = {
        "combo": args.combo,
        "levers": asdict(levers),
        "arch": args.arch,
        "denoiser": type(model.denoiser).__name__,
        "latent": args.latent,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "trainable_params": sel.num_params,
        "unet_params": sum(p.numel() for p in model.denoiser.parameters()) - sel.num_params,
        "build_seconds": build_s,
        "setup_peak_bytes": setup_peak,
        "step_base_bytes": step_base,
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
    if "error" in out:  # the worker's own diagnosis (a lever that did not apply)
        return {"combo": combo, "error": out["error"], "wall_seconds": wall}
    # ru_maxrss is in KiB on Linux: the child's whole-life peak, model build included.
    out["child_maxrss_bytes"] = int(usage.ru_maxrss) * 1024
    out["wall_seconds"] = wall
    out["tensors"] = str(tensors)
    return out


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
    ap.add_argument(
        "--arch",
        choices=ARCH_CHOICES,
        default="sd14",
        help="UNets sd14, sdxl, tiny; flow-matching transformers at the toy rehearsal's "
        "widths sd3-toy (SD 3.5 Medium's blocks), flux-toy (FLUX.1-dev's)",
    )
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
    from ..models.device import resolve_device

    # the one resolver the model step uses: auto -> cuda, mps or cpu; an absent device is a clear error
    args.device = resolve_device(args.device)
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
