"""The ``attack`` step: one downstream fine-tuning attack (threat × seed) on one model row.

Params (graph): ``threat`` (the threat block minus seeds), ``seed``, ``datasets`` (specs of the
data it reads). Inputs: ``model``, ``unlearn`` (absent for the original row), harvests.
Outputs: ``checkpoints/step<n>/unet/`` (merged UNet, ``save_pretrained`` layout) for every
``eval_at`` step, ``stats.json`` (what ran: precision, trainable size, poison positions, loss).
Checkpoints are first written under ``ctx.state`` so a resumed attack still has the
evaluation checkpoints it wrote before the crash.
"""

from __future__ import annotations

import json
import shutil
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
    version = "1"
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

        ckpt_root = Path(ctx.state) / "checkpoints"
        # the step of the checkpoint resumed from, then of the last one written (the loop
        # writes it right after the callback of a checkpoint step, whose weights are checked)
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

        def on_eval(step: int, unet: Any) -> None:
            check_weights(step)
            save_merged_unet(unet, ckpt_root / f"step{step}" / "unet")

        with ctx.progress(config.steps, f"attack {ctx.node.name}") as bar:

            def callback(step: int, m: Any) -> None:
                ctx.log_metrics({"attack/loss": m["loss"], "attack/lr": m["lr"]}, step=step)
                check_finite_stats(
                    ctx, m, step, setting=DIVERGED, last_checkpoint=last_ok[0], terms=["loss"]
                )
                if step % config.checkpoint_every == 0 or step == config.steps:
                    check_weights(step)
                bar.advance(1)

            result = run_attack(
                bundle,
                data,
                config,
                prior=prior,
                eval_at=threat.get("eval_at") or [config.steps],
                on_eval=on_eval,
                callback=callback,
                device=ctx.device,
                checkpoints=Checkpoints(),
            )
        out_ckpt = Path(ctx.out) / "checkpoints"
        for step in threat.get("eval_at") or [config.steps]:
            src = ckpt_root / f"step{step}"
            if not src.is_dir():
                raise RuntimeError(f"attack checkpoint for step {step} is missing in {src}")
            shutil.copytree(src, out_ckpt / f"step{step}", dirs_exist_ok=True)
        stats = {
            **result.as_dict(),
            "config": {k: getattr(config, k) for k in config.__dataclass_fields__},
            "data_items": len(data.captions),
            "poisoned_positions": poisoned,
        }
        ctx.log_params({"attack.precision_ran": result.precision})
        (Path(ctx.out) / "stats.json").write_text(json.dumps(stats, indent=2, default=list))
