"""Device and dtype resolution for ``model.device`` / ``model.dtype``."""

from __future__ import annotations

import torch

from ..errors import UserError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str = "auto") -> str:
    """``auto`` → ``cuda`` if available, else ``mps``, else ``cpu``. An explicit device that
    is not available is a :class:`UserError` (rather than a late CUDA traceback)."""
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if name.startswith("cuda") and not cuda:
        raise UserError(
            f"model.device is {name!r} but no CUDA device is available",
            hint="use device: auto (picks cuda, mps or cpu) or device: cpu",
        )
    if name == "mps" and not mps:
        raise UserError(
            "model.device is 'mps' but MPS is not available",
            hint="use device: auto or device: cpu",
        )
    return name


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """A ``torch.dtype`` from its spec name (``float32``, ``float16``, ``bfloat16``)."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise UserError(f"unknown dtype {name!r}", hint=f"use one of {', '.join(DTYPES)}") from None
