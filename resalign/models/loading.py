"""Loading models: Stable Diffusion v1.x/v2.x, SDXL, SD 3.x and FLUX.1 checkpoints from a diffusers
folder, a hub id in the local Hugging Face cache, or a single ``.safetensors`` file (where
diffusers' ``from_single_file`` supports the pipeline); the ``model`` node's output; and a
report row's model (the original with the row's denoiser weights).

The ``model`` node writes (see docs/architecture.md):

- ``model.json``: ``{"family", "resolution", "noise_schedule": {...}, "source": {...}}``, plus
  ``layout`` (the pipeline shape, :mod:`resalign.models.pipelines`) and, for flow-matching
  models, ``timestep_sampling``; for Flux ``training_guidance`` (the embedded guidance a
  guidance-distilled model trains with) and ``resolution`` as the spec sets it;
- ``pipeline/``: a diffusers pipeline folder (tiny family: the built, pretrained model), or
- ``source.json``: the resolved location of an SD/SDXL checkpoint (weights are not copied).

Every family goes through :func:`load_pipeline` → :func:`bundle_from_pipeline`; the tiny
model differs only in how its folder was made.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_text
from ..errors import UserError
from .bundle import ModelBundle
from .device import resolve_dtype

MODEL_JSON = "model.json"
SOURCE_JSON = "source.json"
PIPELINE_DIR = "pipeline"

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def hub_cache_dir() -> str:
    """The Hugging Face hub cache searched for hub ids (``HF_HUB_CACHE``)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained`` dtype argument: ``dtype`` where diffusers has renamed it (≥ 0.36),
    ``torch_dtype`` on older releases."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


class quiet_loading:
    """Silence diffusers'/transformers' per-component loading bars (the engine shows its own
    progress); restores their previous state."""

    def __enter__(self) -> None:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        self._state = (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled())
        dlog.disable_progress_bar()
        tlog.disable_progress_bar()

    def __exit__(self, *exc: object) -> None:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        if self._state[0]:
            dlog.enable_progress_bar()
        if self._state[1]:
            tlog.enable_progress_bar()


def resolve_pretrained(
    pretrained: str,
    spec_dir: Path | None = None,
    *,
    revision: str | None = None,
    variant: str | None = None,
    allow_download: bool = False,
) -> dict[str, Any]:
    """Where a checkpoint lives, as ``{"kind": "folder" | "single_file", "path", "id",
    "revision", "variant"}``.

    ``pretrained`` is tried as a path (relative to ``spec_dir``, then as given) and otherwise
    as a hub id resolved in the local cache (downloaded only when ``allow_download``). A
    missing model is a :class:`UserError` naming what was searched and how to fetch it.
    """
    expanded = Path(os.path.expanduser(pretrained))
    candidates = [expanded] if expanded.is_absolute() else []
    if not expanded.is_absolute():
        if spec_dir is not None:
            candidates.append(Path(spec_dir) / expanded)
        candidates.append(expanded)
    for path in candidates:
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise UserError(
                    f"{path} is not a diffusers pipeline folder (no model_index.json)",
                    where=str(path),
                    hint="point model.pretrained at a folder saved by save_pretrained, a hub "
                    "id, or a single .safetensors checkpoint file",
                )
            return {
                "kind": "folder",
                "path": str(path.resolve()),
                "id": None,
                "revision": revision,
                "variant": variant,
            }
        if path.is_file():
            if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
                raise UserError(
                    f"{path} is not a checkpoint file (expected one of "
                    f"{', '.join(SINGLE_FILE_SUFFIXES)})",
                    where=str(path),
                    hint="give a .safetensors single-file checkpoint or a diffusers folder",
                )
            return {
                "kind": "single_file",
                "path": str(path.resolve()),
                "id": None,
                "revision": revision,
                "variant": variant,
            }
    looks_like_path = (
        pretrained.startswith((".", "/", "~"))
        or pretrained.lower().endswith(SINGLE_FILE_SUFFIXES)
        or not _HUB_ID.match(pretrained)
    )
    if looks_like_path:
        searched = ", ".join(str(c) for c in candidates)
        raise UserError(
            f"model path {pretrained!r} does not exist (looked at {searched})",
            where=pretrained,
            hint="fix model.pretrained: a diffusers folder, a .safetensors file, or a hub id "
            "such as CompVis/stable-diffusion-v1-4",
        )
    return {
        "kind": "folder",
        "path": _hub_snapshot(pretrained, revision, variant, allow_download),
        "id": pretrained,
        "revision": revision,
        "variant": variant,
    }


def _hub_snapshot(
    repo_id: str, revision: str | None, variant: str | None, allow_download: bool
) -> str:
    import diffusers

    # the cache named now (huggingface_hub reads HF_HUB_CACHE once, at its import)
    kwargs: dict[str, Any] = {
        "revision": revision,
        "local_files_only": not allow_download,
        "cache_dir": hub_cache_dir(),
    }
    if variant:
        kwargs["variant"] = variant
    try:
        return str(diffusers.DiffusionPipeline.download(repo_id, **kwargs))
    except Exception as exc:  # huggingface_hub raises several types for "not cached"
        fetch = f"huggingface-cli download {repo_id}" + (
            f" --revision {revision}" if revision else ""
        )
        if allow_download:
            raise UserError(
                f"could not download model {repo_id!r}: {exc}",
                where=repo_id,
                hint=f"check the id and your network; or fetch it yourself with `{fetch}` "
                f"(cache: {hub_cache_dir()})",
            ) from None
        raise UserError(
            f"model {repo_id!r} is not in the local Hugging Face cache "
            f"(searched {hub_cache_dir()}, HF_HUB_CACHE)",
            where=repo_id,
            hint=f"fetch it with `{fetch}`, or set model.allow_download: true to let "
            "resalign download it",
        ) from None


def load_pipeline(
    source: Mapping[str, Any],
    family: str,
    *,
    dtype: torch.dtype | str = torch.float32,
    allow_download: bool = False,
    layout: str | None = None,
) -> Any:
    """A diffusers pipeline from a resolved source (:func:`resolve_pretrained`), of the
    family's layout (or ``layout``: a tiny model's, from its ``model.json``). Loads with
    ``local_files_only`` unless downloads are allowed, with no safety checker (the safety
    measurement is ours)."""
    from .pipelines import layout_of_family, pipeline_class

    layout = layout or layout_of_family(family)
    cls = pipeline_class(layout)
    dtype = resolve_dtype(dtype)
    path = source["path"]
    if source["kind"] == "single_file":
        kwargs: dict[str, Any] = {**dtype_kwargs(dtype), "local_files_only": not allow_download}
        if layout == "sd":
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        try:
            # Non-safetensors files go through diffusers' load_state_dict, which calls
            # torch.load(weights_only=True); no pickle code runs.
            with quiet_loading():
                pipe = cls.from_single_file(path, **kwargs)
        except Exception as exc:
            raise UserError(
                f"could not load single-file checkpoint {path}: {exc}",
                where=path,
                hint="from_single_file needs the model's config: it looks for it in the "
                f"Hugging Face cache ({hub_cache_dir()}); fetch the matching base repo's "
                "configs (e.g. `huggingface-cli download stable-diffusion-v1-5/"
                "stable-diffusion-v1-5 --include '*.json' '*.txt'`) or set "
                "model.allow_download: true",
            ) from None
    else:
        kwargs = {**dtype_kwargs(dtype), "local_files_only": True}
        if source.get("variant"):
            kwargs["variant"] = source["variant"]
        if layout == "sd":
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        try:
            with quiet_loading():
                pipe = cls.from_pretrained(path, **kwargs)
        except (OSError, ValueError) as exc:
            raise UserError(
                f"could not load the diffusers pipeline in {path}: {exc}",
                where=path,
                hint="check that the folder is a complete "
                f"{cls.__name__} (model_index.json, its denoiser, vae/, text_encoder(s)/, "
                "tokenizer(s)/, scheduler/)",
            ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bundle_from_pipeline(
    pipe: Any,
    family: str,
    noise_schedule: Mapping[str, Any] | None = None,
    *,
    device: str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    timestep_sampling: Mapping[str, Any] | None = None,
    resolution: int | None = None,
    guidance: float | None = None,
) -> ModelBundle:
    """A frozen :class:`ModelBundle` sharing ``pipe``'s modules, with its training objective
    (:func:`resalign.models.diffusion.objective_for`). A pipeline whose scheduler is a
    flow-matching one (SD3) trains with flow matching on a copy of that scheduler, its
    timesteps drawn per ``timestep_sampling`` (the spec's ``model.timestep_sampling``; None:
    logit-normal). Otherwise the training scheduler is a ``DDPMScheduler`` built from the
    pipeline's scheduler config with the written fields of ``noise_schedule`` (the spec's
    ``model.noise_schedule``; None = the checkpoint's) overriding it.

    ``resolution`` (px) is the training and generation size; None: the denoiser's
    ``sample_size`` times the VAE's scale (Flux, whose transformer has none: FluxPipeline's
    default, 1024). A Flux model whose scheduler shifts per resolution
    (``use_dynamic_shifting``) with ``timestep_sampling.resolution_shift`` draws its
    timesteps shifted by that resolution's μ (:class:`~resalign.models.diffusion.FlowMatchObjective`).
    ``guidance`` is a guidance-distilled Flux transformer's training guidance
    (:attr:`ModelBundle.guidance`; None: the schema's default)."""
    from diffusers import DDPMScheduler

    from .diffusion import is_flow_scheduler, objective_for
    from .pipelines import default_resolution, denoiser_of, layout_of_pipeline

    dtype = resolve_dtype(dtype)
    layout = layout_of_pipeline(pipe)
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    resolution = int(resolution or default_resolution(pipe))
    sampler_config = dict(pipe.scheduler.config)
    config = dict(sampler_config)
    if is_flow_scheduler(pipe.scheduler):
        noise_scheduler = type(pipe.scheduler).from_config(config)
        sampling = None
        if timestep_sampling:
            from ..spec.schema.model import TimestepSamplingSpec

            spec = TimestepSamplingSpec.model_validate(dict(timestep_sampling))
            sampling = spec.objective_kwargs()
            if spec.resolution_shift and config.get("use_dynamic_shifting"):
                from .flux import image_seq_len, resolution_mu

                sampling["shift_mu"] = resolution_mu(image_seq_len(resolution, vae_scale), config)
        objective = objective_for(noise_scheduler, sampling)
    else:
        if noise_schedule:
            # unwritten fields (None) keep the checkpoint's value (e.g. SD 2.x's v_prediction)
            config.update({k: v for k, v in noise_schedule.items() if v is not None})
        config.setdefault("clip_sample", False)
        noise_scheduler = DDPMScheduler.from_config(config)
        objective = objective_for(noise_scheduler)
    denoiser = denoiser_of(pipe)
    if layout == "flux" and guidance is None:
        from ..spec.schema.model import FLUX_TRAINING_GUIDANCE

        guidance = FLUX_TRAINING_GUIDANCE
    bundle = ModelBundle(
        unet=denoiser,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        noise_scheduler=noise_scheduler,
        family=family,
        resolution=resolution,
        dtype=dtype,
        device=device,
        text_encoder_2=getattr(pipe, "text_encoder_2", None),
        tokenizer_2=getattr(pipe, "tokenizer_2", None),
        sampler_config=sampler_config,
        text_encoder_3=getattr(pipe, "text_encoder_3", None),
        tokenizer_3=getattr(pipe, "tokenizer_3", None),
        objective=objective,
        layout=layout,
        guidance=guidance if layout == "flux" else None,
    )
    return bundle.to(device, dtype).freeze()


def load_pretrained(spec: Any, spec_dir: Path | None = None, *, device: str = "cpu") -> ModelBundle:
    """Load an SD/SDXL/SD3/Flux ``ModelSpec`` (``model`` section) into a :class:`ModelBundle`."""
    if spec.family == "tiny":
        raise ValueError(
            "load_pretrained is for sd/sdxl/sd3/flux; the tiny family is built by the model node"
        )
    source = resolve_pretrained(
        spec.pretrained,
        spec_dir,
        revision=spec.revision,
        variant=spec.variant,
        allow_download=spec.allow_download,
    )
    pipe = load_pipeline(source, spec.family, dtype=spec.dtype, allow_download=spec.allow_download)
    return bundle_from_pipeline(
        pipe,
        spec.family,
        spec.noise_schedule.model_dump(),
        device=device,
        dtype=spec.dtype,
        timestep_sampling=_sampling_dump(spec),
        resolution=spec.resolution,
        guidance=spec.training_guidance,
    )


def _sampling_dump(spec: Any) -> dict[str, Any] | None:
    ts = getattr(spec, "timestep_sampling", None)
    return None if ts is None else ts.model_dump(mode="json")


def write_model_json(out: Path, info: Mapping[str, Any]) -> None:
    """Write ``model.json`` atomically (temp file + rename)."""
    _write_json(Path(out) / MODEL_JSON, info)


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))


def read_model_json(model_dir: Path) -> dict[str, Any]:
    """The ``model`` node's ``model.json``; a clear error when the folder is not one."""
    path = Path(model_dir) / MODEL_JSON
    if not path.is_file():
        raise UserError(
            f"{model_dir} is not a model node output (no {MODEL_JSON})",
            where=str(model_dir),
            hint="run the spec's model node first (resalign run <spec>)",
        )
    return json.loads(path.read_text(encoding="utf-8"))


def load_model_node(
    model_dir: Path, device: str = "cpu", dtype: torch.dtype | str = torch.float32
) -> ModelBundle:
    """The :class:`ModelBundle` of a completed ``model`` node (frozen, on ``device``)."""
    model_dir = Path(model_dir)
    info = read_model_json(model_dir)
    family = info["family"]
    if (model_dir / PIPELINE_DIR).is_dir():
        source: dict[str, Any] = {"kind": "folder", "path": str(model_dir / PIPELINE_DIR)}
    else:
        source_file = model_dir / SOURCE_JSON
        if not source_file.is_file():
            raise UserError(
                f"{model_dir} has neither {PIPELINE_DIR}/ nor {SOURCE_JSON}",
                where=str(model_dir),
                hint="the model node output is incomplete; delete it and run again",
            )
        source = json.loads(source_file.read_text(encoding="utf-8"))
        if not Path(source["path"]).exists():
            raise UserError(
                f"the checkpoint this run used is gone: {source['path']}",
                where=str(source_file),
                hint="restore it, or re-run so the model node resolves the checkpoint again",
            )
    pipe = load_pipeline(source, family, dtype=dtype, layout=info.get("layout"))
    return bundle_from_pipeline(
        pipe,
        family,
        info.get("noise_schedule"),
        device=device,
        dtype=dtype,
        timestep_sampling=info.get("timestep_sampling"),
        resolution=info.get("resolution"),
        guidance=info.get("training_guidance"),
    )


def load_state_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file, or a ``.pt``/``.bin`` state dict through
    ``torch.load(weights_only=True)`` (no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist", where=str(path))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(
            f"could not read {path} as a weights-only torch state dict: {exc}",
            where=str(path),
            hint="only plain tensor state dicts are accepted; convert it to .safetensors",
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a state dict of tensors", where=str(path))
    return state


def apply_trained_tensors(
    unet: Any, state: Mapping[str, torch.Tensor], lora_config: Mapping[str, Any] | None = None
) -> None:
    """Put trained tensors (by parameter name, as in ``trainable.safetensors``) into ``unet``.

    Full/partial UNet tensors are copied into the matching parameters. LoRA tensors (names
    containing ``lora_``) need their adapter: it is added with
    :func:`resalign.models.trainable.apply_trainable` on exactly the modules the tensors name,
    rank from the tensors, alpha from ``lora_config`` (default: rank, i.e. scale 1 as
    published). A tensor that matches no parameter, or has another shape, is an error.
    """
    params = dict(unet.named_parameters())
    lora_keys = [k for k in state if "lora_" in k]
    if lora_keys and not any("lora_" in k for k in params):
        from .trainable import apply_trainable

        cfg = dict(lora_config or {})
        rank = int(next(state[k] for k in lora_keys if ".lora_A." in k).shape[0])
        targets = sorted({k.split(".lora_")[0] for k in lora_keys})
        alpha = cfg.get("alpha")
        apply_trainable(
            unet,
            {
                "kind": "lora",
                "rank": rank,
                "alpha": alpha,
                "targets": targets,
                "init": "peft_default",
            },
        )
        params = dict(unet.named_parameters())
    unknown = [k for k in state if k not in params]
    if unknown:
        raise UserError(
            f"{len(unknown)} trained tensor(s) match no UNet parameter, e.g. {unknown[:3]}",
            hint="the weights were trained on a different model or LoRA layout",
        )
    with torch.no_grad():
        for name, tensor in state.items():
            target = params[name]
            if target.shape != tensor.shape:
                raise UserError(
                    f"trained tensor {name} has shape {tuple(tensor.shape)}, the model's "
                    f"parameter {tuple(target.shape)}",
                    hint="the weights were trained on a different model",
                )
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))


def load_row(
    model_dir: Path,
    trainable_file: Path | None = None,
    unet_dir: Path | None = None,
    *,
    device: str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    lora_config: Mapping[str, Any] | None = None,
) -> ModelBundle:
    """The model of a report row: the ``model`` node's bundle with the row's denoiser.

    ``unet_dir`` (a merged denoiser saved by ``save_pretrained``: a UNet, or SD3's or
    Flux's transformer, loaded with the bundle's own denoiser class) replaces it; otherwise
    ``trainable_file`` (``trainable.safetensors``, or a ``.pt``/``.bin`` state dict loaded
    weights-only) is applied with :func:`apply_trained_tensors`. Neither: the original model.
    """
    bundle = load_model_node(model_dir, device=device, dtype=dtype)
    if unet_dir is not None:
        unet_dir = Path(unet_dir)
        if not (unet_dir / "config.json").is_file():
            raise UserError(f"{unet_dir} is not a saved UNet (no config.json)", where=str(unet_dir))
        with quiet_loading():
            unet = type(bundle.unet).from_pretrained(
                str(unet_dir), **dtype_kwargs(resolve_dtype(dtype))
            )
        bundle.unet = unet.to(device).eval().requires_grad_(False)
    elif trainable_file is not None:
        state = load_state_file(Path(trainable_file))
        apply_trained_tensors(bundle.unet, state, lora_config)
        bundle.unet.requires_grad_(False)
    return bundle
