"""DreamBooth sets: subject images with one instance prompt, plus optional class-prior images
with the class prompt (prior preservation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .imagefolder import load_plain_folder


def _folder(ref: str, spec: Any) -> Path:
    """``instance``/``prior`` name a dataset of the spec (an image folder: its ``path``), as
    the resolve pass checks; a plain folder path is accepted too."""
    from .types import datasets_of

    target = datasets_of(spec).get(ref) if spec is not None else None
    return Path(target.path) if getattr(target, "path", None) else Path(ref)


def load_dreambooth(ds: Any, resolution: int, channels: int, spec: Any = None) -> Any:
    """The instance pairs of a ``dreambooth`` dataset spec, with the class-prior pairs in
    ``.prior`` when ``prior`` is given. Folders hold plain images (captions come from the
    spec's prompts)."""
    from .types import PairSet

    images, captions = load_plain_folder(
        _folder(ds.instance, spec), ds.instance_prompt, resolution, channels
    )
    prior = None
    if ds.prior:
        p_images, p_captions = load_plain_folder(
            _folder(ds.prior, spec), ds.class_prompt, resolution, channels
        )
        prior = PairSet(images=p_images, captions=p_captions)
    return PairSet(images=images, captions=captions, prior=prior)
