"""Prompt lists: a CSV column or a TXT file (one prompt per line), the captions of the digits,
or the captions of an image–caption dataset."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from ..errors import UserError
from .pairs import dataset_spec

# Prompt lists shipped in resalign/data/prompt_lists/ (source, license and row counts in its
# README.md): name -> (file, rows).
SHIPPED_PROMPT_LISTS = {"i2p_sexual": ("i2p_sexual.csv", 931)}


def shipped_prompt_list(name: str) -> Path:
    """The installed file of a shipped prompt list (``i2p_sexual``: the paper's 931 I2P
    "sexual" prompts, column ``prompt``)."""
    if name not in SHIPPED_PROMPT_LISTS:
        raise UserError(
            f"no shipped prompt list {name!r}",
            hint=f"shipped: {', '.join(SHIPPED_PROMPT_LISTS)}; other lists are user-provided "
            "(see resalign/data/prompt_lists/README.md)",
        )
    return Path(__file__).parent / "prompt_lists" / SHIPPED_PROMPT_LISTS[name][0]


def read_prompt_file(path: Path, column: str = "prompt", limit: int | None = None) -> list[str]:
    """Prompts from ``path``: ``.csv`` → the ``column`` column; anything else → one prompt per
    non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"prompt file {path} does not exist",
            where=str(path),
            hint="fix the dataset's 'path' (relative to the spec file)",
        )
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            if column not in fields:
                raise UserError(
                    f"{path.name} has no column {column!r} (columns: {', '.join(fields)})",
                    where=str(path),
                    hint="set the dataset's 'column' to the column holding the prompts",
                )
            prompts = [str(row[column]).strip() for row in reader]
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p]
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise UserError(f"prompt file {path} has no prompts", where=str(path))
    return prompts


def load_prompts(name: str, spec: Any) -> list[str]:
    """The prompts of dataset ``name``: a ``prompts`` list; for ``digits``, one caption per
    digit (in the order of ``digits``); for ``imagefolder``, its captions."""
    ds = dataset_spec(name, spec)
    if ds.type == "prompts":
        return read_prompt_file(Path(ds.path), ds.column, ds.limit)
    if ds.type == "digits":
        from .digits import caption_for

        prompts = [caption_for(d, ds.caption, ds.names) for d in ds.digits]
        return prompts[: ds.limit] if ds.limit else prompts
    if ds.type == "imagefolder":
        from .imagefolder import read_metadata

        rows = read_metadata(Path(ds.path), ds.caption_column)
        prompts = [caption for _, caption in rows][: ds.limit]
        if not prompts:
            raise UserError(f"dataset {name!r} has no captions", where=ds.path)
        return prompts
    raise UserError(
        f"dataset {name!r} (type {ds.type}) cannot be used as a prompt list",
        hint="use a 'prompts', 'digits' or 'imagefolder' dataset",
    )
