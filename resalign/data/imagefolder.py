"""Image–caption folders in Hugging Face ``imagefolder`` layout (``metadata.csv`` or
``metadata.jsonl`` with a ``file_name`` column and a caption column), and plain folders of
images (every image gets one fixed caption, as DreamBooth sets do)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write_text
from ..errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def read_metadata(folder: Path, caption_column: str) -> list[tuple[str, str]]:
    """``(file_name, caption)`` rows of an imagefolder's metadata, in file order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(
            f"image folder {folder} does not exist",
            where=str(folder),
            hint="fix the dataset's 'path' (relative paths are relative to the spec file)",
        )
    csv_path, jsonl_path = folder / "metadata.csv", folder / "metadata.jsonl"
    rows: list[dict[str, object]] = []
    if jsonl_path.is_file():
        meta = jsonl_path
        for lineno, line in enumerate(jsonl_path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"invalid JSON: {exc.msg}",
                    where=f"{jsonl_path}:{lineno}",
                    hint="each line of metadata.jsonl must be one JSON object",
                ) from None
            if not isinstance(row, dict):
                raise UserError("expected a JSON object", where=f"{jsonl_path}:{lineno}")
            rows.append(row)
    elif csv_path.is_file():
        meta = csv_path
        with csv_path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        raise UserError(
            f"image folder {folder} has no metadata.csv or metadata.jsonl",
            where=str(folder),
            hint="add metadata.csv (columns file_name,<caption column>) or metadata.jsonl, as "
            "Hugging Face imagefolder datasets have",
        )
    columns: set[str] = set()
    for row in rows:
        columns.update(row)
    for needed in ("file_name", caption_column):
        if rows and needed not in columns:
            raise UserError(
                f"{meta.name} has no column {needed!r} (columns: {', '.join(sorted(columns))})",
                where=str(meta),
                hint="set the dataset's caption_column to one of the columns"
                if needed == caption_column
                else "the image file names must be in a 'file_name' column",
            )
    out: list[tuple[str, str]] = []
    for i, row in enumerate(rows):
        name, caption = row.get("file_name"), row.get(caption_column)
        if not name or caption is None:
            raise UserError(f"row {i + 1} lacks file_name or {caption_column!r}", where=str(meta))
        out.append((str(name), str(caption)))
    return out


def load_image(path: Path, resolution: int, channels: int) -> torch.Tensor:
    """One image as float ``[C, H, W]`` in [-1, 1]: resized so the short side is
    ``resolution`` then centre-cropped (as SD fine-tuning scripts do); ``channels`` 1 → L,
    3 → RGB, 4 → RGBA."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"image file {path} does not exist",
            where=str(path),
            hint="fix the file_name in the metadata or add the image",
        )
    try:
        with Image.open(path) as img:
            img.load()
            mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(channels)
            if mode is None:
                raise UserError(f"cannot load images with {channels} channels")
            img = img.convert(mode)
            w, h = img.size
            scale = resolution / min(w, h)
            if scale != 1:
                img = img.resize(
                    (max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                    Image.Resampling.BICUBIC,
                )
            w, h = img.size
            left, top = (w - resolution) // 2, (h - resolution) // 2
            img = img.crop((left, top, left + resolution, top + resolution))
            arr = np.asarray(img, dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(
            f"cannot read image {path}: {exc}",
            where=str(path),
            hint="replace or remove the file (and its metadata row)",
        ) from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def load_imagefolder(
    folder: Path, caption_column: str, resolution: int, channels: int, limit: int | None = None
) -> tuple[torch.Tensor, list[str]]:
    """Images ``[N, C, H, W]`` in [-1, 1] and captions of an imagefolder."""
    rows = read_metadata(Path(folder), caption_column)
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise UserError(
            f"image folder {folder} has no items",
            where=str(folder),
            hint="add images and metadata rows",
        )
    images = [load_image(Path(folder) / name, resolution, channels) for name, _ in rows]
    return torch.stack(images), [caption for _, caption in rows]


def load_plain_folder(
    folder: Path, caption: str, resolution: int, channels: int
) -> tuple[torch.Tensor, list[str]]:
    """Every image of a folder (sorted by name), each captioned ``caption``. A folder with
    imagefolder metadata is read through it instead, with its ``text`` column ignored in
    favour of ``caption`` only when that column is absent."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist", where=str(folder))
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(
            f"image folder {folder} has no images",
            where=str(folder),
            hint=f"add images ({', '.join(sorted(IMAGE_SUFFIXES))})",
        )
    images = [load_image(p, resolution, channels) for p in files]
    return torch.stack(images), [caption] * len(files)


def write_imagefolder(
    folder: Path, images: torch.Tensor, captions: list[str], extra: list[dict] | None = None
) -> None:
    """Write images ``[N, C, H, W]`` in [-1, 1] as PNGs plus ``metadata.jsonl`` (``file_name``,
    ``text`` and optional extra fields per row); the metadata is written last, atomically."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arr = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    lines = []
    for i, (img, caption) in enumerate(zip(arr, captions)):
        name = f"{i:05d}.png"
        hwc = img.permute(1, 2, 0).numpy()
        pil = Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc)
        pil.save(folder / name)
        row = {"file_name": name, "text": caption}
        if extra is not None:
            row.update(extra[i])
        lines.append(json.dumps(row))
    atomic_write_text(folder / "metadata.jsonl", "\n".join(lines) + "\n")
