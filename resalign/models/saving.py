"""Outputs plain diffusers loads: a LoRA folder for ``pipe.load_lora_weights(path)`` and a merged
denoiser folder for ``UNet2DConditionModel.from_pretrained(path)`` (SD3:
``SD3Transformer2DModel.from_pretrained(path)``, passed to ``StableDiffusion3Pipeline`` as
``transformer=``; Flux: ``FluxTransformer2DModel``, to ``FluxPipeline``; all safetensors), plus the ``trainable.safetensors`` of trained tensors by
parameter name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_dir, atomic_write_bytes

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def _lora_layers(unet: torch.nn.Module) -> list[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in unet.named_modules() if isinstance(m, LoraLayer)]


def has_lora(unet: torch.nn.Module) -> bool:
    """Whether ``unet`` carries a peft LoRA adapter."""
    return bool(_lora_layers(unet))


def save_lora(unet: torch.nn.Module, path: Path, adapter_name: str = "default") -> Path:
    """Write the denoiser's LoRA as a diffusers LoRA folder
    (``pytorch_lora_weights.safetensors`` in diffusers' key format, with the adapter's peft
    config — rank, alpha, targets — as metadata so alpha ≠ rank reloads at the right scale),
    the way diffusers' training scripts save it: a UNet's through
    ``StableDiffusionPipeline.save_lora_weights`` (converted to diffusers' keys), SD3's
    transformer's through ``StableDiffusion3Pipeline.save_lora_weights``, Flux's through
    ``FluxPipeline.save_lora_weights``.
    ``pipe.load_lora_weights(path)`` then reproduces the trained model. Returns the folder."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    if not has_lora(unet):
        raise ValueError("save_lora: the UNet has no LoRA adapter (use save_merged_unet)")
    owner = {
        "SD3Transformer2DModel": StableDiffusion3Pipeline,
        "FluxTransformer2DModel": FluxPipeline,
    }
    transformer = type(unet).__name__ in owner
    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    if not transformer:
        state = convert_state_dict_to_diffusers(state)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    config = unet.peft_config[adapter_name]
    metadata = config.to_dict()
    # JSON-able: peft stores target_modules as a set.
    metadata = json.loads(
        json.dumps(metadata, default=lambda o: sorted(o) if isinstance(o, set) else str(o))
    )
    path = Path(path)
    with atomic_dir(path) as tmp:
        if transformer:
            owner[type(unet).__name__].save_lora_weights(
                save_directory=str(tmp),
                transformer_lora_layers=state,
                safe_serialization=True,
                weight_name=LORA_WEIGHT_NAME,
                transformer_lora_adapter_metadata=metadata,
            )
        else:
            StableDiffusionPipeline.save_lora_weights(
                save_directory=str(tmp),
                unet_lora_layers=state,
                safe_serialization=True,
                weight_name=LORA_WEIGHT_NAME,
                unet_lora_adapter_metadata=metadata,
            )
        sort_safetensors_metadata(tmp / LORA_WEIGHT_NAME)
    return path


def sort_safetensors_metadata(path: Path) -> None:
    """Rewrite a safetensors file's header with its ``__metadata__`` keys sorted.

    safetensors serialises the metadata from a Rust ``HashMap``, whose order is random per
    map: the LoRA file (two metadata keys, ``format`` and ``lora_adapter_metadata``) came out
    in either order, so two runs with equal tensors wrote different bytes (the CI failure of
    the kill -9 test, reproduced here 1 run in 2). Tensor entries keep their order; the data
    offsets are relative to the end of the header, so only the header is rewritten."""
    import struct

    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.get("__metadata__")
    if not meta:
        return
    header["__metadata__"] = dict(sorted(meta.items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def merged_unet_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's weights with its active LoRA folded in, under the plain UNet's names.

    Reads a live adapter without merging it in place and without copying the model, so
    training can go on after a checkpoint is written (attacks) and memory stays one UNet."""
    state = {k: v.detach().clone() for k, v in unet.state_dict().items() if "lora_" not in k}
    for mod_name, layer in _lora_layers(unet):
        for adapter in layer.active_adapters:
            if adapter not in getattr(layer, "lora_A", {}):
                continue
            key = f"{mod_name}.base_layer.weight"
            state[key] = state[key] + layer.get_delta_weight(adapter).to(state[key].dtype)
    return {k.replace(".base_layer.", "."): v for k, v in state.items()}


def merged_unet(unet: torch.nn.Module) -> torch.nn.Module:
    """A plain denoiser of ``unet``'s class (``UNet2DConditionModel``, SD3's transformer; no
    peft layers) equal to ``unet`` with its active LoRA merged in; ``unet`` itself is left
    untouched. Without LoRA: a detached copy."""
    fresh = type(unet).from_config(unet.config)
    fresh.load_state_dict(merged_unet_state_dict(unet), strict=True)
    p = next(unet.parameters())
    if fresh.dtype != p.dtype:
        # only when needed: diffusers warns on every dtype .to(), even a no-op
        fresh = fresh.to(dtype=p.dtype)
    return fresh.to(p.device).eval()


def save_merged_unet(unet: torch.nn.Module, path: Path) -> Path:
    """Save ``unet`` with its LoRA merged (if any) via ``save_pretrained`` (safetensors) into
    ``path``, written atomically. Returns the folder."""
    merged = merged_unet(unet)
    path = Path(path)
    with atomic_dir(path) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
    return path


def save_trainable(unet: torch.nn.Module, path: Path, names: list[str] | None = None) -> Path:
    """Save tensors by parameter name (default: those with ``requires_grad``; LoRA tensors
    keep their peft names) to a ``.safetensors`` file, atomically. Read back with
    :func:`resalign.models.loading.load_state_file` / ``apply_trained_tensors``."""
    from safetensors.torch import save

    params = dict(unet.named_parameters())
    if names is None:
        names = [n for n, p in params.items() if p.requires_grad]
    state = {n: params[n].detach().to("cpu").contiguous() for n in names}
    path = Path(path)
    atomic_write_bytes(path, save(state))
    return path
