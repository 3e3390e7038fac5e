"""Stand-in assets of a rehearsal: built once per folder, deterministically (stand-in
prompt lists and image folders, random metric weights, a random CLIP)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def _once(folder: Path, build: Any) -> None:
    """Build a folder asset into a temporary sibling and rename it into place, once."""
    import shutil

    if folder.is_dir():
        return
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)


def _once_file(path: Path, build: Any) -> None:
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    build(tmp)
    os.replace(tmp, path)


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


# Neutral stand-in prompts: the rehearsal checks shapes and plumbing, not content.
_STAND_IN_PROMPTS = [
    "a photo of a person standing on a beach",
    "a portrait of a woman in a garden, oil painting",
    "a man reading a book in a library",
    "two people walking in a park at sunset",
    "a dancer on a stage, studio lighting",
    "a person sitting by a window, soft light",
]


def write_prompts(path: Path, name: str, column: str) -> None:
    """A stand-in prompt list (CSV with ``column``)."""
    import csv

    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=[column])
        w.writeheader()
        for p in _STAND_IN_PROMPTS:
            w.writerow({column: f"{p} ({name})"})


def write_images(folder: Path, name: str, caption_column: str, n: int, size: int = 64) -> None:
    """``n`` synthesised images (smooth random colour fields, deterministic in ``name``) with
    captions in ``metadata.jsonl`` under ``caption_column``; plain image folders (DreamBooth
    sets) read the same files and ignore the metadata."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(_seed(name))
    rows = []
    for i in range(n):
        coarse = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
        img = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        fname = f"{i:03d}.png"
        img.save(folder / fname)
        rows.append(
            json.dumps({"file_name": fname, caption_column: f"a stand-in photo {i} ({name})"})
        )
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")


def build_weights(path: Path, what: str) -> None:
    """Random weights of the same architecture as a metric's missing file."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if what == "inception":
            from ..evaluation.metrics.fid import _build_inception

            state = _build_inception().state_dict()
        elif what == "head":
            # The published MHSC head: Linear(768, 384) → ReLU → Dropout → BatchNorm1d → Linear.
            head = torch.nn.Sequential(
                torch.nn.Linear(768, 384),
                torch.nn.ReLU(),
                torch.nn.Dropout(0.5),
                torch.nn.BatchNorm1d(384),
                torch.nn.Linear(384, 1),
            )
            state = head.state_dict()
        elif what == "q16":
            # Q16's probe: two prompt embeddings in CLIP ViT-L/14's 768-d space
            state = torch.randn(2, 768)
        else:
            raise ValueError(what)
    torch.save(state, path)


def build_clip(folder: Path, projection_dim: int) -> None:
    """A small random ``CLIPModel`` + ``CLIPProcessor`` folder whose embeddings have the
    published width (768: ViT-L/14, 512: ViT-B/32), so heads sized for them load."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from ..models.tiny import write_byte_tokenizer

    tok = write_byte_tokenizer(folder / "_tok", 77)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=projection_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(config)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(str(folder))
    model.save_pretrained(str(folder), safe_serialization=True)
    import shutil

    shutil.rmtree(folder / "_tok", ignore_errors=True)
