"""The one builder of diffusers pipelines from components (issue 22: they were assembled in
six places): generation (:meth:`ModelBundle.pipeline`), the tiny and rehearsal model
factories and the loaders all go through :func:`pipeline_class` / :func:`assemble_pipeline`.

A *layout* is the pipeline's shape: ``sd`` (``StableDiffusionPipeline``: one CLIP text
encoder, a UNet), ``sdxl`` (``StableDiffusionXLPipeline``: two CLIP encoders, a UNet with
added conditioning), ``sd3`` (``StableDiffusion3Pipeline``: CLIP-L, CLIP-G and T5, an
``SD3Transformer2DModel``) or ``flux`` (``FluxPipeline``: CLIP-L and T5, a
``FluxTransformer2DModel``). Pipelines are built without a safety checker (the safety
measurement is ours), without SDXL's invisible watermark (it would change the images the
metrics score) and with the progress bar off (the engine shows its own).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

LAYOUTS = ("sd", "sdxl", "sd3", "flux")

# The T5 sequence length of SD3's conditioning: StableDiffusion3Pipeline's default
# ``max_sequence_length``, or the T5 tokenizer's ``model_max_length`` where that is shorter
# (the tiny models'); generation passes the same (:func:`t5_sequence_length`).
SD3_MAX_SEQUENCE_LENGTH = 256


def t5_sequence_length(tokenizer_3: Any) -> int:
    """The T5 token count SD3's conditioning uses (unlearning, attacks and generation)."""
    return min(SD3_MAX_SEQUENCE_LENGTH, int(tokenizer_3.model_max_length))


# The diffusers pipeline class of each layout, by name (imported on use: no diffusers at
# import time).
_CLASSES = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}
# The denoiser's component name in each layout's pipeline.
DENOISER = {"sd": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "transformer"}
# How many text encoders (and tokenizers) each layout's pipeline takes.
TEXT_ENCODERS = {"sd": 1, "sdxl": 2, "sd3": 3, "flux": 2}


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
    SDXL: 2, SD3: CLIP-L, CLIP-G, T5; Flux: CLIP-L, T5)."""
    cls = pipeline_class(layout)
    want = TEXT_ENCODERS[layout]
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
    elif layout == "flux":
        kwargs.update(image_encoder=None, feature_extractor=None)  # no IP-adapter
    pipe = cls(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser_of(pipe: Any) -> Any:
    """The pipeline's denoiser (``unet`` or ``transformer``)."""
    return getattr(pipe, "transformer", None) or pipe.unet


def call_kwargs(pipe: Any) -> dict[str, Any]:
    """Keyword arguments every generation call of ``pipe`` passes: for SD3 and Flux the T5
    length the conditioning of unlearning and attacks used
    (:func:`t5_sequence_length`, :func:`resalign.models.flux.flux_t5_length`)."""
    layout = layout_of_pipeline(pipe)
    if layout == "sd3":
        return {"max_sequence_length": t5_sequence_length(pipe.tokenizer_3)}
    if layout == "flux":
        from .flux import flux_t5_length

        return {"max_sequence_length": flux_t5_length(pipe.tokenizer_2)}
    return {}


def default_resolution(pipe: Any) -> int:
    """The image size ``pipe`` generates by default: the denoiser's ``sample_size`` times
    the VAE's scale, or for Flux (whose transformer has no ``sample_size``) the pipeline's
    ``default_sample_size`` times it (FLUX.1: 128 · 8 = 1024; a bundle's pipeline sets it
    to the model's resolution)."""
    denoiser = denoiser_of(pipe)
    sample = getattr(denoiser.config, "sample_size", None)
    if sample is None:
        sample = pipe.default_sample_size
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    return int(sample) * int(pipe.vae_scale_factor)
