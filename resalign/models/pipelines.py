"""The one builder of diffusers pipelines from components (issue 22: they were assembled in
six places): generation (:meth:`ModelBundle.pipeline`), the tiny and rehearsal model
factories and the loaders all go through :func:`pipeline_class` / :func:`assemble_pipeline`.

A *layout* is the pipeline's shape: ``sd`` (``StableDiffusionPipeline``: one CLIP text
encoder, a UNet), ``sdxl`` (``StableDiffusionXLPipeline``: two CLIP encoders, a UNet with
added conditioning) or ``sd3`` (``StableDiffusion3Pipeline``: CLIP-L, CLIP-G and T5, an
``SD3Transformer2DModel``). Pipelines are built without a safety checker (the safety
measurement is ours), without SDXL's invisible watermark (it would change the images the
metrics score) and with the progress bar off (the engine shows its own).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

LAYOUTS = ("sd", "sdxl", "sd3")

# The diffusers pipeline class of each layout, by name (imported on use: no diffusers at
# import time).
_CLASSES = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
}
# The denoiser's component name in each layout's pipeline.
DENOISER = {"sd": "unet", "sdxl": "unet", "sd3": "transformer"}


def layout_of_family(family: str) -> str:
    """The pipeline layout of a spec's model family (``tiny`` models say theirs in
    ``model.json``; their default is ``sd``)."""
    return family if family in LAYOUTS else "sd"


def pipeline_class(layout: str) -> Any:
    """The diffusers pipeline class of ``layout``."""
    import diffusers

    if layout not in _CLASSES:
        raise ValueError(f"unknown pipeline layout {layout!r} ({', '.join(LAYOUTS)})")
    return getattr(diffusers, _CLASSES[layout])


def layout_of_pipeline(pipe: Any) -> str:
    """The layout of a loaded pipeline (by its class)."""
    name = type(pipe).__name__
    for layout, cls in _CLASSES.items():
        if name == cls:
            return layout
    raise ValueError(
        f"unsupported pipeline class {name} (supported: {', '.join(_CLASSES.values())})"
    )


def assemble_pipeline(
    layout: str,
    *,
    denoiser: Any,
    vae: Any,
    scheduler: Any,
    text_encoders: Sequence[Any],
    tokenizers: Sequence[Any],
) -> Any:
    """A pipeline of ``layout`` sharing the given modules (no copies): ``denoiser`` is the
    UNet or SD3 transformer, ``text_encoders``/``tokenizers`` in the layout's order (SD: 1,
    SDXL: 2, SD3: CLIP-L, CLIP-G, T5)."""
    cls = pipeline_class(layout)
    want = {"sd": 1, "sdxl": 2, "sd3": 3}[layout]
    if len(text_encoders) != want or len(tokenizers) != want:
        raise ValueError(
            f"a {layout} pipeline needs {want} text encoder(s) and tokenizer(s), got "
            f"{len(text_encoders)} and {len(tokenizers)}"
        )
    kwargs: dict[str, Any] = {"vae": vae, "scheduler": scheduler, DENOISER[layout]: denoiser}
    for i, (enc, tok) in enumerate(zip(text_encoders, tokenizers)):
        suffix = "" if i == 0 else f"_{i + 1}"
        kwargs[f"text_encoder{suffix}"] = enc
        kwargs[f"tokenizer{suffix}"] = tok
    if layout == "sd":
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif layout == "sdxl":
        kwargs.update(add_watermarker=False)
    pipe = cls(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser_of(pipe: Any) -> Any:
    """The pipeline's denoiser (``unet`` or ``transformer``)."""
    return getattr(pipe, "transformer", None) or pipe.unet
