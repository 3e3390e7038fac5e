"""Random-weight pipelines of the real families' layouts for rehearsals (SD v1.x, SDXL,
SD 3.5, FLUX.1), at toy or published width; the builders import torch inside."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UserError

# SD v1.x VAE (AutoencoderKL of CompVis/stable-diffusion-v1-4, also SDXL's layout).
_SD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
# CLIP ViT-L/14's text tower (SD v1.x's text encoder).
_CLIP_L_TEXT: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
_TOY_TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
}


def build_pipeline(family: str, scale: str, folder: Path, pretrained: str = "") -> None:
    """Save a random-weight pipeline of ``family`` (``sd``, ``sdxl``, ``sd3`` or ``flux``) at
    ``scale`` (``toy`` or ``full``; ``full`` for ``sd`` and ``flux``) as a diffusers folder. Deterministic
    (seed 0).

    SD v1.x: SD v1.4's UNet block layout (``resalign.models.sd_arch``), CLIP text encoder,
    byte-level CLIP tokenizer (77 tokens), 4-block ``AutoencoderKL`` (8× down), PNDM
    sampler. ``toy``: widths 16–32, 64-px images (8×8 latents); ``full``: the published
    widths at 512 px (64×64 latents). The tokenizer's vocabulary is byte-level (~500 tokens),
    so the text encoder's embedding table is smaller than CLIP's 49,408 rows: the only
    departure from the published layout at ``full`` scale.
    """
    if family == "sdxl":
        return _build_sdxl(scale, folder)
    if family == "sd3":
        return _build_sd3(scale, folder)
    if family == "flux":
        return _build_flux(scale, folder)
    if family != "sd":
        raise ValueError(f"no rehearsal model for family {family!r}")
    if any(k in pretrained.lower() for k in ("stable-diffusion-2", "sd2", "sd-2")):
        raise UserError(
            f"rehearsal of SD 2.x ({pretrained}) is not built yet: its OpenCLIP text encoder "
            "(1024-d), linear-projection attention and v-prediction differ from SD v1.x",
            hint="rehearse an SD v1.x or SDXL spec",
        )
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..models import sd_arch
    from ..models.pipelines import assemble_pipeline
    from ..models.tiny import sampling_scheduler_from_spec, write_byte_tokenizer
    from ..spec.schema.model import NoiseScheduleSpec

    text = dict(_CLIP_L_TEXT if scale == "full" else _TOY_TEXT)
    unet_cfg = sd_arch.unet_config("sd14")
    vae_cfg = dict(_SD_VAE)
    if scale == "toy":
        unet_cfg.update(
            sample_size=8,
            block_out_channels=[16, 32, 32, 32],
            norm_num_groups=8,
            attention_head_dim=4,
            cross_attention_dim=text["hidden_size"],
        )
        vae_cfg.update(block_out_channels=[8, 8, 16, 16], norm_num_groups=8, sample_size=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tokenizer = write_byte_tokenizer(folder / "_tok", 77)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                max_position_embeddings=77,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
                **text,
            )
        )
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
    pipe = assemble_pipeline(
        "sd",
        denoiser=unet,
        vae=vae,
        scheduler=sampling_scheduler_from_spec(NoiseScheduleSpec()),
        text_encoders=[text_encoder],
        tokenizers=[tokenizer],
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    import shutil

    shutil.rmtree(folder / "_tok", ignore_errors=True)


def _build_sdxl(scale: str, folder: Path) -> None:
    """SDXL-shaped pipeline at toy width: ``resalign.models.tiny``'s SDXL UNet (SDXL's block
    layout, linear projections, ``text_time`` added conditioning over both encoders) and its
    two text encoders (the second with projection: the pooled embeddings), with 77-token
    tokenizers and an SDXL-layout 4-block VAE (8x down, scaling 0.13025) at 64 px."""
    if scale != "toy":
        raise UserError(
            "the SDXL rehearsal is available at toy scale only",
            hint="use --rehearse-profile toy",
        )
    import torch
    from diffusers import AutoencoderKL

    from ..models.pipelines import assemble_pipeline
    from ..models.tiny import build_tiny_sdxl_pipeline, build_tiny_sdxl_unet
    from ..spec.schema.model import NoiseScheduleSpec, TinyModelSpec

    tiny = TinyModelSpec(
        sample_size=16,
        in_channels=3,
        block_out_channels=[16, 32, 32],
        layers_per_block=2,
        attention_head_dim=8,
        text_hidden_size=32,
        max_length=77,
        latent="vae",
    )
    base = build_tiny_sdxl_pipeline(tiny, NoiseScheduleSpec(), seed=0)
    vae_cfg = dict(_SD_VAE, block_out_channels=[8, 8, 16, 16], norm_num_groups=8)
    vae_cfg.update(sample_size=64, scaling_factor=0.13025)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        unet = build_tiny_sdxl_unet(tiny, 4, 8)
        vae = AutoencoderKL(**vae_cfg)
    pipe = assemble_pipeline(
        "sdxl",
        denoiser=unet,
        vae=vae,
        scheduler=base.scheduler,
        text_encoders=[base.text_encoder, base.text_encoder_2],
        tokenizers=[base.tokenizer, base.tokenizer_2],
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)


# SD 3.5 Medium's layout (the transformer/, vae/ and text encoders' configs of
# stabilityai/stable-diffusion-3.5-medium): MM-DiT joint blocks with RMS q/k norm, the first
# 13 with a second (dual) image self-attention, patch 2, T5 text width 4096, pooled
# CLIP-L + CLIP-G 768 + 1280; a 16-channel VAE with scaling 1.5305 and shift 0.0609.
SD35_MEDIUM_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
    "dual_attention_layers": tuple(range(13)),
}
_SD3_VAE: dict[str, Any] = {
    **_SD_VAE,
    "latent_channels": 16,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


def _build_sd3(scale: str, folder: Path) -> None:
    """The SD 3.5-shaped toy pipeline (:func:`build_sd3_toy_pipeline`) saved as a diffusers
    folder."""
    if scale != "toy":
        raise UserError(
            "the SD3 rehearsal is available at toy scale only",
            hint="use --rehearse-profile toy",
        )
    pipe = build_sd3_toy_pipeline(folder)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    import shutil

    for i in (1, 2):
        shutil.rmtree(folder / f"_tok{i}", ignore_errors=True)


def build_sd3_toy_pipeline(tmp: Path, seed: int = 0) -> Any:
    """SD 3.5-shaped pipeline at toy width: the transformer's block types of SD 3.5 Medium
    (joint blocks with RMS q/k norm, the first a dual-attention block, the last
    context-pre-only; 3 blocks of width 16), CLIP-L and CLIP-G roles as two
    ``CLIPTextModelWithProjection`` (width 32) with 77-token byte-level tokenizers, a T5
    v1.1-shaped encoder (width 64) with an offline Unigram tokenizer (256 tokens: the
    pipeline's default sequence), an SD3-layout 16-channel VAE (8× down, scaling and shift
    as published) at 64 px, and a ``FlowMatchEulerDiscreteScheduler`` with SD3's shift 3.
    ``tmp`` holds the CLIP tokenizers' files (``_tok1``, ``_tok2``). Deterministic in
    ``seed`` (the rehearsal's is 0)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from ..models.pipelines import assemble_pipeline
    from ..models.tiny import build_t5_tokenizer, build_tiny_t5, write_byte_tokenizer
    from ..spec.schema.model import TinyModelSpec

    text = dict(_TOY_TEXT)
    t5 = TinyModelSpec(text_hidden_size=text["hidden_size"], text_layers=2)
    transformer_cfg = dict(
        SD35_MEDIUM_TRANSFORMER,
        sample_size=8,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=2 * text["hidden_size"],
        pooled_projection_dim=2 * text["projection_dim"],
        pos_embed_max_size=8,
        dual_attention_layers=(0,),
    )
    vae_cfg = dict(_SD3_VAE, block_out_channels=[8, 8, 16, 16], norm_num_groups=8, sample_size=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizers = [write_byte_tokenizer(Path(tmp) / f"_tok{i}", 77) for i in (1, 2)]
        tokenizers.append(build_t5_tokenizer(256))
        encoders = [
            CLIPTextModelWithProjection(
                CLIPTextConfig(
                    vocab_size=len(tok),
                    max_position_embeddings=77,
                    bos_token_id=0,
                    eos_token_id=1,
                    pad_token_id=1,
                    **text,
                )
            )
            for tok in tokenizers[:2]
        ]
        encoders.append(build_tiny_t5(t5, len(tokenizers[2])))
        transformer = SD3Transformer2DModel(**transformer_cfg)
        vae = AutoencoderKL(**vae_cfg)
    return assemble_pipeline(
        "sd3",
        denoiser=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoders=encoders,
        tokenizers=tokenizers,
    )


# FLUX.1-dev's layout (the transformer/, vae/, text encoders' and scheduler's configs of
# black-forest-labs/FLUX.1-dev): 19 double-stream and 38 single-stream blocks of 24 heads of
# 128, rotary axes (16, 56, 56), packed 16-channel latents (64 inputs), T5-XXL's 4096-wide
# sequence, CLIP-L's 768-wide pooled output, guidance embeddings (the guidance-distilled
# variant; schnell has none); a 16-channel VAE with scaling 0.3611 and shift 0.1159; the
# flow scheduler with resolution-dependent shifting between 256 and 4096 tokens.
FLUX1_DEV_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
_FLUX_VAE: dict[str, Any] = {
    **_SD_VAE,
    "latent_channels": 16,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
FLUX1_DEV_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
# T5 v1.1 XXL (FLUX.1's text_encoder_2).
_T5_XXL: dict[str, Any] = {
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
}
# The rehearsal model's image size: 64 px (8x8 latents, 16 tokens) or 512 px (1024 tokens).
FLUX_REHEARSAL_RESOLUTION = {"toy": 64, "full": 512}


def flux_configs(scale: str) -> dict[str, dict[str, Any]]:
    """The component configs of the FLUX.1 rehearsal model at ``scale``: ``toy`` (widths
    8–64: 2 double- and 2 single-stream blocks of 2 heads of 8, rotary axes (2, 2, 4), a
    2-layer CLIP of width 32 and T5 of width 64, VAE widths 8–16) or ``full`` (FLUX.1-dev's
    widths with 2 double- and 2 single-stream blocks, CLIP-L's text tower, T5-XXL's widths
    with 2 layers, the published VAE). Keys ``transformer``, ``clip``, ``t5``, ``vae``,
    ``scheduler``."""
    if scale == "toy":
        clip = dict(_TOY_TEXT)
        clip.pop("projection_dim")
        t5 = {"d_model": 64, "d_kv": 8, "d_ff": 128, "num_heads": 8,
              "relative_attention_num_buckets": 8, "relative_attention_max_distance": 32}  # fmt: skip
        transformer = dict(
            FLUX1_DEV_TRANSFORMER,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=t5["d_model"],
            pooled_projection_dim=clip["hidden_size"],
            axes_dims_rope=(2, 2, 4),
        )
        vae = dict(_FLUX_VAE, block_out_channels=[8, 8, 16, 16], norm_num_groups=8)
        t5_layers = 2
    elif scale == "full":
        clip = {k: v for k, v in _CLIP_L_TEXT.items() if k != "projection_dim"}
        t5 = dict(_T5_XXL)
        transformer = dict(FLUX1_DEV_TRANSFORMER, num_layers=2, num_single_layers=2)
        vae = dict(_FLUX_VAE)
        t5_layers = 2
    else:
        raise ValueError(scale)
    vae["sample_size"] = FLUX_REHEARSAL_RESOLUTION[scale]
    t5.update(num_layers=t5_layers, feed_forward_proj="gated-gelu", dropout_rate=0.0,
              pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)  # fmt: skip
    return {
        "transformer": transformer,
        "clip": clip,
        "t5": t5,
        "vae": vae,
        "scheduler": dict(FLUX1_DEV_SCHEDULER),
    }


def build_flux_pipeline(
    cfg: dict[str, dict[str, Any]], tmp: Path, t5_length: int | None = None, seed: int = 0
) -> Any:
    """A random-weight ``FluxPipeline`` of the component configs ``cfg``
    (:func:`flux_configs`): a ``FluxTransformer2DModel`` of the published block types
    (double-stream blocks with RMS q/k norm, single-stream blocks with the parallel MLP,
    guidance embeddings where the config says so), a ``CLIPTextModel`` with a 77-token
    byte-level tokenizer, a T5 v1.1-shaped encoder with an offline Unigram tokenizer of
    ``t5_length`` tokens (default 512: FluxPipeline's sequence), a 16-channel FLUX VAE and
    the config's scheduler. ``tmp`` is a scratch folder for the CLIP tokenizer's files.
    Deterministic in ``seed``."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from ..models.flux import FLUX_MAX_SEQUENCE_LENGTH
    from ..models.pipelines import assemble_pipeline
    from ..models.tiny import build_t5_tokenizer, write_byte_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip_tok = write_byte_tokenizer(Path(tmp), 77)
        t5_tok = build_t5_tokenizer(t5_length or FLUX_MAX_SEQUENCE_LENGTH)
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(clip_tok),
                max_position_embeddings=77,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
                **cfg["clip"],
            )
        )
        t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), **cfg["t5"]))
        transformer = FluxTransformer2DModel(**cfg["transformer"])
        vae = AutoencoderKL(**cfg["vae"])
    return assemble_pipeline(
        "flux",
        denoiser=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(**cfg["scheduler"]),
        text_encoders=[clip, t5],
        tokenizers=[clip_tok, t5_tok],
    )


def _build_flux(scale: str, folder: Path) -> None:
    """FLUX.1-dev-shaped pipeline (:func:`flux_configs`, :func:`build_flux_pipeline`) saved
    as a diffusers folder."""
    import shutil

    pipe = build_flux_pipeline(flux_configs(scale), folder / "_tok")
    pipe.save_pretrained(str(folder), safe_serialization=True)
    shutil.rmtree(folder / "_tok", ignore_errors=True)
