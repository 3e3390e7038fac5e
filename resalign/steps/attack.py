"""The ``attack`` step: one segment of a downstream fine-tuning attack (threat × seed) on one
model row, from the start (or the previous evaluation step) to one evaluation step.

Params (graph): ``threat`` (the threat block minus seeds, ``eval_at`` and ``search``),
``seed``, ``stop`` (the evaluation step this segment ends at), ``datasets`` (specs of the data
it reads). Inputs: ``model``, ``unlearn`` (absent for the original row), harvests, and
``resume``: the segment ending at the previous evaluation step, an ordering dependency that
is not in the key (:data:`resalign.graph.keys.ORDER_ROLES`).
Outputs: ``unet/`` (the merged UNet at ``stop``, ``save_pretrained`` layout; an
``embedding`` attack, which leaves the UNet as the row has it, writes ``embedding/`` instead:
``learned_embeds.safetensors`` (SDXL also ``learned_embeds_2.safetensors``) and
``embedding.json``, see :mod:`resalign.models.embeddings`), ``stats.json``
(what ran: precision, trainable size, data size and poison positions (a staged threat: one of
each per stage), loss), ``metrics.jsonl`` (the loss from step 1), and, when the attack goes
on past ``stop``, ``resume/checkpoint.pt``: the full state (trainable tensors, optimizer,
schedule, generator, sampler positions) at ``stop``.

A staged threat (``stages``) loads each stage's data (and mixes its poison) and hands the
list to :func:`resalign.algorithms.attack.run_attack`, which switches data at the stage
boundaries inside its one loop; segments may end in any stage.

An ``algorithm: perturb`` threat (the neighbourhood probe) is no fine-tuning: one node per
radius (params ``radius`` instead of ``stop``; :meth:`AttackStep.run_perturb`), the row's UNet
moved by that radius and saved as ``unet/``; no ``resume``, no checkpoints.

Why segments (issue 14): the key of the segment to step ``s`` is the attack's settings and
``s``, not the list of evaluation steps, so adding an evaluation step adds one segment (from
the nearest earlier one, whose saved state it continues bitwise) and one evaluation, and
re-runs nothing else. Segments continued from a saved state equal the uninterrupted attack
bitwise (tests/test_attack_segments.py). The price is disk: each segment before the last keeps
its full training state (for a full fine-tune, the UNet and two Adam moments).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .base import Step, StepContext, check_finite_stats, check_finite_weights, register

# What to change when an attack diverges (the NonFiniteError hint).
DIVERGED = (
    "lower threats.<threat>.lr, set threats.<threat>.max_grad_norm, or use precision fp32 "
    "(fp16 overflows first)"
)


def row_unet(inputs: Any) -> tuple[Path | None, Path | None]:
    """(merged UNet folder, trainable tensors file) of the row's unlearn output, if any."""
    un = inputs.get("unlearn")
    if un is None:
        return None, None
    un = Path(un)
    if (un / "unet" / "config.json").is_file():
        return un / "unet", None
    return None, un / "trainable.safetensors"


@register
class AttackStep(Step):
    kind = "attack"
    version = "2"  # 2: one node per evaluation step (segments)
    # Left out of the key (issue 14): the checkpoint cadence (a resumed attack continues
    # bitwise, tests/test_attack.py).
    key_exclude = ("threat.checkpoint_every",)

    def run(self, ctx: StepContext) -> None:
        if ctx.params["threat"].get("algorithm") == "perturb":
            self.run_perturb(ctx)
            return
        from ..algorithms.attack import AttackConfig, run_attack
        from ..data.pairs import load_pairs, mix_pairs
        from ..models.loading import load_row
        from ..models.saving import save_merged_unet

        threat = dict(ctx.params["threat"])
        seed = int(ctx.params["seed"])
        config = AttackConfig.from_threat(threat, seed, ctx.checkpoint_every)
        unet_dir, trainable = row_unet(ctx.inputs)
        bundle = load_row(
            Path(ctx.inputs["model"]), trainable, unet_dir, device=ctx.device, dtype="float32"
        )
        channels = int(bundle.vae.config.in_channels)

        def stage_data(source: dict[str, Any]) -> tuple[Any, list[int]]:
            """``source['data']``, with its ``poison`` mixed in (the mix dataset's
            implementation, the attack seed as the mix seed); the poisoned positions."""
            pairs = load_pairs(
                source["data"], ctx.params["datasets"], ctx.inputs, bundle.resolution, channels
            )
            if not source.get("poison"):
                return pairs, []
            poison = source["poison"]
            harm = load_pairs(
                poison["data"], ctx.params["datasets"], ctx.inputs, bundle.resolution, channels
            )
            return mix_pairs(pairs, harm, float(poison["ratio"]), seed)

        # a plain threat: one data set; a staged one: one per stage, in order
        loaded = [stage_data(st) for st in threat.get("stages") or [threat]]
        stages = [pairs for pairs, _ in loaded]
        prior = None
        if threat.get("prior"):
            prior = load_pairs(
                threat["prior"], ctx.params["datasets"], ctx.inputs, bundle.resolution, channels
            )
        else:
            prior = next((d.prior for d in stages if getattr(d, "prior", None) is not None), None)

        stop = int(ctx.params["stop"])
        if "resume" in ctx.inputs:
            ctx.adopt_checkpoint(Path(ctx.inputs["resume"]))
        # the step of the checkpoint resumed from, then of the last one written (the loop
        # writes one right after the callback of a checkpoint step, whose weights are checked)
        last_ok: list[int | None] = [None]

        class Checkpoints:
            """``ctx``'s checkpoints, noting which step they hold."""

            def load_checkpoint(self) -> tuple[dict[str, Any], int] | None:
                loaded = ctx.load_checkpoint()
                last_ok[0] = loaded[1] if loaded is not None else None
                return loaded

            def save_checkpoint(self, state: Any, step: int) -> None:
                ctx.save_checkpoint(state, step)
                last_ok[0] = step

        def check_weights(step: int) -> None:
            if config.algorithm == "embedding":  # the trained rows live in the text encoders
                from ..models.embeddings import text_encoders

                named: Any = [
                    (f"{name}.{n}", p)
                    for name, _, enc in text_encoders(bundle)
                    for n, p in enc.get_input_embeddings().named_parameters()
                ]
            else:
                named = bundle.unet.named_parameters()
            check_finite_weights(
                ctx,
                named,
                step,
                what="token embedding" if config.algorithm == "embedding" else "UNet",
                setting=DIVERGED,
                last_checkpoint=last_ok[0],
            )

        with ctx.progress(stop, f"attack {ctx.node.name}") as bar:

            def callback(step: int, m: Any) -> None:
                ctx.log_metrics({"attack/loss": m["loss"], "attack/lr": m["lr"]}, step=step)
                check_finite_stats(
                    ctx, m, step, setting=DIVERGED, last_checkpoint=last_ok[0], terms=["loss"]
                )
                # every step: the first non-finite weight names its step, before a later
                # loss turns NaN (an inf lr made them inf at step 1, the loss NaN at 2)
                check_weights(step)
                bar.advance(1)

            result = run_attack(
                bundle,
                stages[0] if len(stages) == 1 else stages,
                config,
                prior=prior,
                callback=callback,
                device=ctx.device,
                checkpoints=Checkpoints(),
                stop_at=stop,
            )
        check_weights(stop)
        if result.embedding is not None:
            from ..models.embeddings import EMBEDDING_DIR

            # the UNet is the row's, unchanged: evaluate reads it from there (row_unet)
            result.embedding.save(Path(ctx.out) / EMBEDDING_DIR)
        else:
            save_merged_unet(bundle.unet, Path(ctx.out) / "unet")
        if stop < config.steps:
            ctx.export_checkpoint()  # the state the next segment continues from
        stats = {
            **result.as_dict(),
            "config": {k: getattr(config, k) for k in config.__dataclass_fields__},
            # a staged attack: one entry per stage
            "data_items": [len(d.captions) for d in stages]
            if len(stages) > 1
            else len(stages[0].captions),
            "poisoned_positions": [p for _, p in loaded] if len(stages) > 1 else loaded[0][1],
        }
        ctx.log_params({"attack.precision_ran": result.precision})
        (Path(ctx.out) / "stats.json").write_text(json.dumps(stats, indent=2, default=list))

    def run_perturb(self, ctx: StepContext) -> None:
        """One radius of an ``algorithm: perturb`` threat (params ``threat``: algorithm,
        ``perturb`` without ``radii``, ``data``; ``radius``; ``seed``; ``datasets``): the row's
        UNet moved by ``radius`` (:mod:`resalign.algorithms.perturb`), saved as ``unet/``
        like an attack segment's, with ``stats.json`` (the norms, the move's length). No
        training, no checkpoints, no resume: each radius is independent."""
        from ..algorithms.perturb import PerturbConfig, run_perturb
        from ..data.pairs import load_pairs
        from ..models.loading import load_row
        from ..models.saving import save_merged_unet

        threat = dict(ctx.params["threat"])
        config = PerturbConfig.from_threat(
            threat, float(ctx.params["radius"]), int(ctx.params["seed"])
        )
        unet_dir, trainable = row_unet(ctx.inputs)
        bundle = load_row(
            Path(ctx.inputs["model"]), trainable, unet_dir, device=ctx.device, dtype="float32"
        )
        data = None
        if config.direction == "gradient":
            channels = int(bundle.vae.config.in_channels)
            data = load_pairs(
                threat["data"], ctx.params["datasets"], ctx.inputs, bundle.resolution, channels
            )
        with ctx.progress(1, f"perturb {ctx.node.name}") as bar:
            result = run_perturb(
                bundle, config, data=data, device=ctx.device, progress=lambda: bar.advance(1)
            )
        check_finite_weights(
            ctx,
            bundle.unet.named_parameters(),
            1,
            what="UNet",
            setting="lower threats.<threat>.perturb.radii",
            last_checkpoint=None,
        )
        ctx.log_metrics(
            {"perturb/distance": result.distance, "perturb/weight_norm": result.weight_norm},
            step=1,
        )
        save_merged_unet(bundle.unet, Path(ctx.out) / "unet")
        stats = {**result.as_dict(), "config": {k: getattr(config, k) for k in
                 config.__dataclass_fields__}}  # fmt: skip
        if data is not None:
            stats["data_items"] = len(data.captions)
        (Path(ctx.out) / "stats.json").write_text(json.dumps(stats, indent=2, default=list))
