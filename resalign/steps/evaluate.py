"""The ``evaluate`` step: generate with one model (row, attack checkpoint) and score it.

Params (graph): ``evaluate`` (the section), ``step`` (0 = before any attack), ``datasets``
(prompt/reference dataset specs), ``concepts``. Inputs: ``model``, ``unlearn``?, ``attack``?.
An ``embedding`` attack's result (``embedding/``, no ``unet/``) is evaluated on the row's
UNet with the learned token(s) added to the text encoder(s); each prompt is generated with its
``replaces`` word replaced by the token(s), while the metrics see the original prompt (which
names the concept, e.g. the digit word ``concept_rate`` reads); ``images/g<k>/index.jsonl``
records both, ``generation.json`` the embedding.
Outputs: ``metrics.json`` (``{name: {"value", "definition", "version", "params", "role",
"better", "n", ...}}``), ``generation.json``, ``images/g<k>/`` (one folder per distinct
(prompts, generation settings) group, shared by the metrics that use it) and ``grid.png`` (the
first group's sample grid). Every value is also logged as a metric with its definition id and
version as params.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..errors import UserError
from .base import NonFiniteError, Step, StepContext, first_non_finite, register


def metric_context(params: Any) -> dict[str, Any]:
    """What concept-aware metrics need, from the node's params: the concept digit (an int,
    or a list for a category of digits) and the demo's caption template (``caption``: the
    compiler takes it from the concept's digits dataset, graph/compile.py concept_caption)."""
    ctx: dict[str, Any] = {}
    for c in (params.get("concepts") or {}).values():
        if c.get("label") is not None:
            label = c["label"]
            ctx["concept_label"] = (
                [int(x) for x in label] if isinstance(label, list) else int(label)
            )
            break
    if params.get("caption") is not None:
        ctx["caption_template"] = params["caption"]
    if params.get("caption_names"):  # JSON object keys are strings
        ctx["caption_names"] = {int(k): str(v) for k, v in params["caption_names"].items()}
    return ctx


@register
class EvaluateStep(Step):
    kind = "evaluate"
    version = "1"

    def run(self, ctx: StepContext) -> None:
        from ..data.prompts import load_prompts
        from ..evaluation.generate import GenerationConfig, generate_images
        from ..evaluation.metrics import EvalImage, get_metric
        from ..models.loading import load_row
        from .attack import row_unet

        ev = dict(ctx.params["evaluate"])
        step = int(ctx.params.get("step", 0))
        out = Path(ctx.out)
        embedding = emb_dir = None  # an embedding attack's learned token(s), their folder
        if "attack" in ctx.inputs:
            from ..models.embeddings import LearnedEmbedding, find_embedding

            emb_dir = find_embedding(Path(ctx.inputs["attack"]))
            if emb_dir is not None:
                # the row's UNet (the attack left it as it was) and the learned token(s)
                embedding = LearnedEmbedding.load(emb_dir)
                unet_dir, trainable = row_unet(ctx.inputs)
            else:
                unet_dir = Path(ctx.inputs["attack"]) / "unet"  # the segment to ``step``
                trainable = None
        else:
            unet_dir, trainable = row_unet(ctx.inputs)
        bundle = load_row(Path(ctx.inputs["model"]), trainable, unet_dir, device=ctx.device)
        if embedding is not None:
            embedding.apply(bundle)  # prompts say its token where they said its word (below)
        # A diverged model is never scored (its metrics could look perfect: a NaN UNet
        # generates blank images no classifier recognises the concept in).
        bad = first_non_finite(
            [
                *bundle.unet.named_parameters(),
                *((f"embedding.{n}", r) for n, r in (embedding.rows if embedding else {}).items()),
            ]
        )
        if bad is not None:
            source = unet_dir or trainable or ctx.inputs["model"]
            if bad.startswith("embedding."):
                source = emb_dir
            raise NonFiniteError(
                f"the model to evaluate has non-finite weights ({bad!r}, loaded from "
                f"{source}); it is not scored",
                hint="re-run the upstream node with settings that do not diverge (a result "
                "saved before non-finite checks existed, or altered since: "
                "`resalign verify` finds the latter)",
            )
        mctx = metric_context(ctx.params)

        groups: dict[str, dict[str, Any]] = {}
        plan = []
        for spec in ev.get("metrics", []):
            metric = get_metric(spec["kind"])(spec, mctx)
            metric.check()
            gen = GenerationConfig.from_spec(spec.get("generation") or ev["generation"])
            prompts = metric.prompts() or load_prompts(spec["prompts"], ctx.params["datasets"])
            key = json.dumps([gen.as_dict(), prompts], sort_keys=True)
            if key not in groups:
                groups[key] = {"id": f"g{len(groups)}", "gen": gen, "prompts": prompts}
            plan.append((metric, spec, groups[key]))
        if embedding is not None:
            from ..models.embeddings import check_fit

            check_fit(bundle, [embedding.rewrite(p) for g in groups.values()
                               for p in g["prompts"]], what="the evaluation prompt")  # fmt: skip
        if embedding is not None and not any(
            embedding.rewrite(p) != p for g in groups.values() for p in g["prompts"]
        ):
            raise UserError(
                f"the embedding attack's word {embedding.replaces!r} (embedding.replaces) is "
                "in no evaluation prompt, so the learned token would never be used and the "
                "attack would look harmless",
                hint="evaluate with prompts that name the concept by that word, or set "
                "embedding.replaces to the word the prompts use",
            )

        generated: dict[str, list[Any]] = {}
        for g in groups.values():
            n = len(g["prompts"][: g["gen"].limit] if g["gen"].limit else g["prompts"])
            total = n * g["gen"].images_per_prompt
            with ctx.progress(total, f"generate {ctx.node.name} {g['id']}") as bar:
                pipe = bundle.pipeline(g["gen"].scheduler)
                imgs = generate_images(
                    pipe,
                    g["prompts"],
                    g["gen"],
                    out / "images" / g["id"],
                    device=ctx.device,
                    progress=bar,
                    rewrite=embedding.rewrite if embedding is not None else None,
                )
            generated[g["id"]] = [
                EvalImage(i.path, i.prompt, i.prompt_index, i.image_index) for i in imgs
            ]
        if groups:
            shutil.copyfile(out / "images" / "g0" / "grid.png", out / "grid.png")

        results: dict[str, Any] = {}
        for metric, spec, g in plan:
            if spec["kind"] == "fid":
                metric.context["reference_images"] = _reference_images(
                    spec["reference"], ctx.params["datasets"], ctx.inputs, bundle
                )
            for v in metric.compute(generated[g["id"]]):
                name = v.name if v.name not in results else f"{v.name}@{spec.get('prompts')}"
                results[name] = {**v.as_dict(), "images": f"images/{g['id']}"}
                ctx.log_metrics({name: v.value}, step=step)
                ctx.log_params(
                    {f"metric.{name}.definition": v.definition, f"metric.{name}.version": v.version}
                )
        (out / "metrics.json").write_text(json.dumps(results, indent=2, default=str))
        (out / "generation.json").write_text(
            json.dumps(
                {
                    g["id"]: {
                        **g["gen"].as_dict(),
                        "prompts": len(g["prompts"]),
                        **({"embedding": embedding.describe()} if embedding is not None else {}),
                    }
                    for g in groups.values()
                },
                indent=2,
            )
        )


def _reference_images(name: str, datasets: Any, inputs: Any, bundle: Any) -> list[Any]:
    import numpy as np
    from PIL import Image

    from ..data.pairs import load_pairs

    pairs = load_pairs(name, datasets, inputs, bundle.resolution, 3)
    arr = ((pairs.images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]
