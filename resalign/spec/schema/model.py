"""The ``model`` section: which diffusion model, in which precision, and what is trained."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PositiveInt, model_validator

from .base import StrictModel

# The published code trains rank-4 LoRA on these four projections of every attention layer.
PUBLISHED_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


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


class TinyModelSpec(StrictModel):
    """Architecture of an SD-shaped model small enough for a CPU (family: tiny)."""

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
    pretrain: TinyPretrainSpec | None = None


class ModelSpec(StrictModel):
    """The model to unlearn. ``pretrained`` is a hub id (resolved in the local cache), a
    diffusers folder, or a single-file ``.safetensors`` checkpoint."""

    family: Literal["sd", "sdxl", "tiny"] = "sd"
    pretrained: str | None = None
    revision: str | None = None
    variant: str | None = None
    allow_download: bool = False
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    trainable: TrainableSpec = Field(default_factory=TrainableSpec)
    noise_schedule: NoiseScheduleSpec = Field(default_factory=NoiseScheduleSpec)
    tiny: TinyModelSpec | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.family == "tiny":
            if self.tiny is None:
                self.tiny = TinyModelSpec()
            # no checkpoint to take the schedule from: SD v1.4's, written into the spec
            self.noise_schedule = self.noise_schedule.filled()
        elif not self.pretrained:
            raise ValueError(
                f"model.family '{self.family}' needs 'pretrained': a hub id "
                "(e.g. CompVis/stable-diffusion-v1-4), a diffusers folder or a .safetensors file"
            )
        return self
