"""Benchmark of one outer hypergradient step: Moreau vs unrolled, on toy UNets.

For each model size and each number of inner steps S, a fresh subprocess runs one outer step
(S inner SGD steps on a rank-4 LoRA, then K HVPs for ``moreau`` or backprop through the S
steps for ``unrolled``) and reports its wall time, the time of each phase, and its peak
resident memory (``ru_maxrss`` of that subprocess, minus the resident size before the step,
so the baseline of Python + torch is not counted). The HVP-to-gradient time ratio is measured
for both HVP backends. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from ..atomic import atomic_write_text


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(
    size: str,
    kind: str,
    steps: int,
    iterations: int,
    batch: int,
    clock: str = "wall",
    step_reps: int = 1,
) -> dict:
    """One outer step in this process; returns times and memory. ``clock``: ``wall``
    (``perf_counter``) or ``cpu`` (this process's CPU time: on a shared machine the time spent
    waiting for a core is not the step's; the bench runs one thread). ``step_reps`` > 1: the
    Moreau step's time is the median of that many further warm steps."""
    import torch

    from ..algorithms.hypergrad import make_hvp, moreau_hypergradient, unrolled_hypergradient
    from ..algorithms.inner import FunctionalOptimizer, make_view, simulate_finetune
    from ..algorithms.objectives import Denoiser, denoise_loss, noise_batch
    from ..algorithms.toy import SIZES, toy_pairs, toy_scheduler, toy_unet
    from ..models.attention import math_attention
    from ..models.trainable import apply_trainable
    from ..spec.schema.model import TrainableSpec

    now = time.perf_counter if clock == "wall" else time.process_time
    torch.manual_seed(0)
    dt = torch.float32
    unet = toy_unet(size, dt)
    sel = apply_trainable(unet, TrainableSpec(), torch.Generator().manual_seed(0))
    cross = SIZES[size][2]
    sched = toy_scheduler()
    data = toy_pairs(16, cross, 1, dt)
    harm = toy_pairs(16, cross, 2, dt, shift=1.0)
    den = Denoiser(unet, sched, {})
    view = make_view(unet, sel.names, "lora", "lora", "own")
    theta = {n: p.detach() for n, p in unet.named_parameters() if n in set(sel.names)}
    names = list(theta)
    opt = FunctionalOptimizer("sgd", 1e-3)
    g = torch.Generator().manual_seed(0)
    n_params = sum(t.numel() for t in theta.values())
    # warm-up (allocator, lazy init) outside the measurement
    simulate_finetune(den, view, theta, opt, 1, data, batch, g)
    base = _current_rss_mib()
    phases: dict[str, float] = {}
    t0 = now()
    if kind == "moreau":

        def moreau_step() -> dict[str, float]:
            ph: dict[str, float] = {}
            t0 = now()
            res = simulate_finetune(den, view, theta, opt, steps, data, batch, g)
            t1 = now()
            ph["inner"] = t1 - t0
            hb = noise_batch(harm.sample(batch, g), sched, g)
            star = [res.params[n] for n in names]
            leaves = [s.clone().requires_grad_(True) for s in star]
            b = torch.autograd.grad(-denoise_loss(den, dict(zip(names, leaves)), hb), leaves)
            t2 = now()
            ph["direct_grad"] = t2 - t1
            nb = noise_batch(data.sample(batch, g), sched, g)
            with math_attention(unet):
                moreau_hypergradient(
                    b,
                    lambda ps: denoise_loss(den, dict(zip(names, ps)), nb),
                    star,
                    gamma=1e-3,
                    iterations=iterations,
                    tol=0.0,
                    divergence_ratio=None,
                    max_norm=None,
                    retries=0,
                )
            ph["hvps"] = now() - t2
            return ph

        phases = moreau_step()
    else:
        batches = [noise_batch(data.sample(batch, g), sched, g) for _ in range(steps)]
        hb = noise_batch(harm.sample(batch, g), sched, g)
        with math_attention(unet):
            unrolled_hypergradient(
                [theta[n] for n in names],
                lambda ps, k: denoise_loss(den, dict(zip(names, ps)), batches[k]),
                lambda ps: -denoise_loss(den, dict(zip(names, ps)), hb),
                steps,
                opt,
            )
        phases["unrolled"] = now() - t0
    total = now() - t0
    peak = _rss_mib() - base
    if kind == "moreau" and step_reps > 1:
        # the first step above is cold for the HVP path (its parts below are timed warm):
        # time step_reps more and keep the median (the memory stays the first step's)
        runs = sorted((moreau_step() for _ in range(step_reps)), key=lambda p: sum(p.values()))
        phases = runs[len(runs) // 2]
        total = sum(phases.values())
    out = {
        "size": size,
        "kind": kind,
        "S": steps,
        "K": iterations,
        "params": n_params,
        "seconds": total,
        "phases": phases,
        "peak_mib": peak,
        "step_reps": step_reps,
    }
    if kind == "moreau":
        # parts measured separately: one inner gradient step, one HVP, one direct gradient
        nb = noise_batch(data.sample(batch, g), sched, g)
        reps = 3

        def grad_once() -> None:
            ls = [theta[n].clone().requires_grad_(True) for n in names]
            torch.autograd.grad(denoise_loss(den, dict(zip(names, ls)), nb), ls)

        tg = now()
        for _ in range(reps):
            grad_once()
        t_grad = (now() - tg) / reps
        ratios = {}
        with math_attention(unet):
            # building the double-backward HVP's graph (one forward and a create_graph
            # backward), which the Moreau solve pays once per step before its K HVPs
            def loss_fn(ps: list[torch.Tensor]) -> torch.Tensor:
                return denoise_loss(den, dict(zip(names, ps)), nb)

            make_hvp(loss_fn, [theta[n] for n in names], "double_backward")
            tb = now()
            for _ in range(reps):
                make_hvp(loss_fn, [theta[n] for n in names], "double_backward")
            out["hvp_graph_over_grad"] = (now() - tb) / reps / t_grad
            for backend in ("double_backward", "forward_over_reverse"):
                hvp = make_hvp(loss_fn, [theta[n] for n in names], backend)
                v = [torch.randn_like(theta[n]) for n in names]
                hvp(v)
                th = now()
                for _ in range(reps):
                    hvp(v)
                ratios[backend] = (now() - th) / reps / t_grad
        out["hvp_over_grad"] = ratios
        # S inner gradient steps + 1 direct gradient + K HVPs, each timed on its own
        out["sum_of_parts"] = (steps + 1) * t_grad + iterations * ratios["double_backward"] * t_grad
        # ... and with the HVP graph counted as the part it is
        out["sum_of_parts_with_graph"] = out["sum_of_parts"] + out["hvp_graph_over_grad"] * t_grad
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="resalign bench hypergrad", description=__doc__)
    ap.add_argument("--sizes", default="tiny,medium")
    ap.add_argument("--steps", default="5,10,20,30")
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out", default="runs/bench/hypergrad.json")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="time with the wall clock or each subprocess's CPU time (shared machines)",
    )
    ap.add_argument(
        "--step-reps",
        type=int,
        default=1,
        help="time the Moreau step this many more times, warm, and report the median",
    )
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: size:kind:S in this process
    a = ap.parse_args(argv)
    if a.one:
        size, kind, s = a.one.split(":")
        print(json.dumps(measure(size, kind, int(s), a.iterations, a.batch, a.clock, a.step_reps)))
        return 0
    rows = []
    for size in a.sizes.split(","):
        for s in (int(x) for x in a.steps.split(",")):
            for kind in ("moreau", "unrolled"):
                cmd = [
                    sys.executable,
                    "-m",
                    "resalign.bench",
                    "hypergrad",
                    "--one",
                    f"{size}:{kind}:{s}",
                    "--iterations",
                    str(a.iterations),
                    "--batch",
                    str(a.batch),
                    "--clock",
                    a.clock,
                    "--step-reps",
                    str(a.step_reps),
                ]
                env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
                r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
                if r.returncode:
                    print(r.stderr[-2000:], file=sys.stderr)
                    return 1
                rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
                x = rows[-1]
                extra = ""
                if kind == "moreau":
                    h = x["hvp_over_grad"]
                    share = {k: v / x["seconds"] for k, v in x["phases"].items()}
                    extra = (
                        f" step/parts {x['seconds'] / x['sum_of_parts']:.2f}"
                        f" (with the HVP graph {x['seconds'] / x['sum_of_parts_with_graph']:.2f},"
                        f" graph/grad {x['hvp_graph_over_grad']:.1f})"
                        f" hvp/grad db {h['double_backward']:.1f} fr "
                        f"{h['forward_over_reverse']:.1f} share "
                        + " ".join(f"{k} {v:.0%}" for k, v in share.items())
                    )
                print(
                    f"{size:7s} {x['params']:>7d}p S={s:<3d} {kind:9s} "
                    f"{x['seconds']:7.2f}s peak {x['peak_mib']:7.1f} MiB{extra}",
                    flush=True,
                )
    out = Path(a.out)
    atomic_write_text(out, json.dumps(rows, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
