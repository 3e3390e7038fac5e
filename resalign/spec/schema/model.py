"""The ``model`` section: which diffusion model, in which precision, and what is trained."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, PositiveInt, model_validator

from .base import OmitDefaults, StrictModel

# The published code trains rank-4 LoRA on these four projections of every attention layer.
PUBLISHED_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py default (--lora_layers unset):
# the image and the text stream's projections of every joint attention block.
SD3_LORA_TARGETS = [
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
]
# diffusers' examples/dreambooth/train_dreambooth_lora_flux.py default (--lora_layers unset):
# the joint blocks' image and text attention projections and feed-forwards; the suffixes
# attn.to_q/k/v also match the single-stream blocks' attention.
FLUX_LORA_TARGETS = [
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]
# The same script's --guidance_scale: the embedded guidance FLUX.1-dev (guidance-distilled)
# is fine-tuned with.
FLUX_TRAINING_GUIDANCE = 3.5
# Families trained with flow matching (a FlowMatchEulerDiscreteScheduler checkpoint).
FLOW_FAMILIES = ("sd3", "flux")


class TrainableSpec(StrictModel):
    """Which UNet parameters unlearning updates."""

    kind: Literal["lora", "full", "modules"] = "lora"
    rank: PositiveInt = 4
    alpha: float | None = Field(
        default=None, description="LoRA alpha; default = rank, i.e. scale 1 as published"
    )
    targets: list[str] = Field(default_factory=lambda: list(PUBLISHED_LORA_TARGETS))
    init: Literal["resalign", "peft_default"] = Field(
        default="resalign",
        description="resalign: up ~ N(0, 0.002), down ~ N(0, 0.008) as the published code; "
        "peft_default: kaiming down, zero up (the adapter starts as a no-op)",
    )
    modules: list[str] = Field(
        default_factory=list,
        description="for kind=modules: substrings of parameter names to train",
    )

    @model_validator(mode="after")
    def _check(self) -> TrainableSpec:
        if self.kind == "modules" and not self.modules:
            raise ValueError("trainable.kind 'modules' needs a non-empty 'modules' list")
        if self.kind == "lora" and not self.targets:
            raise ValueError("trainable.kind 'lora' needs a non-empty 'targets' list")
        return self


# SD v1.4's training schedule: the tiny family's defaults (it has no checkpoint to read).
SD_NOISE_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "epsilon",
}
_FROM_CHECKPOINT = "default: the checkpoint's own (sd, sdxl); SD v1.4's {} (tiny)"


class NoiseScheduleSpec(StrictModel):
    """Training noise schedule (DDPM). A field not written is the checkpoint's own for
    ``sd``/``sdxl`` (an SD 2.x 768 model trains with v-prediction because its scheduler
    says so) and SD v1.4's for ``tiny``."""

    num_train_timesteps: PositiveInt | None = Field(
        default=None, description=_FROM_CHECKPOINT.format(1000)
    )
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"] | None = Field(
        default=None, description=_FROM_CHECKPOINT.format("scaled_linear")
    )
    beta_start: float | None = Field(
        default=None, gt=0, description=_FROM_CHECKPOINT.format(0.00085)
    )
    beta_end: float | None = Field(default=None, gt=0, description=_FROM_CHECKPOINT.format(0.012))
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        default=None, description=_FROM_CHECKPOINT.format("epsilon")
    )

    def filled(self) -> NoiseScheduleSpec:
        """This schedule with every unwritten field set to SD v1.4's value."""
        return NoiseScheduleSpec(
            **{k: SD_NOISE_SCHEDULE[k] if v is None else v for k, v in self.model_dump().items()}
        )


class TimestepSamplingSpec(OmitDefaults):
    """How flow-matching training draws its timesteps (``sd3``, ``flux``; ``tiny`` with
    ``architecture: sd3``), as diffusers' SD3 and Flux training scripts
    (``compute_density_for_timestep_sampling``): u ~ logit-normal (the SD3 script's
    default), the ``mode`` density, or uniform (the Flux script's); the timestep is the
    scheduler's (shifted) timestep at index ⌊u·T⌋. With ``resolution_shift`` (``flux``'s
    default) that σ is then moved by Flux's resolution-dependent shift, the one FluxPipeline
    samples with (checkpoints whose scheduler has ``use_dynamic_shifting``; a scheduler with a
    static shift has shifted its table already)."""

    _omit_if_default: ClassVar[dict[str, Any]] = {"resolution_shift": False}

    kind: Literal["logit_normal", "mode", "uniform"] = Field(
        default="logit_normal",
        description="logit_normal: the SD3 script's default; uniform: its 'none' (Flux's default)",
    )
    logit_mean: float = 0.0
    logit_std: float = Field(default=1.0, gt=0)
    mode_scale: float = 1.29
    resolution_shift: bool = Field(
        default=False,
        description="shift σ by FluxPipeline's resolution-dependent mu (flux's default); "
        "departs from diffusers' Flux script, whose uniform sigmas are unshifted",
    )

    def objective_kwargs(self) -> dict[str, Any]:
        """The :class:`resalign.models.diffusion.FlowMatchObjective` settings."""
        return {
            "sampling": self.kind,
            "logit_mean": self.logit_mean,
            "logit_std": self.logit_std,
            "mode_scale": self.mode_scale,
        }


class TinyPretrainSpec(StrictModel):
    """Pretraining of a tiny model from scratch (the built-in demo's 'original model')."""

    dataset: str
    steps: PositiveInt = 2000
    lr: float = Field(default=1e-3, gt=0)
    batch_size: PositiveInt = 64
    seed: int = 0
    train_text_encoder: bool = Field(
        default=False,
        description="train the (random) CLIP text encoder jointly with the UNet; it is frozen "
        "afterwards, as SD's CLIP is",
    )


class TinyModelSpec(OmitDefaults):
    """Architecture of an SD-shaped model small enough for a CPU (family: tiny).

    ``architecture: sd3`` builds an SD3-shaped model instead (``StableDiffusion3Pipeline``:
    an ``SD3Transformer2DModel`` of ``transformer_layers`` joint blocks of width
    ``cross_attention_dim`` in heads of ``attention_head_dim``, patch 2; two
    ``CLIPTextModelWithProjection`` of width ``text_hidden_size`` and a ``T5EncoderModel``
    of twice that width), trained with flow matching (``model.timestep_sampling``) on a
    ``FlowMatchEulerDiscreteScheduler`` of shift ``flow_shift``; ``block_out_channels``,
    ``layers_per_block`` and ``text_time_embedding`` are the UNet's and unused there."""

    _omit_if_default: ClassVar[dict[str, Any]] = {
        "architecture": "unet",
        "transformer_layers": 2,
        "flow_shift": 1.0,
    }

    sample_size: PositiveInt = 8
    in_channels: PositiveInt = 1
    block_out_channels: list[PositiveInt] = Field(default_factory=lambda: [32, 64])
    layers_per_block: PositiveInt = 1
    attention_head_dim: PositiveInt = 8
    cross_attention_dim: PositiveInt = 32
    text_hidden_size: PositiveInt = 32
    text_layers: PositiveInt = 2
    max_length: PositiveInt = 16
    latent: Literal["pixel", "vae"] = Field(
        default="pixel",
        description="pixel: the VAE is an identity-initialised 1×1 autoencoder so latents are "
        "pixels; vae: a randomly initialised tiny AutoencoderKL",
    )
    text_time_embedding: bool = Field(
        default=True,
        description="also add an attention-pooled text embedding to the timestep embedding "
        "(diffusers' addition_embed_type 'text'); cross-attention alone learns the caption "
        "too slowly at CPU budgets",
    )
    architecture: Literal["unet", "sd3"] = Field(
        default="unet",
        description="unet: SD-shaped (UNet2DConditionModel, DDPM); sd3: SD3-shaped "
        "(SD3Transformer2DModel, flow matching)",
    )
    transformer_layers: PositiveInt = Field(
        default=2, description="architecture sd3: number of joint transformer blocks"
    )
    flow_shift: float = Field(
        default=1.0, gt=0, description="architecture sd3: the flow scheduler's timestep shift"
    )
    pretrain: TinyPretrainSpec | None = None


class ModelSpec(OmitDefaults):
    """The model to unlearn. ``pretrained`` is a hub id (resolved in the local cache), a
    diffusers folder, or a single-file ``.safetensors`` checkpoint. ``sd3``: Stable
    Diffusion 3.x (``StableDiffusion3Pipeline``), ``flux``: FLUX.1 (``FluxPipeline``), both
    trained with flow matching."""

    _omit_if_default: ClassVar[dict[str, Any]] = {
        "timestep_sampling": None,
        "resolution": None,
        "training_guidance": None,
    }

    family: Literal["sd", "sdxl", "sd3", "flux", "tiny"] = "sd"
    pretrained: str | None = None
    revision: str | None = None
    variant: str | None = None
    allow_download: bool = False
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    trainable: TrainableSpec = Field(default_factory=TrainableSpec)
    noise_schedule: NoiseScheduleSpec = Field(default_factory=NoiseScheduleSpec)
    tiny: TinyModelSpec | None = None
    timestep_sampling: TimestepSamplingSpec | None = Field(
        default=None,
        description="flow-matching models only (sd3, flux; tiny with architecture sd3); "
        "default: logit-normal (0, 1), as diffusers' SD3 training script; flux: uniform "
        "(its Flux script) with resolution_shift",
    )
    resolution: PositiveInt | None = Field(
        default=None,
        description="flux only: the image size (px) it is trained, unlearned, attacked and "
        "sampled at; default: FLUX.1's 1024 (a multiple of 16)",
    )
    training_guidance: float | None = Field(
        default=None,
        description="flux only: the embedded guidance scale a guidance-distilled transformer "
        "(FLUX.1-dev) is trained and unlearned with; default 3.5 (diffusers' Flux script); "
        "unused by models without guidance embeddings (FLUX.1-schnell)",
    )

    @property
    def flow_matching(self) -> bool:
        """Whether this model trains with flow matching (else DDPM)."""
        if self.family == "tiny":
            return self.tiny is not None and self.tiny.architecture == "sd3"
        return self.family in FLOW_FAMILIES

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.family == "tiny" and self.tiny is None:
            self.tiny = TinyModelSpec()
        flux_only = [k for k in ("resolution", "training_guidance") if getattr(self, k) is not None]
        if self.family != "flux" and flux_only:
            raise ValueError(
                f"model.{flux_only[0]} is for family flux (its transformer has no sample size "
                f"and takes an embedded guidance); family '{self.family}' takes them from the "
                "checkpoint and the sampler; remove it"
            )
        if self.family == "flux":
            if self.resolution is not None and self.resolution % 16:
                raise ValueError(
                    f"model.resolution {self.resolution} is not a multiple of 16 (Flux packs "
                    "2x2 patches of its 8x-downsampled latents)"
                )
            if self.training_guidance is None:
                self.training_guidance = FLUX_TRAINING_GUIDANCE
            if self.timestep_sampling is None:
                # diffusers' Flux script draws uniformly; FluxPipeline's resolution shift
                self.timestep_sampling = TimestepSamplingSpec(kind="uniform", resolution_shift=True)
        if self.flow_matching:
            written = [k for k, v in self.noise_schedule.model_dump().items() if v is not None]
            if written:
                sigmas = "model.tiny.flow_shift" if self.family == "tiny" else "the checkpoint"
                raise ValueError(
                    f"model.noise_schedule ({', '.join(written)}) is a DDPM schedule, but this "
                    f"model trains with flow matching: its sigmas come from {sigmas}, its "
                    "timestep draw from model.timestep_sampling; remove noise_schedule"
                )
            if self.timestep_sampling is None:
                self.timestep_sampling = TimestepSamplingSpec()
            if self.trainable.kind == "lora" and "targets" not in self.trainable.model_fields_set:
                # the published SD3 / Flux LoRA recipe's targets (diffusers' training scripts)
                targets = FLUX_LORA_TARGETS if self.family == "flux" else SD3_LORA_TARGETS
                self.trainable = self.trainable.model_copy(update={"targets": list(targets)})
                self.trainable.model_fields_set.add("targets")
            if self.family == "tiny":
                return self
        elif self.timestep_sampling is not None:
            raise ValueError(
                f"model.timestep_sampling is for flow-matching models (sd3, flux, tiny with "
                f"architecture sd3); family '{self.family}' trains with DDPM "
                "(model.noise_schedule)"
            )
        if self.family == "tiny":
            # no checkpoint to take the schedule from: SD v1.4's, written into the spec
            self.noise_schedule = self.noise_schedule.filled()
        elif not self.pretrained:
            raise ValueError(
                f"model.family '{self.family}' needs 'pretrained': a hub id "
                "(e.g. CompVis/stable-diffusion-v1-4), a diffusers folder or a .safetensors file"
            )
        return self
