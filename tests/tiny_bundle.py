"""Test helpers shared by the attack and generation tests: the tiny SD-shaped model's
settings, a real ``ModelBundle`` of it, and the image–caption pairs the attack loop reads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

# A tiny SD-shaped pipeline: real diffusers / transformers classes at toy width.
TINY = dict(
    sample_size=8,
    block_out_channels=[16, 32],
    attention_head_dim=8,
    cross_attention_dim=16,
    text_hidden_size=16,
    text_layers=1,
    max_length=32,
)


@dataclass
class Pairs:
    """What ``run_attack`` reads from a ``PairSet``: images in [-1, 1] and captions."""

    images: torch.Tensor
    captions: list[str]


def tiny_bundle(seed: int = 0, family: str = "tiny", words: Sequence[str] = ()) -> Any:
    """A real ModelBundle of the tiny SD- (or SDXL-) shaped pipeline, what the attack step
    loads; ``words`` become single tokens, as after pretraining."""
    from resalign.models.loading import bundle_from_pipeline
    from resalign.models.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline
    from resalign.spec.schema.model import NoiseScheduleSpec, TinyModelSpec

    noise = NoiseScheduleSpec()
    build = build_tiny_sdxl_pipeline if family == "sdxl" else build_tiny_pipeline
    pipe = build(TinyModelSpec(**TINY), noise, seed=seed, words=tuple(words))
    return bundle_from_pipeline(pipe, family, noise.model_dump())
