"""A Stable-Diffusion-shaped pipeline small enough for a CPU (``model.family: tiny``).

Every part is the real diffusers / transformers class that SD uses — ``UNet2DConditionModel``,
``AutoencoderKL``, ``CLIPTextModel`` and ``CLIPTokenizer`` — only constructed here from a
config instead of loaded, so tests and the built-in demo run through exactly the code paths a
real checkpoint takes (``StableDiffusionPipeline``, ``save_pretrained``/``from_pretrained``,
LoRA loading).

Design choices (departures from SD, all in construction only):

- Tokenizer: a byte-level BPE vocabulary (every character is a token) plus one merge chain per
  word of the pretraining captions (those words are single tokens), written to a temporary folder as ``vocab.json``/``merges.txt`` and loaded by ``CLIPTokenizer``. No
  download; any text tokenizes. Captions longer than ``max_length`` tokens are truncated as
  CLIP truncates, so ``max_length`` must cover the captions (:func:`caption_token_count`).
- ``latent: pixel``: the VAE is an ``AutoencoderKL`` with one block whose weights are set so
  that encode and decode are the identity up to ~1e-5 (see :func:`_make_identity_vae`), with
  ``scaling_factor`` 1: the diffusion model works on pixels, as small image-space DDPMs do, while
  the pipeline still calls ``vae.encode``/``vae.decode`` like SD.
- ``latent: vae``: a randomly initialised two-block ``AutoencoderKL`` (4 latent channels, 2×
  downsampling). Useful to exercise latent-space code, not to generate recognisable images.
- ``text_time_embedding`` (default on): the UNet also adds an attention-pooled text embedding
  to its timestep embedding (diffusers' ``addition_embed_type="text"``), as class-conditional
  DDPMs add the label; with cross-attention only, a few hundred CPU steps did not teach the
  model to follow the caption.
- The UNet's ``attention_head_dim`` in the spec is the per-head width; diffusers' argument of
  that name is really the head count (a documented naming quirk), so we pass
  ``channels // attention_head_dim`` heads per block.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterable
from functools import reduce
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)

from ..errors import UserError
from ..spec.schema.model import NoiseScheduleSpec, TinyModelSpec
from .pipelines import assemble_pipeline

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

# Identity-VAE constants. ``_BIG`` sets the constant channels that dominate GroupNorm's
# variance (relative error ~ n_channels / (2·_BIG²)); 100 keeps _BIG² inside float16's range.
# ``_SHIFT`` moves values into SiLU's linear region (SiLU(z) = z·(1 − ~e^(−z))).
_BIG = 100.0
_SHIFT = 16.0


def write_byte_tokenizer(folder: Path, max_length: int, words: Iterable[str] = ()) -> CLIPTokenizer:
    """Write a byte-level CLIP vocabulary (256 byte symbols, each also as a word end, plus BOS
    and EOS) to ``folder`` and load it as a ``CLIPTokenizer``.

    Every word in ``words`` (lower-cased, as CLIP lower-cases) also gets a chain of BPE merges
    that makes it one token, the way a tokenizer trained on the pretraining captions would: a
    random text encoder then sees "zero" and "one" as two unrelated embeddings rather than as
    character sequences that share most of their context. Any other text still tokenizes,
    character by character."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for symbol in alphabet:
        vocab[symbol] = len(vocab)
    for symbol in alphabet:
        vocab[symbol + "</w>"] = len(vocab)
    merges: list[str] = []
    byte_symbol = _bytes_to_symbols()
    for word in sorted({w.lower() for w in words if w.strip()}):
        symbols = [byte_symbol[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        current = symbols[0]
        for nxt in symbols[1:]:
            merge = f"{current} {nxt}"
            current += nxt
            if current not in vocab:
                vocab[current] = len(vocab)
                merges.append(merge)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8"
    )
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length
    )


def _bytes_to_symbols() -> dict[int, str]:
    """The reversible byte → printable-symbol table of byte-level BPE (GPT-2, CLIP): printable
    Latin-1 bytes stand for themselves, the others are shifted past 255 in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    shifted = (b for b in range(256) if b not in table)
    for n, b in enumerate(shifted):
        table[b] = chr(256 + n)
    return table


def caption_words(captions: Iterable[str]) -> list[str]:
    """The distinct words of ``captions`` as CLIP's pre-tokenizer splits them (lower-cased)."""
    import re

    return sorted(
        {w for c in captions for w in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", c.lower())}
    )


def caption_token_count(tokenizer: Any, caption: str) -> int:
    """Number of tokens ``caption`` takes, BOS and EOS included (what must fit in
    ``model_max_length`` for nothing to be truncated)."""
    return len(tokenizer(caption, truncation=False).input_ids)


def _norm_groups(channels: list[int]) -> int:
    # GroupNorm needs a group count dividing every width; 8 groups or fewer keeps several
    # channels per group at these widths (32 groups would be instance norm on tiny maps).
    return math.gcd(reduce(math.gcd, channels), 8)


def _checked_widths(tiny: TinyModelSpec) -> list[int]:
    """``block_out_channels``, each a multiple of ``attention_head_dim`` (else a UserError)."""
    widths = list(tiny.block_out_channels)
    if any(w % tiny.attention_head_dim for w in widths):
        raise UserError(
            f"model.tiny.block_out_channels {widths} are not all multiples of "
            f"attention_head_dim {tiny.attention_head_dim}",
            hint="pick widths divisible by attention_head_dim (e.g. [32, 64] with 8)",
        )
    return widths


def build_unet(
    tiny: TinyModelSpec, latent_channels: int, sample_size: int, linear_projection: bool = False
) -> UNet2DConditionModel:
    """The tiny UNet: cross-attention in every down/up block and the mid block.
    ``linear_projection``: linear (not 1×1 conv) projections into the transformers, as SD 2.x
    and SDXL have."""
    widths = _checked_widths(tiny)
    n = len(widths)
    kwargs: dict[str, Any] = {}
    if tiny.text_time_embedding:
        # Attention-pooled text added to the timestep embedding reaches every resnet, so
        # the caption steers the model from the first steps of training (SD has no such
        # path; cross-attention alone needed far more steps than a CPU demo affords).
        kwargs.update(addition_embed_type="text", addition_embed_type_num_heads=4)
    if tiny.text_hidden_size != tiny.cross_attention_dim:
        # diffusers' own projection from the text width to the cross-attention width.
        kwargs.update(encoder_hid_dim=tiny.text_hidden_size, encoder_hid_dim_type="text_proj")
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        block_out_channels=tuple(widths),
        layers_per_block=tiny.layers_per_block,
        attention_head_dim=tuple(w // tiny.attention_head_dim for w in widths),
        cross_attention_dim=tiny.cross_attention_dim,
        norm_num_groups=_norm_groups(widths),
        use_linear_projection=linear_projection,
        **kwargs,
    )


def _text_config(tiny: TinyModelSpec, vocab_size: int) -> CLIPTextConfig:
    heads = max(1, tiny.text_hidden_size // 8)
    while tiny.text_hidden_size % heads:
        heads -= 1
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=tiny.text_hidden_size,
        intermediate_size=2 * tiny.text_hidden_size,
        num_hidden_layers=tiny.text_layers,
        num_attention_heads=heads,
        max_position_embeddings=tiny.max_length,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=tiny.text_hidden_size,
    )


def build_text_encoder(tiny: TinyModelSpec, vocab_size: int) -> CLIPTextModel:
    """A small ``CLIPTextModel`` (random init; the demo keeps it frozen like SD's CLIP)."""
    return CLIPTextModel(_text_config(tiny, vocab_size))


def _make_identity_vae(channels: int, shift_factor: float | None = None) -> AutoencoderKL:
    """A one-block ``AutoencoderKL`` whose encoder mean and decoder are (nearly) the identity.

    Each residual branch (resnets, mid attention) is zeroed so it passes its input through.
    What remains is conv_in → GroupNorm → SiLU → conv_out on each side. conv_in writes
    ``x``, ``−x`` and two constant channels ``±_BIG``: the group mean is then exactly 0 and
    the variance ≈ _BIG²/2·(2/width), so GroupNorm divides by a (nearly) fixed σ which its
    affine weight undoes; its bias adds ``_SHIFT`` so SiLU is linear there, and conv_out
    subtracts it. The encoder's log-variance is pinned at diffusers' floor (−30) so a
    sampled latent equals the mean to ~3e-7.
    """
    width = 2 * channels + 2
    vae = AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        latent_channels=channels,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(width,),
        layers_per_block=1,
        norm_num_groups=1,
        sample_size=8,
        scaling_factor=1.0,
        shift_factor=shift_factor,
        mid_block_add_attention=False,
    )
    sigma = _BIG * math.sqrt(2.0 / width)
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        for module in vae.modules():
            # GroupNorms inside the (zeroed) residual branches keep unit affine weights.
            if isinstance(module, torch.nn.GroupNorm) and module.weight is not None:
                module.weight.fill_(1.0)
        for coder, out_channels in ((vae.encoder, 2 * channels), (vae.decoder, channels)):
            w_in = coder.conv_in.weight  # [width, in, 3, 3]
            for c in range(channels):
                w_in[2 * c, c, 1, 1] = 1.0
                w_in[2 * c + 1, c, 1, 1] = -1.0
            coder.conv_in.bias[2 * channels] = _BIG
            coder.conv_in.bias[2 * channels + 1] = -_BIG
            coder.conv_norm_out.weight.fill_(sigma)
            coder.conv_norm_out.bias.fill_(_SHIFT)
            w_out = coder.conv_out.weight  # [out, width, 3, 3]
            for c in range(channels):
                w_out[c, 2 * c, 1, 1] = 1.0
                coder.conv_out.bias[c] = -_SHIFT
            if coder is vae.encoder:
                coder.conv_out.bias[channels:out_channels] = -30.0
        for conv in (vae.quant_conv, vae.post_quant_conv):
            n = conv.weight.shape[0]
            conv.weight[:, :, 0, 0] = torch.eye(n)
    return vae


def _make_random_vae(
    channels: int, tiny: TinyModelSpec, shift_factor: float | None = None
) -> AutoencoderKL:
    return AutoencoderKL(
        shift_factor=shift_factor,
        in_channels=channels,
        out_channels=channels,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=tiny.sample_size,
    )


def noise_scheduler_from_spec(noise: NoiseScheduleSpec) -> DDPMScheduler:
    """The training scheduler: DDPM with the spec's schedule (SD v1.x defaults otherwise)."""
    noise = noise.filled()
    return DDPMScheduler(
        num_train_timesteps=noise.num_train_timesteps,
        beta_schedule=noise.beta_schedule,
        beta_start=noise.beta_start,
        beta_end=noise.beta_end,
        prediction_type=noise.prediction_type,
        clip_sample=False,
        steps_offset=1,
    )


def sampling_scheduler_from_spec(noise: NoiseScheduleSpec) -> PNDMScheduler:
    """The pipeline's default sampler, configured as SD v1.x ships it (PNDM, PLMS steps)."""
    noise = noise.filled()
    return PNDMScheduler(
        num_train_timesteps=noise.num_train_timesteps,
        beta_schedule=noise.beta_schedule,
        beta_start=noise.beta_start,
        beta_end=noise.beta_end,
        prediction_type=noise.prediction_type,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_tiny_pipeline(
    tiny: TinyModelSpec,
    noise: NoiseScheduleSpec,
    seed: int = 0,
    words: Iterable[str] = (),
    linear_projection: bool = False,
) -> StableDiffusionPipeline:
    """Build a randomly initialised tiny ``StableDiffusionPipeline`` (PNDM sampler, no safety
    checker). ``words`` become single tokens (see :func:`write_byte_tokenizer`). Deterministic
    in ``seed``; the global RNG state is left untouched. SD 2.x-shaped: ``linear_projection``
    and ``noise.prediction_type: v_prediction`` (the 768 models)."""
    channels = tiny.in_channels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with tempfile.TemporaryDirectory(prefix="resalign-tok-") as tmp:
            tokenizer = write_byte_tokenizer(Path(tmp), tiny.max_length, words)
        text_encoder = build_text_encoder(tiny, vocab_size=len(tokenizer))
        if tiny.latent == "pixel":
            vae = _make_identity_vae(channels)
            unet = build_unet(tiny, channels, tiny.sample_size, linear_projection)
        else:
            if tiny.sample_size % 2:
                raise UserError(
                    f"model.tiny.sample_size {tiny.sample_size} must be even for latent 'vae'",
                    hint="the tiny VAE downsamples by 2; use an even sample_size or latent: pixel",
                )
            vae = _make_random_vae(channels, tiny)
            unet = build_unet(tiny, 4, tiny.sample_size // 2, linear_projection)
    return assemble_pipeline(
        "sd",
        denoiser=unet,
        vae=vae,
        scheduler=sampling_scheduler_from_spec(noise),
        text_encoders=[text_encoder],
        tokenizers=[tokenizer],
    )


# SDXL's added conditioning at test width: each of the six size/crop time ids is embedded in
# this many sinusoidal features (SDXL: 256).
SDXL_TIME_EMBED_DIM = 8


def build_tiny_sdxl_unet(
    tiny: TinyModelSpec, latent_channels: int, sample_size: int
) -> UNet2DConditionModel:
    """An SDXL-shaped tiny UNet: SDXL's block layout (no attention in the first level),
    linear projections, cross-attention over both encoders' states concatenated
    (``2 · text_hidden_size``; ``tiny.cross_attention_dim`` is not used) and the
    ``text_time`` added conditioning (pooled text embeds + six time ids)."""
    widths = _checked_widths(tiny)
    n = len(widths)
    down = (
        ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
        if n > 1
        else ("CrossAttnDownBlock2D",)
    )
    up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",) if n > 1 else ("CrossAttnUpBlock2D",)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=tuple(widths),
        layers_per_block=tiny.layers_per_block,
        attention_head_dim=tuple(w // tiny.attention_head_dim for w in widths),
        cross_attention_dim=2 * tiny.text_hidden_size,
        norm_num_groups=_norm_groups(widths),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=tiny.text_hidden_size + 6 * SDXL_TIME_EMBED_DIM,
    )


def build_tiny_sdxl_pipeline(
    tiny: TinyModelSpec, noise: NoiseScheduleSpec, seed: int = 0, words: Iterable[str] = ()
) -> StableDiffusionXLPipeline:
    """A randomly initialised SDXL-shaped ``StableDiffusionXLPipeline`` small enough for a
    CPU: two byte-level tokenizers, a ``CLIPTextModel`` and a ``CLIPTextModelWithProjection``
    (its ``text_embeds`` are SDXL's pooled embeddings), the UNet of
    :func:`build_tiny_sdxl_unet`, the VAE of ``tiny.latent`` (as :func:`build_tiny_pipeline`)
    and SDXL's sampler (Euler, leading spacing). No watermarker. Deterministic in ``seed``;
    the global RNG state is left untouched."""
    noise = noise.filled()
    channels = tiny.in_channels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with tempfile.TemporaryDirectory(prefix="resalign-tok-") as tmp:
            tokenizer = write_byte_tokenizer(Path(tmp) / "1", tiny.max_length, words)
            tokenizer_2 = write_byte_tokenizer(Path(tmp) / "2", tiny.max_length, words)
        text_encoder = CLIPTextModel(_text_config(tiny, len(tokenizer)))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tiny, len(tokenizer_2)))
        if tiny.latent == "pixel":
            vae = _make_identity_vae(channels)
            unet = build_tiny_sdxl_unet(tiny, channels, tiny.sample_size)
        else:
            if tiny.sample_size % 2:
                raise UserError(
                    f"model.tiny.sample_size {tiny.sample_size} must be even for latent 'vae'",
                    hint="the tiny VAE downsamples by 2; use an even sample_size or latent: pixel",
                )
            vae = _make_random_vae(channels, tiny)
            unet = build_tiny_sdxl_unet(tiny, 4, tiny.sample_size // 2)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=noise.num_train_timesteps,
        beta_schedule=noise.beta_schedule,
        beta_start=noise.beta_start,
        beta_end=noise.beta_end,
        prediction_type=noise.prediction_type,
        timestep_spacing="leading",
        steps_offset=1,
    )
    return assemble_pipeline(
        "sdxl",
        denoiser=unet,
        vae=vae,
        scheduler=scheduler,
        text_encoders=[text_encoder, text_encoder_2],
        tokenizers=[tokenizer, tokenizer_2],
    )


# --------------------------------------------------------------------------- SD3-shaped

# The T5 tokenizer's special tokens, at T5's ids (pad 0, eos 1, unk 2).
T5_SPECIALS = ("<pad>", "</s>", "<unk>")


def build_t5_tokenizer(max_length: int, words: Iterable[str] = ()) -> Any:
    """A T5 tokenizer built offline (``transformers.T5Tokenizer`` on a ``tokenizers``
    Unigram model, as T5's own): T5's special tokens and Metaspace pre-tokenizer, every
    printable ASCII character with and without the word-start marker, byte fallback for
    anything else (any text tokenizes), and each word of ``words`` as one piece (the
    pretraining captions' words, as :func:`write_byte_tokenizer`). Appends ``</s>`` as T5
    does. Saves and loads as ``tokenizer.json``."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5Tokenizer

    vocab: list[tuple[str, float]] = [(t, 0.0) for t in T5_SPECIALS]
    vocab += [(f"<0x{b:02X}>", -20.0) for b in range(256)]
    vocab.append(("\u2581", -2.0))
    for c in string.printable.strip():
        vocab += [(c, -5.0), ("\u2581" + c, -5.0)]
    seen = {v for v, _ in vocab}
    for w in sorted({w.lower() for w in words if w.strip()}):
        if "\u2581" + w not in seen:
            vocab.append(("\u2581" + w, -1.0))
            seen.add("\u2581" + w)
    tk = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tk.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5Tokenizer(
        tokenizer_object=tk,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=max_length,
    )


def build_tiny_t5(tiny: TinyModelSpec, vocab_size: int) -> T5EncoderModel:
    """A small T5 v1.1-shaped encoder (gated GELU, as T5-XXL) of width
    ``2 · text_hidden_size`` (SD3 pads the two CLIPs' concatenated states to T5's width, so
    it must be at least that), no dropout (pretraining draws nothing from the global RNG)."""
    d = 2 * tiny.text_hidden_size
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=d,
            d_kv=8,
            d_ff=2 * d,
            num_layers=tiny.text_layers,
            num_heads=max(1, d // 8),
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def build_tiny_sd3_transformer(
    tiny: TinyModelSpec, latent_channels: int, sample_size: int
) -> SD3Transformer2DModel:
    """An SD3.5-shaped tiny ``SD3Transformer2DModel``: ``transformer_layers`` joint blocks
    (the last one context-pre-only, as SD3's) of width ``cross_attention_dim`` in heads of
    ``attention_head_dim``, RMS q/k norm (SD 3.5), patch 2, text width ``2 · text_hidden_size``
    (T5's), pooled width ``2 · text_hidden_size`` (the two CLIPs' projections)."""
    width, head = tiny.cross_attention_dim, tiny.attention_head_dim
    if width % head:
        raise UserError(
            f"model.tiny.cross_attention_dim {width} is not a multiple of attention_head_dim "
            f"{head}",
            hint="the SD3 transformer's width is heads x head width; pick e.g. 32 and 8",
        )
    if sample_size % 2:
        raise UserError(
            f"model.tiny.sample_size {sample_size} must be even for architecture sd3 (patch 2)",
            hint="use an even sample_size",
        )
    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=tiny.transformer_layers,
        attention_head_dim=head,
        num_attention_heads=width // head,
        joint_attention_dim=2 * tiny.text_hidden_size,
        caption_projection_dim=width,
        pooled_projection_dim=2 * tiny.text_hidden_size,
        pos_embed_max_size=sample_size // 2,
        qk_norm="rms_norm",
    )


def build_tiny_sd3_pipeline(
    tiny: TinyModelSpec, seed: int = 0, words: Iterable[str] = ()
) -> StableDiffusion3Pipeline:
    """A randomly initialised SD3-shaped ``StableDiffusion3Pipeline`` small enough for a CPU:
    two byte-level CLIP tokenizers with ``CLIPTextModelWithProjection`` encoders (CLIP-L and
    CLIP-G's roles), a T5 tokenizer and encoder (:func:`build_t5_tokenizer`,
    :func:`build_tiny_t5`), the transformer of :func:`build_tiny_sd3_transformer`, the VAE
    of ``tiny.latent`` (with ``shift_factor`` 0, which the SD3 pipeline reads) and a
    ``FlowMatchEulerDiscreteScheduler`` of shift ``tiny.flow_shift``. Deterministic in
    ``seed``; the global RNG state is left untouched."""
    channels = tiny.in_channels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with tempfile.TemporaryDirectory(prefix="resalign-tok-") as tmp:
            tokenizer = write_byte_tokenizer(Path(tmp) / "1", tiny.max_length, words)
            tokenizer_2 = write_byte_tokenizer(Path(tmp) / "2", tiny.max_length, words)
        tokenizer_3 = build_t5_tokenizer(tiny.max_length, words)
        text_encoder = CLIPTextModelWithProjection(_text_config(tiny, len(tokenizer)))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tiny, len(tokenizer_2)))
        text_encoder_3 = build_tiny_t5(tiny, len(tokenizer_3))
        if tiny.latent == "pixel":
            vae = _make_identity_vae(channels, shift_factor=0.0)
            transformer = build_tiny_sd3_transformer(tiny, channels, tiny.sample_size)
        else:
            if tiny.sample_size % 4:
                raise UserError(
                    f"model.tiny.sample_size {tiny.sample_size} must be a multiple of 4 for "
                    "latent 'vae' with architecture sd3",
                    hint="the tiny VAE downsamples by 2 and the transformer patches by 2",
                )
            vae = _make_random_vae(channels, tiny, shift_factor=0.0)
            transformer = build_tiny_sd3_transformer(tiny, 4, tiny.sample_size // 2)
    return assemble_pipeline(
        "sd3",
        denoiser=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=tiny.flow_shift),
        text_encoders=[text_encoder, text_encoder_2, text_encoder_3],
        tokenizers=[tokenizer, tokenizer_2, tokenizer_3],
    )


def build_tiny(
    tiny: TinyModelSpec, noise: NoiseScheduleSpec, seed: int = 0, words: Iterable[str] = ()
) -> Any:
    """The ``tiny`` family's model of ``tiny.architecture``: SD-shaped
    (:func:`build_tiny_pipeline`, DDPM schedule ``noise``) or SD3-shaped
    (:func:`build_tiny_sd3_pipeline`, flow matching)."""
    if tiny.architecture == "sd3":
        return build_tiny_sd3_pipeline(tiny, seed, words)
    return build_tiny_pipeline(tiny, noise, seed, words)


def write_tiny_pipeline(
    folder: Path,
    layout: str = "sd",
    *,
    tiny: TinyModelSpec | None = None,
    noise: NoiseScheduleSpec | None = None,
    seed: int = 0,
    words: Iterable[str] = (),
) -> Path:
    """Build a random-weight tiny pipeline and save it as a diffusers folder (safetensors)
    that ``model.family`` ``sd`` (layouts ``sd``, ``sd2``), ``sdxl`` or ``sd3`` loads from
    ``model.pretrained``. ``sd2``: SD 2.x-shaped (linear projections, v-prediction unless
    ``noise`` says otherwise); ``sd3``: :func:`build_tiny_sd3_pipeline` (``noise`` unused).
    ``tiny``/``noise`` default to :class:`TinyModelSpec` and SD v1.4's schedule. Returns
    ``folder``."""
    tiny = tiny or TinyModelSpec()
    noise = noise or NoiseScheduleSpec()
    if layout == "sd3":
        pipe: Any = build_tiny_sd3_pipeline(tiny, seed, words)
    elif layout == "sdxl":
        pipe = build_tiny_sdxl_pipeline(tiny, noise, seed, words)
    elif layout in ("sd", "sd2"):
        if layout == "sd2" and noise.prediction_type is None:
            noise = noise.model_copy(update={"prediction_type": "v_prediction"})
        pipe = build_tiny_pipeline(tiny, noise, seed, words, linear_projection=layout == "sd2")
    else:
        raise ValueError(f"unknown tiny layout {layout!r} (sd, sd2, sdxl, sd3)")
    folder = Path(folder)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder
