"""Isolate why bf16 autocast is far off fp32 on the Flux toy transformer (issue 23).

    OMP_NUM_THREADS=1 nice -n 10 python scripts/flux_bf16_isolate.py \
        --json docs/bench/flux_bf16_isolate.json

Builds the denoiser exactly as ``resalign bench sd --arch flux-toy`` does
(:func:`resalign.bench.sd.prepare`: random weights under the seed, the family's rank-4 LoRA
with the published init) and the bench's problem (:func:`resalign.bench.sd.bench_problem`),
draws the noise and timesteps of its harmful pairs once (:func:`noise_batch`: one fixed
batch), and measures, against the fp32 forward, the relative error ``||x - x_fp32|| /
||x_fp32||`` of

- the prediction (the velocity the transformer returns, through resalign's
  :class:`~resalign.algorithms.objectives.Denoiser`, as the method calls it), and
- the gradient of the flow-matching harm loss (L_harm = -MSE(prediction, target), the
  published ``neg_denoise``) w.r.t. the trainable LoRA tensors,

under ``torch.autocast("cpu", bfloat16)`` (the method's ``unlearn.memory.autocast: bf16``),
with ablations that keep ONE component in fp32 while the rest runs under autocast: the
component's forward runs with autocast disabled on fp32 inputs, and its floating outputs are
cast back to the dtype the unmodified component returns under autocast (so only the
component's own arithmetic gains precision; downstream sees the dtypes it saw before). The
``exact timestep`` / ``exact guidance`` ablations feed ``time_text_embed`` the fp32 σ·1000
(and guidance·1000) in place of what ``FluxTransformer2DModel.forward`` hands it after
``timestep.to(hidden_states.dtype) * 1000``: under autocast ``hidden_states`` (the
``x_embedder`` output) is bf16. The reverse check, ``fp32, bf16-rounded t``, is the fp32
forward fed the timestep (and guidance) rounded as that cast rounds them.

Also: the same on wider heads (attention_head_dim 8 -> 16 at the same width with one head,
and 2 heads of 16 / 32), built by the bench's own builder with the toy config's transformer
widened; the SD3 toy (``sd3-toy``) as a control; fp16 autocast; and fp32 against float64
(the measure itself: should be ~1e-6).

``--step`` adds the bench's own accuracy measure: one outer step of the method in process
(:func:`step_check`), fp32, bf16, and bf16 with the exact timestep and guidance.

About 20 s of CPU on one thread (2 min wall on the loaded 2-core machine, with ``--step``). No diffusers code is edited: ablations are instance
``forward`` overrides and forward pre-hooks, removed after each measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import Tensor

from resalign.algorithms.objectives import Denoiser, NoisedBatch, noise_batch, sq_err
from resalign.atomic import atomic_write_text
from resalign.bench.sd import BenchModel, Levers, _compare, bench_problem, outer_step, prepare

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
ADALN = (
    "AdaLayerNormZero",
    "AdaLayerNormZeroSingle",
    "AdaLayerNormContinuous",
    "SD35AdaLayerNormZeroX",
)
QK_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")


# --- building ----------------------------------------------------------------------------


def build(
    arch: str, seed: int, latent: int, transformer: dict[str, Any] | None = None
) -> BenchModel:
    """The bench's model of ``arch`` (:func:`prepare`); ``transformer`` overrides keys of the
    Flux toy's transformer config (the bench's own builder runs with the widened config)."""
    if not transformer:
        return prepare(arch, seed=seed, device="cpu", latent=latent)
    import resalign.rehearse as rehearse

    own = rehearse.flux_configs

    def widened(scale: str) -> dict[str, dict[str, Any]]:
        cfg = own(scale)
        cfg["transformer"].update(transformer)
        return cfg

    # _flow_parts imports flux_configs from resalign.rehearse at call time
    with mock.patch.object(rehearse, "flux_configs", widened):
        return prepare(arch, seed=seed, device="cpu", latent=latent)


def harm_batch(model: BenchModel, seed: int, latent: int) -> NoisedBatch:
    """All harmful pairs of the bench's problem, noised once (fixed noise and timesteps)."""
    problem = bench_problem(model, latent=latent, seed=seed, device="cpu")
    return noise_batch(problem.harmful, model.objective, torch.Generator().manual_seed(seed))


def batch_to(nb: NoisedBatch, dtype: torch.dtype) -> NoisedBatch:
    """``nb`` with every floating tensor in ``dtype`` (the float64 reference)."""

    def c(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(dtype) if t.is_floating_point() else t

    return NoisedBatch(
        c(nb.noisy),  # type: ignore[arg-type]
        c(nb.timesteps),  # type: ignore[arg-type]
        c(nb.target),  # type: ignore[arg-type]
        c(nb.embeddings),  # type: ignore[arg-type]
        c(nb.latents),  # type: ignore[arg-type]
        None if nb.added is None else {k: c(v) for k, v in nb.added.items()},  # type: ignore[misc]
        c(nb.pooled),
        c(nb.guidance),
    )


# --- measuring ---------------------------------------------------------------------------


def forward_and_grad(
    unet: torch.nn.Module, objective: Any, names: list[str], nb: NoisedBatch, mode: str
) -> tuple[Tensor, Tensor, float]:
    """(prediction, flat gradient of L_harm w.r.t. the tensors ``names``, L_harm) of one
    forward under ``mode`` (``none``, ``bf16``, ``fp16``), as the method's harm loss computes
    them (:meth:`Denoiser.low_precision`, :func:`neg_denoise_loss` written out so the
    prediction is kept)."""
    own = dict(unet.named_parameters())
    params = {n: own[n].detach().clone().requires_grad_(True) for n in names}
    den = Denoiser(unet, objective, {}, autocast=mode)
    with den.low_precision():
        pred = den.eps(params, nb)
    loss = -sq_err(pred, nb.target)
    grads = torch.autograd.grad(loss, list(params.values()))
    return pred.detach(), torch.cat([g.reshape(-1) for g in grads]), float(loss.detach())


def rel(x: Tensor, ref: Tensor) -> float:
    """||x - ref|| / ||ref|| in float64."""
    r = ref.double()
    return float(torch.linalg.vector_norm(x.double() - r) / torch.linalg.vector_norm(r))


def cosine(x: Tensor, ref: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(x.double(), ref.double(), dim=0))


def _map(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple | list):
        return type(obj)(_map(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return obj


def _up(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


@contextlib.contextmanager
def fp32_modules(modules: list[torch.nn.Module]) -> Iterator[int]:
    """Inside the block each of ``modules`` runs in fp32 (autocast off, inputs upcast); its
    floating outputs are cast to the dtypes the unmodified module returns (found by running it
    under the caller's autocast without grad). Yields how many modules were wrapped."""
    for m in modules:
        own = m.forward

        def fwd(*a: Any, __own: Callable[..., Any] = own, **k: Any) -> Any:
            with torch.no_grad():
                probe = __own(*a, **k)
            with torch.autocast("cpu", enabled=False):
                out = __own(*_map(a, _up), **_map(k, _up))
            if isinstance(out, Tensor):
                return out.to(probe.dtype)
            return type(out)(
                o.to(p.dtype) if isinstance(o, Tensor) else o for o, p in zip(out, probe)
            )

        m.forward = fwd  # type: ignore[method-assign]
    try:
        yield len(modules)
    finally:
        for m in modules:
            del m.forward


@contextlib.contextmanager
def timestep_override(unet: torch.nn.Module, how: str) -> Iterator[int]:
    """Replace what Flux's ``forward`` hands ``time_text_embed``: ``exact_t`` / ``exact_g`` /
    ``exact_tg``: the fp32 σ·1000 (guidance·1000) instead of the value after
    ``.to(hidden_states.dtype) * 1000``; ``round_tg``: the bf16-rounded values (as that cast
    under bf16 autocast produces) in an otherwise fp32 forward."""
    seen: dict[str, Tensor] = {}

    def grab(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen["t"], seen["g"] = kwargs["timestep"], kwargs.get("guidance")

    def value(x: Tensor) -> Tensor:
        if how == "round_tg":
            return (x.to(torch.bfloat16) * 1000).float()
        return x.float() * 1000

    def swap(_m: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        a = list(args)
        if how in ("exact_t", "exact_tg", "round_tg"):
            a[0] = value(seen["t"])
        if how in ("exact_g", "exact_tg", "round_tg") and seen["g"] is not None and len(a) == 3:
            a[1] = value(seen["g"])
        return tuple(a)

    h1 = unet.register_forward_pre_hook(grab, with_kwargs=True)
    h2 = unet.time_text_embed.register_forward_pre_hook(swap)
    try:
        yield 1
    finally:
        h1.remove()
        h2.remove()


def select(unet: torch.nn.Module, what: str) -> list[torch.nn.Module]:
    """The modules of one ablation group."""
    out = []
    for name, m in unet.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        kind = type(m).__name__
        if (
            (what == "pos_embed" and name == "pos_embed")
            or (what == "qk_norm" and leaf in QK_NORMS)
            or (what == "attention" and leaf in ("attn", "attn2") and "Attention" in kind)
            or (what == "adaln" and kind in ADALN)
            or (what == "time_text_embed" and name == "time_text_embed")
            or (what == "proj_out" and name == "proj_out")
            or (what == "embedders" and name in ("x_embedder", "context_embedder"))
        ):
            out.append(m)
    return out


ABLATIONS = [
    ("pos_embed", "pos_embed in fp32 (Flux: rotary table; SD3: patch embedding)"),
    ("qk_norm", "q/k RMSNorms in fp32"),
    ("attention", "attention modules (q/k/v/out, norms, rotary, SDPA) in fp32"),
    ("adaln", "AdaLayerNorm modulation in fp32"),
    ("time_text_embed", "time_text_embed in fp32"),
    ("proj_out", "final proj_out in fp32"),
    ("embedders", "x_embedder + context_embedder in fp32"),
    ("exact_t", "exact fp32 timestep into time_text_embed"),
    ("exact_g", "exact fp32 guidance into time_text_embed"),
    ("exact_tg", "exact fp32 timestep and guidance"),
    ("exact_tg+time_text_embed", "exact t, g and time_text_embed in fp32"),
]


@contextlib.contextmanager
def ablation(unet: torch.nn.Module, key: str) -> Iterator[int]:
    """Apply the ablation(s) ``key`` (``+``-joined); yields the number of modules touched."""
    with contextlib.ExitStack() as stack:
        n = 0
        for part in key.split("+"):
            if part in ("exact_t", "exact_g", "exact_tg", "round_tg"):
                if type(unet).__name__ != "FluxTransformer2DModel":  # SD3: no such cast
                    yield 0
                    return
                n += stack.enter_context(timestep_override(unet, part))
            else:
                n += stack.enter_context(fp32_modules(select(unet, part)))
        yield n


def row(
    label: str, pred: Tensor, grad: Tensor, ref: tuple[Tensor, Tensor], **extra: Any
) -> dict[str, Any]:
    return {
        "row": label,
        "pred_rel": rel(pred, ref[0]),
        "grad_rel": rel(grad, ref[1]),
        "grad_cos": cosine(grad, ref[1]),
        **extra,
    }


def study(label: str, model: BenchModel, nb: NoisedBatch, *, full: bool) -> dict[str, Any]:
    """fp32 vs float64, fp16 and bf16 vs fp32, and (``full``) every ablation under bf16."""
    unet, names = model.denoiser, model.selection.names
    t0 = time.perf_counter()
    p32, g32, l32 = forward_and_grad(unet, model.objective, names, nb, "none")
    ref = (p32, g32)
    rows = []
    u64 = copy.deepcopy(unet).double()
    p64, g64, _ = forward_and_grad(u64, model.objective, names, batch_to(nb, torch.float64), "none")
    del u64
    rows.append(
        {
            "row": "fp32 vs float64",
            "pred_rel": rel(p32, p64),
            "grad_rel": rel(g32, g64),
            "grad_cos": cosine(g32, g64),
        }
    )
    low: dict[str, tuple[Tensor, Tensor]] = {}
    for mode in ("fp16", "bf16"):
        p, g, _ = forward_and_grad(unet, model.objective, names, nb, mode)
        low[mode] = (p, g)
        per_item = [rel(p[i], p32[i]) for i in range(p.shape[0])]
        rows.append(row(f"{mode} autocast", p, g, ref, per_item_pred_rel=per_item))
    flux = type(unet).__name__ == "FluxTransformer2DModel"
    if flux:
        with ablation(unet, "round_tg"):
            p, g, _ = forward_and_grad(unet, model.objective, names, nb, "none")
        rows.append(row("fp32, bf16-rounded t and g", p, g, ref, modules=1))
        # the arithmetic's own error: bf16 against fp32 at the timestep and guidance the bf16
        # forward actually sees
        rows.append(row("bf16 vs fp32 at the bf16-rounded t and g", *low["bf16"], (p, g)))
    for key, what in ABLATIONS if full else [a for a in ABLATIONS if a[0] == "exact_tg"]:
        with ablation(unet, key) as n:
            if n == 0:
                continue
            p, g, _ = forward_and_grad(unet, model.objective, names, nb, "bf16")
        rows.append(row(f"bf16, {what}", p, g, ref, modules=n))
    t = nb.timesteps.float()
    sigma = t / 1000.0
    return {
        "model": label,
        "denoiser": type(unet).__name__,
        "config": {
            k: unet.config[k]
            for k in ("num_attention_heads", "attention_head_dim", "num_layers", "axes_dims_rope")
            if k in unet.config
        },
        "lora_params": model.selection.num_params,
        "batch": int(nb.noisy.shape[0]),
        "timesteps": t.tolist(),
        "timestep_as_bf16_forward_sees": (sigma.to(torch.bfloat16) * 1000).float().tolist()
        if flux
        else None,
        "guidance": None if nb.guidance is None else nb.guidance.tolist(),
        "loss_fp32": l32,
        "seconds": time.perf_counter() - t0,
        "rows": rows,
    }


def step_check(seed: int, latent: int) -> list[dict[str, Any]]:
    """The bench's own accuracy measure, in process: one outer step of the ``resalign``
    method (:func:`outer_step`, as ``bench sd --arch flux-toy --inner-steps 2 --configs 2``
    runs it) in fp32, under bf16, and under bf16 with the exact fp32 timestep and guidance
    fed to ``time_text_embed``; mean hypergradient and outer gradient against fp32."""
    out: dict[str, Any] = {}
    rows = []
    for label, combo, key in (
        ("fp32", "fp32", None),
        ("bf16", "bf16", None),
        ("bf16, exact fp32 timestep and guidance", "bf16", "exact_tg"),
    ):
        model = build("flux-toy", seed, latent)  # fresh: the step updates the LoRA in place
        with ablation(model.denoiser, key) if key else contextlib.nullcontext():
            _, hyper, outer = outer_step(
                model,
                Levers.parse(combo),
                latent=latent,
                seed=seed,
                device="cpu",
                inner_steps_cap=2,
                samples_per_step=2,
            )
        if label == "fp32":
            out = {"hyper": hyper, "outer": outer}
        rows.append(
            {
                "row": label,
                "hyper": _compare(out["hyper"], hyper),
                "outer": _compare(out["outer"], outer),
            }
        )
    return rows


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| model | row | prediction rel err | LoRA-grad rel err | grad cosine |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        for x in r["rows"]:
            lines.append(
                f"| {r['model']} | {x['row']} | {x['pred_rel']:.2e} | {x['grad_rel']:.2e} | {x['grad_cos']:.6f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--latent", type=int, default=16, help="latent side (the bench's CPU default)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", dest="json_path", default=None)
    ap.add_argument(
        "--step",
        action="store_true",
        help="also one outer step of the method on flux-toy (J = 2, inner steps capped at 2)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    variants: list[tuple[str, str, dict[str, Any] | None, bool]] = [
        ("flux-toy (2x8)", "flux-toy", None, True),
        (
            "flux 1x16 (same width)",
            "flux-toy",
            {"num_attention_heads": 1, "attention_head_dim": 16, "axes_dims_rope": (4, 6, 6)},
            False,
        ),
        ("flux 2x16", "flux-toy", {"attention_head_dim": 16, "axes_dims_rope": (4, 6, 6)}, False),
        ("flux 2x32", "flux-toy", {"attention_head_dim": 32, "axes_dims_rope": (8, 12, 12)}, False),
        ("sd3-toy (2x8)", "sd3-toy", None, True),
    ]
    results = []
    for label, arch, cfg, full in variants:
        model = build(arch, args.seed, args.latent, cfg)
        nb = harm_batch(model, args.seed, args.latent)
        results.append(study(label, model, nb, full=full))
        print(f"[flux_bf16_isolate] {label}: {results[-1]['seconds']:.1f} s", flush=True)
    print(table(results))
    step = []
    if args.step:
        step = step_check(args.seed, args.latent)
        print("\n| flux-toy outer step | hypergrad rel diff | cosine | outer rel diff | cosine |")
        print("|---|---|---|---|---|")
        for x in step:
            h, o = x["hyper"], x["outer"]
            print(
                f"| {x['row']} | {h['rel_diff']:.2e} | {h['cosine']:.6f} | "
                f"{o['rel_diff']:.2e} | {o['cosine']:.6f} |"
            )
    payload = {
        "command": "OMP_NUM_THREADS=1 nice -n 10 python scripts/flux_bf16_isolate.py "
        f"--seed {args.seed} --latent {args.latent} --threads {args.threads}"
        + (" --step" if args.step else ""),
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "seconds": time.perf_counter() - t0,
        "measure": "||x - x_ref|| / ||x_ref|| in float64; x_ref the fp32 forward (float64 for "
        "the 'fp32 vs float64' row); grad: dL_harm/d(LoRA tensors), L_harm = -MSE",
        "results": results,
        "outer_step": step,
    }
    if args.json_path:
        atomic_write_text(Path(args.json_path), json.dumps(payload, indent=2, default=_json))
    return 0


def _json(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    return list(x) if isinstance(x, tuple) else str(x)


if __name__ == "__main__":
    raise SystemExit(main())
