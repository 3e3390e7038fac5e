"""Attention path switch for second-order differentiation.

PyTorch's fused CPU attention (``scaled_dot_product_attention``'s flash kernel) cannot be
differentiated twice, and forward-mode AD through it is not guaranteed either. Hessian-vector
products and unrolled differentiation therefore run the denoiser on a math path; everything
else keeps the fast default:

- a UNet's attention layers (diffusers' ``AttnProcessor2_0``) switch to the plain
  ``AttnProcessor`` (explicit ``baddbmm`` + softmax), as before;
- attention processors that have no plain twin (SD3's ``JointAttnProcessor2_0``, Flux's
  ``FluxAttnProcessor`` with its rotary embeddings) keep calling
  ``scaled_dot_product_attention``, restricted to its math backend
  (``torch.nn.attention.sdpa_kernel``), which is composed of differentiable ops: double
  backward and forward-over-reverse through an SD3 transformer were checked to run there
  and to fail on the default backend (``tests/test_models_sd3.py``; Flux:
  ``tests/test_models_flux.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def math_attention(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside the block, ``model``'s attention uses a double-backward-safe math path.

    The previous processors are restored on exit, also on error. Models without diffusers
    attention processors are left unchanged (scaled dot-product attention inside them still
    runs on the math backend)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    procs = getattr(model, "attn_processors", None)
    # joint (MM-DiT) and Flux attention have no plain processor: they stay on SDPA's math
    # backend (a plain AttnProcessor would drop Flux's rotary embeddings)
    swap = bool(procs) and not any(
        "Joint" in type(p).__name__ or "Flux" in type(p).__name__ for p in procs.values()
    )
    with sdpa_kernel([SDPBackend.MATH]):
        if not swap:
            yield model
            return
        from diffusers.models.attention_processor import AttnProcessor

        saved = dict(procs)
        model.set_attn_processor(AttnProcessor())
        try:
            yield model
        finally:
            model.set_attn_processor(saved)
