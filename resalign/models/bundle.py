"""``ModelBundle``: the loaded parts of a text-to-image diffusion model, one object for every
step (unlearning, attacks, evaluation, pretraining)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .pipelines import SD3_MAX_SEQUENCE_LENGTH, t5_sequence_length  # noqa: F401 (re-export)

# What ``unet(noisy, timestep=t, **condition)`` needs besides the noisy latents and
# timesteps: ``encoder_hidden_states`` [N, L, D] and, for SDXL, ``added_cond_kwargs`` with
# ``text_embeds`` [N, P] and ``time_ids`` [N, 6]; for SD3 ``pooled_projections`` [N, P];
# for Flux ``pooled_projections`` [N, P] and, guidance-distilled, ``guidance`` [N] (the
# transformer's packed inputs are made at the call: resalign.models.diffusion.predict).
# Built by ModelBundle.encode_condition.
Condition = dict[str, Any]


def as_condition(cond: torch.Tensor | Mapping[str, Any]) -> Condition:
    """A condition from text embeddings alone (models without added conditioning) or a
    full condition mapping (returned as a new dict)."""
    if isinstance(cond, torch.Tensor):
        return {"encoder_hidden_states": cond}
    return dict(cond)


def _map_condition(
    cond: Mapping[str, Any], fn: Callable[[torch.Tensor], torch.Tensor]
) -> Condition:
    return {k: _map_condition(v, fn) if isinstance(v, Mapping) else fn(v) for k, v in cond.items()}


def take_condition(cond: Mapping[str, Any], index: torch.Tensor | slice) -> Condition:
    """The items ``index`` (along the batch dimension) of every tensor of ``cond``."""
    return _map_condition(cond, lambda t: t[index])


def expand_condition(cond: Mapping[str, Any], n: int) -> Condition:
    """A one-item condition (e.g. the empty prompt's) broadcast to ``n`` items (a view)."""
    return _map_condition(cond, lambda t: t.expand(n, *t.shape[1:]))


def condition_to(
    cond: Mapping[str, Any], device: torch.device | str, dtype: torch.dtype | None = None
) -> Condition:
    """Every tensor of ``cond`` moved to ``device`` (and cast to ``dtype``)."""
    return _map_condition(cond, lambda t: t.to(device, dtype))


def cat_conditions(conds: Sequence[Mapping[str, Any]]) -> Condition:
    """Conditions of several batches concatenated along the batch dimension."""
    first = conds[0]
    return {
        k: cat_conditions([c[k] for c in conds])
        if isinstance(v, Mapping)
        else torch.cat([c[k] for c in conds])
        for k, v in first.items()
    }


@dataclass
class ModelBundle:
    """The components of a text-to-image diffusion model plus its training objective.

    ``unet`` is the denoiser: a ``UNet2DConditionModel`` (layouts ``sd``, ``sdxl``) or an
    ``SD3Transformer2DModel`` (layout ``sd3``) or a ``FluxTransformer2DModel`` (layout
    ``flux``, called through :func:`resalign.models.diffusion.predict`). ``layout`` is the diffusers pipeline shape
    (which pipeline class, which conditioning); ``family`` the spec's (``tiny`` models have
    the ``sd`` or ``sd3`` layout). ``noise_scheduler`` is the training scheduler (a
    ``DDPMScheduler`` with the spec's schedule, or SD3's ``FlowMatchEulerDiscreteScheduler``)
    and ``objective`` the training objective built from it
    (:func:`resalign.models.diffusion.objective_for`); generation builds its own sampler via
    :meth:`pipeline`. ``text_encoder_2``/``tokenizer_2`` are set for SDXL and SD3,
    ``text_encoder_3``/``tokenizer_3`` (T5) for SD3; Flux has CLIP-L as ``text_encoder``
    and T5 as ``text_encoder_2``. ``sampler_config`` is the pipeline's own scheduler config
    (what the checkpoint ships), the base for samplers. ``guidance`` is the embedded
    guidance scale a guidance-distilled Flux transformer (FLUX.1-dev: ``guidance_embeds``)
    is trained and unlearned with (``model.training_guidance``); unused otherwise.
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
    text_encoder_3: Any = None
    tokenizer_3: Any = None
    objective: Any = None
    layout: str = ""
    guidance: float | None = None

    def __post_init__(self) -> None:
        from .diffusion import objective_for

        if not self.layout:
            self.layout = "sdxl" if self.family == "sdxl" else "sd"
        if self.objective is None:
            self.objective = objective_for(self.noise_scheduler)

    @property
    def text_encoders(self) -> list[Any]:
        """The text encoders the conditioning uses, in order (SD: one; SDXL: two; SD3:
        CLIP-L, CLIP-G, T5; Flux: CLIP-L, T5)."""
        encoders = [self.text_encoder]
        if self.layout in ("sdxl", "sd3", "flux"):
            encoders.append(self.text_encoder_2)
        if self.layout == "sd3":
            encoders.append(self.text_encoder_3)
        return encoders

    # -- conditioning -----------------------------------------------------------------------

    def tokenize(self, captions: Sequence[str]) -> list[torch.Tensor]:
        """Token ids of ``captions`` for each text encoder (one tensor per tokenizer), padded
        and truncated as the diffusers pipelines do: the CLIP tokenizers to their
        ``model_max_length``, SD3's T5 to :func:`t5_sequence_length`, Flux's to
        :func:`resalign.models.flux.flux_t5_length`."""
        if self.layout == "flux":
            from .flux import flux_t5_length

            tokenizers = [self.tokenizer, self.tokenizer_2]
            lengths = [self.tokenizer.model_max_length, flux_t5_length(self.tokenizer_2)]
        else:
            tokenizers = [self.tokenizer]
            if self.layout in ("sdxl", "sd3"):
                tokenizers.append(self.tokenizer_2)
            lengths = [tok.model_max_length for tok in tokenizers]
        if self.layout == "sd3":
            tokenizers.append(self.tokenizer_3)
            lengths.append(t5_sequence_length(self.tokenizer_3))
        return [
            tok(
                list(captions),
                padding="max_length",
                max_length=length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            for tok, length in zip(tokenizers, lengths)
        ]

    def condition_from_tokens(self, ids: Sequence[torch.Tensor]) -> Condition:
        """The UNet conditioning of token ids from :meth:`tokenize`, computed as the diffusers
        pipeline computes it: SD, the last hidden state; SDXL, the penultimate hidden states
        of both encoders concatenated, ``added_cond_kwargs`` with the second encoder's pooled
        projection and the size/crop time ids ``(r, r, 0, 0, r, r)`` at the model resolution
        (no crop; the pipeline's default at that resolution); SD3, as
        ``StableDiffusion3Pipeline.encode_prompt``: both CLIPs' penultimate hidden states
        concatenated and zero-padded to T5's width, then T5's last hidden state appended
        along the sequence, and ``pooled_projections`` the two CLIPs' projected pooled
        embeddings concatenated; Flux, as ``FluxPipeline.encode_prompt``: T5's last hidden
        state as the sequence, CLIP's pooled output as ``pooled_projections``, and for a
        guidance-distilled transformer ``guidance`` (:attr:`guidance` per item). Gradients
        flow where the text encoders require them (pretraining a tiny model's encoders); use
        :meth:`encode_condition` otherwise."""
        if self.layout == "sd3":
            return self._sd3_condition(ids)
        if self.layout == "flux":
            return self._flux_condition(ids)
        if self.layout != "sdxl":
            return {"encoder_hidden_states": self.text_encoder(ids[0])[0].to(self.dtype)}
        states = []
        pooled = None
        for tokens, enc in zip(ids, (self.text_encoder, self.text_encoder_2)):
            out = enc(tokens, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]  # text_encoder_2 is a CLIPTextModelWithProjection: text_embeds
        assert pooled is not None
        n, r = int(ids[0].shape[0]), self.resolution
        time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=self.dtype, device=self.device)
        return {
            "encoder_hidden_states": torch.cat(states, dim=-1).to(self.dtype),
            "added_cond_kwargs": {
                "text_embeds": pooled.to(self.dtype),
                "time_ids": time_ids.repeat(n, 1),
            },
        }

    def _sd3_condition(self, ids: Sequence[torch.Tensor]) -> Condition:
        states, pooled = [], []
        for tokens, enc in zip(ids[:2], (self.text_encoder, self.text_encoder_2)):
            out = enc(tokens, output_hidden_states=True)
            pooled.append(out[0])  # CLIPTextModelWithProjection: text_embeds
            states.append(out.hidden_states[-2])
        clip = torch.cat(states, dim=-1)
        t5 = self.text_encoder_3(ids[2])[0]
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {
            "encoder_hidden_states": torch.cat([clip, t5.to(clip.dtype)], dim=-2).to(self.dtype),
            "pooled_projections": torch.cat(pooled, dim=-1).to(self.dtype),
        }

    def _flux_condition(self, ids: Sequence[torch.Tensor]) -> Condition:
        pooled = self.text_encoder(ids[0], output_hidden_states=False).pooler_output
        cond: Condition = {
            "encoder_hidden_states": self.text_encoder_2(ids[1])[0].to(self.dtype),
            "pooled_projections": pooled.to(self.dtype),
        }
        if getattr(self.unet.config, "guidance_embeds", False):
            if self.guidance is None:
                raise ValueError("a guidance-distilled Flux model needs ModelBundle.guidance")
            n = int(ids[0].shape[0])
            cond["guidance"] = torch.full((n,), float(self.guidance), device=self.device)
        return cond

    @torch.no_grad()
    def encode_condition(self, captions: Sequence[str]) -> Condition:
        """Everything ``unet(noisy, timestep=t, **cond)`` needs for ``captions``, built once
        here for every step (unlearning, attacks, pretraining; tests check it equals the
        pipeline's own ``encode_prompt``, which generation uses): ``encoder_hidden_states``
        and, for SDXL, ``added_cond_kwargs``, for SD3 ``pooled_projections``, for Flux
        ``pooled_projections`` and (guidance-distilled) ``guidance``. No gradient."""
        return self.condition_from_tokens(self.tokenize(captions))

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """The ``encoder_hidden_states`` part of :meth:`encode_condition` (``[N, L, D]``)."""
        return self.encode_condition(captions)["encoder_hidden_states"]

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
        """A diffusers pipeline of the bundle's layout sharing these modules (no copies,
        :func:`resalign.models.pipelines.assemble_pipeline`), with a fresh sampler of class
        ``scheduler_name`` (a diffusers scheduler class name) configured from the
        checkpoint's scheduler config and, for DDPM models, the training noise schedule. A
        flow-matching model needs a flow-matching sampler (``FlowMatchEulerDiscreteScheduler``)."""
        import diffusers

        from ..errors import UserError
        from .diffusion import is_flow_scheduler
        from .pipelines import assemble_pipeline

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
        flow = is_flow_scheduler(self.noise_scheduler)
        if flow != scheduler_name.startswith("FlowMatch"):
            kind = "a flow-matching" if flow else "a DDPM-trained"
            raise UserError(
                f"sampler {scheduler_name} cannot sample {kind} model ({self.layout})",
                where="evaluate.generation.scheduler",
                hint="use FlowMatchEulerDiscreteScheduler for sd3 and flux models"
                if flow
                else "use a DDPM-family sampler (PNDMScheduler, DPMSolverMultistepScheduler, ...)",
            )
        config = dict(self.sampler_config or {})
        if not flow:
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
        encoders = self.text_encoders
        tokenizers = [self.tokenizer, self.tokenizer_2, self.tokenizer_3][: len(encoders)]
        pipe = assemble_pipeline(
            self.layout,
            denoiser=self.unet,
            vae=self.vae,
            scheduler=scheduler,
            text_encoders=encoders,
            tokenizers=tokenizers,
        )
        if self.layout == "flux":
            # FluxPipeline's default size is a constant (128 latents, 1024 px); the model's
            # resolution is what it was loaded for (model.resolution)
            pipe.default_sample_size = self.resolution // int(pipe.vae_scale_factor)
        return pipe

    def to(self, device: str | None = None, dtype: torch.dtype | None = None) -> ModelBundle:
        """Move every module (in place) and return self."""
        device = device or self.device
        dtype = dtype or self.dtype
        for module in (self.unet, self.vae, *self.text_encoders):
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
        for module in (self.unet, self.vae, *self.text_encoders):
            if module is not None:
                module.eval()
                module.requires_grad_(False)
        return self
