"""Attention path switch for second-order differentiation.

PyTorch's fused CPU attention (``scaled_dot_product_attention``) cannot be differentiated
twice, and forward-mode AD through it is not guaranteed either. Hessian-vector products and
unrolled differentiation therefore run the UNet through diffusers' plain ``AttnProcessor``
(explicit ``baddbmm`` + softmax); everything else keeps the fast default.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def math_attention(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside the block, ``model``'s attention layers use the double-backward-safe math path.

    The previous processors are restored on exit, also on error. Models without diffusers
    attention processors are left unchanged.
    """
    procs = getattr(model, "attn_processors", None)
    if not procs:
        yield model
        return
    from diffusers.models.attention_processor import AttnProcessor

    saved = dict(procs)
    model.set_attn_processor(AttnProcessor())
    try:
        yield model
    finally:
        model.set_attn_processor(saved)
