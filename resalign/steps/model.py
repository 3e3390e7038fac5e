"""The ``model`` step: the model every row starts from.

Params (graph): ``model`` (the ``model`` section minus device/allow_download, plus a
fingerprint of a local checkpoint) and, for ``family: tiny`` with ``pretrain``,
``pretrain_data`` (the pretraining dataset's spec); the oracle control's node
(``model/oracle``, ``controls.oracle``) also ``exclude_labels``: the pretraining items with
these labels are left out, everything else (architecture, tokenizer vocabulary, seeds,
steps) is the original's, so the oracle is the original model as it would be had it never
seen the concepts. Outputs:

- tiny: ``pipeline/`` (a diffusers ``StableDiffusionPipeline`` folder: built, then pretrained
  on ``pretrain.dataset`` when given), ``model.json``, ``stats.json``; pretraining checkpoints
  in ``ctx.state`` so an interrupted run resumes exactly;
- sd / sdxl / sd3 / flux: ``source.json`` (the resolved local folder or file; weights are not copied) and
  ``model.json``. The checkpoint is loaded once here, so a broken one fails at this node.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .base import Step, StepContext, check_finite_stats, check_finite_weights, register

# What to change when pretraining diverges (the NonFiniteError hint).
DIVERGED = "lower model.tiny.pretrain.lr (or its batch_size)"


def _model_spec(params: Any) -> Any:
    from ..spec.schema.model import ModelSpec

    data = dict(params["model"])
    data.pop("fingerprint", None)
    return ModelSpec.model_validate(data)


def _sampling(model: Any) -> dict[str, Any] | None:
    ts = model.timestep_sampling
    return None if ts is None else ts.model_dump(mode="json")


def _objective_info(model: Any, bundle: Any) -> dict[str, Any]:
    """``model.json``'s record of a flow-matching model's objective (absent for DDPM
    models, whose schedule is ``noise_schedule``)."""
    if model.timestep_sampling is None:
        return {}
    return {"timestep_sampling": _sampling(model), "objective": bundle.objective.describe()}


@register
class ModelStep(Step):
    kind = "model"
    version = "2"
    # whether a hub id may be downloaded decides whether the model loads, never what it is;
    # which parameters unlearning trains is the unlearn nodes' input (their ``trainable``
    # param), never read here: in the model's key it re-ran pretraining (172 s on the demo)
    # and every original-row node for a LoRA-vs-full variant
    key_exclude = ("model.allow_download", "model.trainable")

    def run(self, ctx: StepContext) -> None:
        model = _model_spec(ctx.params)
        if model.family == "tiny":
            self._tiny(ctx, model)
        else:
            self._pretrained(ctx, model)

    def _pretrained(self, ctx: StepContext, model: Any) -> None:
        from ..models.loading import (
            SOURCE_JSON,
            _write_json,
            bundle_from_pipeline,
            load_pipeline,
            resolve_pretrained,
            write_model_json,
        )

        source = resolve_pretrained(
            model.pretrained,
            None,  # the resolve pass made local paths absolute
            revision=model.revision,
            variant=model.variant,
            allow_download=model.allow_download,
        )
        pipe = load_pipeline(source, model.family, dtype=model.dtype)
        bundle = bundle_from_pipeline(
            pipe,
            model.family,
            model.noise_schedule.model_dump(),
            timestep_sampling=_sampling(model),
            resolution=model.resolution,
            guidance=model.training_guidance,
        )
        _write_json(Path(ctx.out) / SOURCE_JSON, source)
        write_model_json(
            ctx.out,
            {
                "family": model.family,
                "layout": bundle.layout,
                "resolution": bundle.resolution,
                "noise_schedule": model.noise_schedule.model_dump(mode="json"),
                **_objective_info(model, bundle),
                **({"training_guidance": bundle.guidance} if bundle.guidance is not None else {}),
                "source": source,
                "unet_parameters": sum(p.numel() for p in bundle.unet.parameters()),
            },
        )

    def _tiny(self, ctx: StepContext, model: Any) -> None:

        from ..data.pairs import label_counts, load_pairs, without_labels
        from ..errors import UserError
        from ..models.loading import (
            PIPELINE_DIR,
            _write_json,
            bundle_from_pipeline,
            write_model_json,
        )
        from ..models.pretrain import pretrain_unet
        from ..models.tiny import build_tiny, caption_token_count, caption_words

        tiny = model.tiny
        pre = tiny.pretrain
        pairs = None
        if pre is not None:
            pairs = load_pairs(
                pre.dataset,
                ctx.params["pretrain_data"],
                ctx.inputs,
                tiny.sample_size,
                tiny.in_channels,
            )
        # The words of the pretraining captions become single tokens (as in a tokenizer
        # trained on the corpus), so the random text encoder tells the captions apart.
        words = caption_words(pairs.captions) if pairs is not None else ()
        excluded = ctx.params.get("exclude_labels")
        if excluded and pairs is not None:
            # the oracle: the vocabulary above is the full data's (the concept's word is a
            # token, as in a pretrained CLIP), its images and captions are never trained on
            pairs = without_labels(pairs, excluded, pre.dataset)
        pipe = build_tiny(tiny, model.noise_schedule, pre.seed if pre else 0, words)
        bundle = bundle_from_pipeline(
            pipe,
            "tiny",
            model.noise_schedule.model_dump(),
            device=ctx.device,
            timestep_sampling=_sampling(model),
        )
        stats: dict[str, Any] = {
            "unet_parameters": sum(p.numel() for p in bundle.unet.parameters())
        }
        if pre is not None and pairs is not None:
            longest = max(set(pairs.captions), key=lambda c: caption_token_count(pipe.tokenizer, c))
            need = caption_token_count(pipe.tokenizer, longest)
            if need > tiny.max_length:
                raise UserError(
                    f"caption {longest!r} takes {need} tokens but model.tiny.max_length is "
                    f"{tiny.max_length}: the end of the caption would be cut off",
                    where="model.tiny.max_length",
                    hint=f"set model.tiny.max_length to at least {need}",
                )
            every = ctx.checkpoint_every or 200
            # the step of the checkpoint resumed from, then of the last one written (the
            # NonFiniteError names it)
            last_ok: list[int | None] = [None]
            resumed_at: list[int | None] = [None]

            def check_weights(step: int) -> None:
                named = list(bundle.unet.named_parameters())
                if pre.train_text_encoder:
                    for i, enc in enumerate(bundle.text_encoders):
                        prefix = "text_encoder" if i == 0 else f"text_encoder_{i + 1}"
                        named += [(f"{prefix}.{n}", t) for n, t in enc.named_parameters()]
                check_finite_weights(
                    ctx, named, step, what="pretrained", setting=DIVERGED,
                    last_checkpoint=last_ok[0],
                )  # fmt: skip

            log_every = 10
            started = time.perf_counter()
            window: list[float] = []
            with ctx.progress(pre.steps, "pretrain") as bar:

                class Checkpoints:
                    """``ctx``'s checkpoints, noting which step they hold."""

                    def load_checkpoint(self) -> tuple[dict[str, Any], int] | None:
                        loaded = ctx.load_checkpoint()
                        if loaded is not None:
                            last_ok[0] = resumed_at[0] = loaded[1]
                            bar.advance(loaded[1])
                        return loaded

                    def save_checkpoint(self, state: Any, step: int) -> None:
                        ctx.save_checkpoint(state, step)
                        last_ok[0] = step

                def on_step(step: int, loss: float) -> None:
                    check_finite_stats(
                        ctx, {"pretrain loss": loss}, step, setting=DIVERGED,
                        last_checkpoint=last_ok[0], terms=["pretrain loss"],
                    )  # fmt: skip
                    # every step, so the first non-finite weight names its step (and
                    # pretrain_unet's resume checkpoint, saved right after, is finite)
                    check_weights(step)
                    window.append(loss)
                    if step % log_every == 0 or step == pre.steps:
                        ctx.log_metrics({"pretrain/loss": sum(window) / len(window)}, step=step)
                        window.clear()
                    bar.advance(1)

                result = pretrain_unet(
                    bundle,
                    pairs,
                    steps=pre.steps,
                    lr=pre.lr,
                    batch_size=pre.batch_size,
                    seed=pre.seed,
                    train_text_encoder=pre.train_text_encoder,
                    checkpoint_every=every,
                    on_step=on_step,
                    checkpoints=Checkpoints(),
                )
                resumed = resumed_at[0]
            check_weights(pre.steps)
            stats.update(
                {
                    "pretrain_steps": pre.steps,
                    "pretrain_items": len(pairs),
                    "pretrain_items_by_label": label_counts(pairs),
                    "excluded_labels": list(excluded or []),
                    "pretrain_final_loss": result["final_loss"],
                    "pretrain_seconds": time.perf_counter() - started,
                    "resumed_from": resumed,
                }
            )
        bundle.unet.to("cpu")  # the pipeline's own denoiser module: trained in place
        pipe.save_pretrained(str(Path(ctx.out) / PIPELINE_DIR), safe_serialization=True)
        write_model_json(
            ctx.out,
            {
                "family": "tiny",
                "layout": bundle.layout,
                "resolution": bundle.resolution,
                "noise_schedule": model.noise_schedule.model_dump(mode="json"),
                **_objective_info(model, bundle),
                "source": {"kind": "folder", "path": PIPELINE_DIR},
                "unet_parameters": stats["unet_parameters"],
            },
        )
        _write_json(Path(ctx.out) / "stats.json", stats)
        (Path(ctx.out) / "README.txt").write_text(
            "A tiny Stable-Diffusion-shaped model built by resalign. Load it with\n"
            f"  diffusers.{type(pipe).__name__}.from_pretrained('pipeline')\n"
            + json.dumps(stats, indent=2)
            + "\n",
            encoding="utf-8",
        )
