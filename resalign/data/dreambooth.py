"""DreamBooth sets: subject images with one instance prompt, plus optional class-prior images
with the class prompt (prior preservation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .imagefolder import load_plain_folder


def load_dreambooth(ds: Any, resolution: int, channels: int) -> Any:
    """The instance pairs of a ``dreambooth`` dataset spec, with the class-prior pairs in
    ``.prior`` when ``prior`` is given. Folders hold plain images (captions come from the
    spec's prompts)."""
    from .types import PairSet

    images, captions = load_plain_folder(
        Path(ds.instance), ds.instance_prompt, resolution, channels
    )
    prior = None
    if ds.prior:
        p_images, p_captions = load_plain_folder(
            Path(ds.prior), ds.class_prompt, resolution, channels
        )
        prior = PairSet(images=p_images, captions=p_captions)
    return PairSet(images=images, captions=captions, prior=prior)
