"""The ``attack`` step: one segment of a downstream fine-tuning attack (threat × seed) on one
model row, from the start (or the previous evaluation step) to one evaluation step.

Params (graph): ``threat`` (the threat block minus seeds, ``eval_at`` and ``search``),
``seed``, ``stop`` (the evaluation step this segment ends at), ``datasets`` (specs of the data
it reads). Inputs: ``model``, ``unlearn`` (absent for the original row), harvests, and
``resume``: the segment ending at the previous evaluation step, an ordering dependency that
is not in the key (:data:`resalign.graph.keys.ORDER_ROLES`).
Outputs: ``unet/`` (the merged UNet at ``stop``, ``save_pretrained`` layout), ``stats.json``
(what ran: precision, trainable size, poison positions, loss), ``metrics.jsonl`` (the loss from
step 1), and, when the attack goes on past ``stop``, ``resume/checkpoint.pt``: the full state
(trainable tensors, optimizer, schedule, generator, sampler position) at ``stop``.

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
        data = load_pairs(threat["data"], ctx.spec, ctx.inputs, bundle.resolution, channels)
        poisoned: list[int] = []
        if threat.get("poison"):
            harm = load_pairs(
                threat["poison"]["data"], ctx.spec, ctx.inputs, bundle.resolution, channels
            )
            # the mix dataset's implementation, the attack seed as the mix seed
            data, poisoned = mix_pairs(data, harm, float(threat["poison"]["ratio"]), seed)
        prior = None
        if threat.get("prior"):
            prior = load_pairs(threat["prior"], ctx.spec, ctx.inputs, bundle.resolution, channels)
        elif getattr(data, "prior", None) is not None:
            prior = data.prior

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
            check_finite_weights(
                ctx,
                bundle.unet.named_parameters(),
                step,
                what="UNet",
                setting=DIVERGED,
                last_checkpoint=last_ok[0],
            )

        with ctx.progress(stop, f"attack {ctx.node.name}") as bar:

            def callback(step: int, m: Any) -> None:
                ctx.log_metrics({"attack/loss": m["loss"], "attack/lr": m["lr"]}, step=step)
                check_finite_stats(
                    ctx, m, step, setting=DIVERGED, last_checkpoint=last_ok[0], terms=["loss"]
                )
                if step % config.checkpoint_every == 0 or step == stop:
                    check_weights(step)
                bar.advance(1)

            result = run_attack(
                bundle,
                data,
                config,
                prior=prior,
                callback=callback,
                device=ctx.device,
                checkpoints=Checkpoints(),
                stop_at=stop,
            )
        check_weights(stop)
        save_merged_unet(bundle.unet, Path(ctx.out) / "unet")
        if stop < config.steps:
            ctx.export_checkpoint()  # the state the next segment continues from
        stats = {
            **result.as_dict(),
            "config": {k: getattr(config, k) for k in config.__dataclass_fields__},
            "data_items": len(data.captions),
            "poisoned_positions": poisoned,
        }
        ctx.log_params({"attack.precision_ran": result.precision})
        (Path(ctx.out) / "stats.json").write_text(json.dumps(stats, indent=2, default=list))
