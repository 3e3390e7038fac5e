"""Loading local CLIP models (transformers ``save_pretrained`` folders) for metrics."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from ...errors import UserError


@lru_cache(maxsize=2)
def load_clip(path: str) -> tuple[Any, Any]:
    """``(CLIPModel, CLIPProcessor)`` from a local folder, offline, in eval mode."""
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(path)
    if not (folder / "config.json").exists():
        raise UserError(
            f"no CLIP model at {folder} (expected a transformers save_pretrained folder with "
            "config.json, weights and the processor files)",
            hint="download it once, e.g. `hf download openai/clip-vit-large-patch14 "
            f"--local-dir {folder}`, and point the metric's clip_path at that folder",
        )
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the CLIP model in {folder}: {exc}") from exc
    return model, processor


def image_features(path: str, images: list[Any], batch_size: int = 32) -> Any:
    """L2-normalised CLIP image embeddings, float32 [N, D]."""
    import torch

    model, processor = load_clip(path)
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            pix = processor(
                images=[im.convert("RGB") for im in images[i : i + batch_size]], return_tensors="pt"
            )
            f = model.get_image_features(pixel_values=pix["pixel_values"])
            f = getattr(f, "pooler_output", f)
            out.append(torch.nn.functional.normalize(f.float(), dim=-1))
    return torch.cat(out)


def text_features(path: str, texts: list[str], batch_size: int = 64) -> Any:
    """L2-normalised CLIP text embeddings, float32 [N, D] (truncated to the model's length)."""
    import torch

    model, processor = load_clip(path)
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            tok = processor.tokenizer(
                texts[i : i + batch_size], padding=True, truncation=True, return_tensors="pt"
            )
            f = model.get_text_features(
                input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]
            )
            f = getattr(f, "pooler_output", f)
            out.append(torch.nn.functional.normalize(f.float(), dim=-1))
    return torch.cat(out)
