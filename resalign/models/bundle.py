"""``ModelBundle``: the loaded parts of a text-to-image diffusion model, one object for every
step (unlearning, attacks, evaluation, pretraining)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ModelBundle:
    """The components of an SD-shaped model plus the training noise schedule.

    ``noise_scheduler`` is a ``DDPMScheduler`` with the spec's training schedule (used for
    adding noise in training); generation builds its own sampler via :meth:`pipeline`.
    ``text_encoder_2``/``tokenizer_2`` are set for SDXL only. ``sampler_config`` is the
    pipeline's own scheduler config (what the checkpoint ships), the base for samplers.
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    family: str
    resolution: int
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    sampler_config: dict[str, Any] = field(default_factory=dict)

    # -- conditioning -----------------------------------------------------------------------

    def _tokens(self, tokenizer: Any, captions: list[str]) -> torch.Tensor:
        ids = tokenizer(
            list(captions),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids.to(self.device)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """Text embeddings ``[N, L, D]`` for the UNet's cross-attention, computed as the
        diffusers pipeline computes them (padded to ``model_max_length``, last hidden state;
        SDXL: penultimate states of both encoders, concatenated). No gradient."""
        if self.family == "sdxl":
            return self._sdxl_text(captions)[0]
        ids = self._tokens(self.tokenizer, captions)
        return self.text_encoder(ids)[0].to(self.dtype)

    @torch.no_grad()
    def _sdxl_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        states = []
        pooled = None
        for tok, enc in (
            (self.tokenizer, self.text_encoder),
            (self.tokenizer_2, self.text_encoder_2),
        ):
            out = enc(self._tokens(tok, captions), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]  # text_encoder_2 is a CLIPTextModelWithProjection: text_embeds
        return torch.cat(states, dim=-1).to(self.dtype), pooled.to(self.dtype)

    @torch.no_grad()
    def encode_condition(self, captions: list[str]) -> dict[str, Any]:
        """Keyword arguments for ``unet(noisy, t, **cond)``: ``encoder_hidden_states`` and, for
        SDXL, ``added_cond_kwargs`` (pooled text embeds and size/crop time ids at the model
        resolution, no crop). Use this rather than :meth:`encode_text` to support SDXL."""
        if self.family != "sdxl":
            return {"encoder_hidden_states": self.encode_text(captions)}
        states, pooled = self._sdxl_text(captions)
        r = self.resolution
        time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=self.dtype, device=self.device)
        return {
            "encoder_hidden_states": states,
            "added_cond_kwargs": {
                "text_embeds": pooled,
                "time_ids": time_ids.repeat(len(captions), 1),
            },
        }

    # -- images -----------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents of ``images`` ``[N, C, H, W]`` in [-1, 1]: the VAE posterior *mean* (so the
        result is deterministic; SD training code samples instead) times the VAE scaling
        factor (minus ``shift_factor`` where the VAE has one)."""
        images = images.to(device=self.device, dtype=self.vae.dtype)
        latents = self.vae.encode(images).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from scaled latents (inverse of :meth:`encode_images`)."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = latents.to(device=self.device, dtype=self.vae.dtype)
        return self.vae.decode(latents / self.vae.config.scaling_factor + shift).sample

    # -- generation -------------------------------------------------------------------------

    def pipeline(self, scheduler_name: str = "PNDMScheduler") -> Any:
        """A diffusers pipeline sharing these modules (no copies), with a fresh sampler of
        class ``scheduler_name`` (a diffusers scheduler class name) configured from the
        checkpoint's scheduler config and the training noise schedule."""
        import diffusers

        from ..errors import UserError

        cls = getattr(diffusers, scheduler_name, None)
        if (
            cls is None
            or not isinstance(cls, type)
            or not issubclass(cls, diffusers.SchedulerMixin)
        ):
            raise UserError(
                f"unknown scheduler {scheduler_name!r}",
                hint="use a diffusers scheduler class name, e.g. PNDMScheduler, DDIMScheduler, "
                "EulerDiscreteScheduler, DPMSolverMultistepScheduler",
            )
        config = dict(self.sampler_config or {})
        # The betas the model was trained with win over whatever the sampler config says.
        for key in (
            "num_train_timesteps",
            "beta_schedule",
            "beta_start",
            "beta_end",
            "prediction_type",
        ):
            if key in self.noise_scheduler.config:
                config[key] = self.noise_scheduler.config[key]
        # SD ships clip_sample False; samplers whose default is True (DDIM) must not clip.
        config.setdefault("clip_sample", False)
        scheduler = cls.from_config(config)
        if self.family == "sdxl":
            pipe = diffusers.StableDiffusionXLPipeline(
                vae=self.vae,
                text_encoder=self.text_encoder,
                text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer,
                tokenizer_2=self.tokenizer_2,
                unet=self.unet,
                scheduler=scheduler,
            )
        else:
            pipe = diffusers.StableDiffusionPipeline(
                vae=self.vae,
                text_encoder=self.text_encoder,
                tokenizer=self.tokenizer,
                unet=self.unet,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def to(self, device: str | None = None, dtype: torch.dtype | None = None) -> ModelBundle:
        """Move every module (in place) and return self."""
        device = device or self.device
        dtype = dtype or self.dtype
        for module in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            if module is None:
                continue
            # Cast only when needed: diffusers warns on any dtype .to(), even a no-op.
            if getattr(module, "dtype", dtype) != dtype:
                module.to(dtype=dtype)
            module.to(device)
        self.device, self.dtype = device, dtype
        return self

    def freeze(self) -> ModelBundle:
        """Frozen VAE and text encoder(s) in eval mode; the UNet in eval mode with
        ``requires_grad`` off (trainers switch on what they train)."""
        for module in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            if module is not None:
                module.eval()
                module.requires_grad_(False)
        return self
