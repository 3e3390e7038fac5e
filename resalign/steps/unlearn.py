"""The ``unlearn`` node: run an unlearning method on the model node's denoiser (a UNet, or
SD3's transformer), with the model's training objective (DDPM or flow matching).

Reads ``ctx.params`` (``unlearn``, ``trainable``, ``concepts``; datasets through the spec),
encodes every dataset once (VAE latents, text embeddings), builds the registered method and
runs its outer steps with progress, logging each step's numeric statistics through
``ctx.log_metrics`` and checkpointing the method's full state and the step history through
``ctx.save_checkpoint`` every ``checkpoint_every`` steps; a restarted run resumes from the
last checkpoint (``ctx.load_checkpoint``) and continues bitwise as if uninterrupted. A
non-finite loss, gradient or hypergradient (the stats callback) or trainable weight (checked
before every checkpoint and before saving) fails the node at that step.

Outputs: ``trainable.safetensors``, ``lora/`` (diffusers LoRA, for LoRA selections),
``unet/`` (merged UNet, ``save_pretrained``), ``steps.jsonl`` (every step's statistics, with
the sampled configuration names), ``stats.json`` (summary).

Data choices: the harmful set is every concept's ``harmful`` datasets together, the retain
set every ``retain`` dataset; a simulated fine-tuning config without ``data`` draws from
``meta.data``, or, when that is empty, from the retain datasets.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text
from ..evaluation.dynamics import STEPS_FILE  # read back by the report
from .base import Step, StepContext, check_finite_stats, check_finite_weights, register

# Methods whose objective has the resilience term (read unlearn.resilience): the others'
# keys leave that block out.
RESILIENCE_METHODS = frozenset({"resalign"})
# Per-step counts that are also logged as running totals (``<name>_total``).
TOTALS = ("retries", "fallbacks")
# What to change when unlearning diverges (the NonFiniteError hint).
DIVERGED = (
    "lower unlearn.optimizer.lr or set unlearn.optimizer.max_grad_norm; for resalign also "
    "unlearn.resilience.hypergradient (damping < 1, max_norm, fallback: first_order)"
)


@register
class UnlearnStep(Step):
    kind = "unlearn"
    version = "1"
    # The engine may run this step on several torchrun ranks (resalign.engine.launch): the J
    # configs of each outer step are split over them; rank 0 alone writes.
    distributed = True

    @staticmethod
    def key_exclude(params: Mapping[str, Any]) -> tuple[str, ...]:
        """What the result does not depend on, left out of the node key (issue 14): the row's
        name (it names the node), the checkpoint cadence (a resumed run continues bitwise),
        the memory levers that are bitwise-neutral (tests/test_memory_methods.py), and for a
        method without a resilience term its ``resilience`` block and the datasets only that
        block reads (``meta_datasets``)."""
        out = (
            "unlearn.label",
            "unlearn.checkpoint_every",
            "unlearn.memory.free_inner_state",
            "unlearn.memory.offload_idle",
        )
        if params["unlearn"].get("method") not in RESILIENCE_METHODS:
            out += ("unlearn.resilience", "meta_datasets")
        return out

    def run(self, ctx: StepContext) -> None:
        import torch

        from ..algorithms import distributed
        from ..algorithms.callbacks import numeric
        from ..algorithms.methods import UnlearnProblem, build_method
        from ..algorithms.objectives import EncodedPairs
        from ..data.pairs import load_pairs
        from ..errors import UserError
        from ..models.loading import load_model_node
        from ..models.saving import save_lora, save_merged_unet, save_trainable
        from ..models.trainable import apply_trainable
        from ..spec.schema.model import TrainableSpec
        from ..spec.schema.unlearn import UnlearnSpec

        started = time.time()
        un = UnlearnSpec.model_validate(ctx.params["unlearn"])
        trainable = TrainableSpec.model_validate(ctx.params["trainable"])
        concepts = ctx.params["concepts"]
        seed = int(un.seed)  # one node per unlearning seed: the compiler sets it
        bundle = load_model_node(Path(ctx.inputs["model"]), device=ctx.device, dtype="float32")
        channels = int(bundle.vae.config.in_channels)

        cache: dict[str, Any] = {}

        def encode(pairs: Any) -> EncodedPairs:
            return EncodedPairs.encode(bundle, pairs.images, pairs.captions, pairs.labels)

        # what the concepts read, and what only the resilience term reads (its key leaves
        # the latter out for a method without that term, which then never reads it)
        inputs = {**ctx.params["datasets"], **(ctx.params.get("meta_datasets") or {})}

        def dataset(name: str) -> Any:
            if name not in cache:
                cache[name] = load_pairs(name, inputs, ctx.inputs, bundle.resolution, channels)
            return cache[name]

        harmful_names = [n for c in concepts.values() for n in c["harmful"]]
        retain_names = [n for c in concepts.values() for n in c.get("retain", [])]
        harmful = EncodedPairs.concat([encode(dataset(n)) for n in harmful_names])
        retain = (
            EncodedPairs.concat([encode(dataset(n)) for n in retain_names])
            if retain_names
            else None
        )
        meta = un.resilience.meta
        default_pool = list(meta.data) or list(retain_names)
        pool_names = set(default_pool) | {c.data for c in meta.configs.values() if c.data}
        if meta.distribution is not None:
            pool_names |= set(meta.distribution.data)
        pools, priors = {}, {}
        if un.method == "resalign":
            for n in sorted(pool_names):
                ps = dataset(n)
                pools[n] = encode(ps)
                if getattr(ps, "prior", None) is not None:
                    priors[n] = encode(ps.prior)
        uncond = bundle.encode_condition([""])  # with SDXL's added conditioning

        selection = apply_trainable(bundle.unet, trainable, torch.Generator().manual_seed(seed))
        ctx.log_params({"trainable": selection.summary()})
        problem = UnlearnProblem(
            bundle.unet,
            bundle.objective,
            selection,
            harmful=harmful,
            retain=retain,
            pools=pools,
            priors=priors,
            default_pool=default_pool,
            uncond=uncond,
            # what unlearning never runs once the data are encoded: offloaded with
            # unlearn.memory.offload_idle
            idle=[m for m in (bundle.vae, *bundle.text_encoders) if m is not None],
        )
        history: list[dict[str, Any]] = []
        # Under torchrun every rank holds the same statistics and state: rank 0 alone
        # reports and checkpoints (the other ranks' contexts record nothing).
        main = distributed.current().is_main
        last_ckpt: list[int | None] = [None]

        # running totals of the safeguards' counts (the per-step values say only what the
        # last step did); recomputed from the history on resume
        totals = dict.fromkeys(TOTALS, 0.0)

        def on_step(stats: dict[str, Any]) -> None:
            k = int(stats["step"])
            metrics = numeric(stats)
            for name in TOTALS:
                if name in metrics:
                    totals[name] += metrics[name]
                    metrics[f"{name}_total"] = totals[name]
            if main:
                ctx.log_metrics(metrics, step=k)
            history.append(stats)
            check_finite_stats(ctx, stats, k, setting=DIVERGED, last_checkpoint=last_ckpt[0])

        def check_weights(step: int) -> None:
            named = dict(bundle.unet.named_parameters())
            check_finite_weights(
                ctx,
                ((n, named.get(n)) for n in selection.names),
                step,
                what="trainable",
                setting=DIVERGED,
                last_checkpoint=last_ckpt[0],
            )

        method = build_method(un.method, problem, un, seed=seed, callback=on_step)
        ck = ctx.load_checkpoint(map_location=ctx.device)
        if ck is not None:
            saved, last_ckpt[0] = ck
            method.load_state_dict(saved["method"])
            history.extend(json.loads(x) for x in saved["history"][: method.step_count])
            for name in TOTALS:
                totals[name] = sum(float(h.get(name, 0.0)) for h in history)
        every = int(ctx.checkpoint_every or un.checkpoint_every)

        with ctx.progress(total=un.steps, description=f"unlearn {un.method}") as bar:
            if method.step_count:
                bar.advance(method.step_count)
            while method.step_count < un.steps:
                method.step()
                bar.advance(1)
                # every step: the first non-finite weight names its step (the loss only
                # shows it a step later)
                check_weights(method.step_count)
                if method.step_count % every == 0 and method.step_count < un.steps:
                    # history as JSON lines: torch.load(weights_only=True) reads strings
                    ctx.save_checkpoint(
                        {
                            "method": method.state_dict(),
                            "history": [json.dumps(h) for h in history],
                        },
                        method.step_count,
                    )
                    last_ckpt[0] = method.step_count
        check_weights(method.step_count)
        if not history and un.steps:
            raise UserError("unlearning produced no steps")
        if not main:
            return  # every rank holds the same weights; rank 0 writes them

        out = Path(ctx.out)
        save_trainable(bundle.unet, out / "trainable.safetensors", selection.names)
        if selection.kind == "lora":
            save_lora(bundle.unet, out / "lora")
        save_merged_unet(bundle.unet, out / "unet")
        atomic_write_text(out / STEPS_FILE, "".join(json.dumps(h) + "\n" for h in history))
        summary = {
            "method": un.method,
            "seed": seed,
            "steps": method.step_count,
            "trainable": selection.as_dict(),
            "harmful_pairs": len(harmful),
            "retain_pairs": 0 if retain is None else len(retain),
            "pools": {n: len(p) for n, p in pools.items()},
            "final": {k: v for k, v in history[-1].items() if "." not in k} if history else {},
            **{f"{name}_total": totals[name] for name in TOTALS if any(name in h for h in history)},
            "seconds": time.time() - started,
            # not part of the key: the result is the same (to float rounding) for any count
            "processes": distributed.current().world_size,
        }
        atomic_write_text(out / "stats.json", json.dumps(summary, indent=2))
