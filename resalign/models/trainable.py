"""Which UNet parameters unlearning trains: LoRA (peft), the full UNet, or named subsets.

LoRA is added through diffusers' peft integration (``unet.add_adapter``) so the result saves
and loads as a standard diffusers LoRA. The ``resalign`` init reproduces the published one:
up (``lora_B``) ~ N(0, 0.002²), down (``lora_A``) ~ N(0, 0.008²) (standard deviations 0.002
and 0.008, as ``nn.init.normal_(std=...)``), so the adapter is not a no-op at the start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UserError

ADAPTER = "default"


@dataclass
class TrainableSelection:
    """The trained tensors: their parameter names, count of tensors and of scalars."""

    kind: str
    names: list[str]
    num_tensors: int
    num_params: int

    def summary(self) -> str:
        return f"{self.kind}: {self.num_tensors} tensors, {self.num_params:,} parameters"

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_tensors": self.num_tensors, "num_params": self.num_params}


def _field(spec: Any, name: str, default: Any = None) -> Any:
    if isinstance(spec, dict):
        return spec.get(name, default)
    return getattr(spec, name, default)


def _lora_targets(unet: torch.nn.Module, targets: list[str]) -> list[tuple[str, torch.nn.Module]]:
    # peft matches a target as the whole module name or a suffix after a dot
    out = []
    for name, mod in unet.named_modules():
        if any(name == t or name.endswith("." + t) for t in targets):
            out.append((name, mod))
    return out


def _empty(kind: str, what: str) -> UserError:
    return UserError(
        f"model.trainable selects no parameters ({kind}: {what})",
        where="model.trainable",
        hint="name modules that exist in this UNet, e.g. targets [to_q, to_k, to_v, to_out.0] "
        "or modules [attn2]",
    )


def preview_trainable(unet: torch.nn.Module, spec: Any) -> TrainableSelection:
    """Count what :func:`apply_trainable` would select, without changing ``unet``."""
    kind = _field(spec, "kind", "lora")
    if kind == "lora":
        rank = int(_field(spec, "rank", 4))
        targets = list(_field(spec, "targets", []))
        mods = _lora_targets(unet, targets)
        names, n = [], 0
        for name, mod in mods:
            if not isinstance(mod, torch.nn.Linear | torch.nn.Conv2d):
                continue
            w = mod.weight
            fan_in = w.shape[1] * (w[0, 0].numel() if w.dim() == 4 else 1)
            # down: [r, in(, k, k)], up: [out, r(, 1, 1)]
            n += rank * fan_in + w.shape[0] * rank
            names += [f"{name}.lora_A.{ADAPTER}.weight", f"{name}.lora_B.{ADAPTER}.weight"]
        if not names:
            raise _empty(kind, f"targets {targets}")
        return TrainableSelection(kind, names, len(names), n)
    params = dict(unet.named_parameters())
    if kind == "full":
        names = list(params)
    elif kind == "modules":
        subs = list(_field(spec, "modules", []))
        names = [n for n in params if any(s in n for s in subs)]
        if not names:
            raise _empty(kind, f"modules {subs}")
    else:
        raise UserError(f"unknown trainable kind {kind!r}", hint="use lora, full or modules")
    return TrainableSelection(kind, names, len(names), sum(params[n].numel() for n in names))


def apply_trainable(
    unet: torch.nn.Module, spec: Any, generator: torch.Generator | None = None
) -> TrainableSelection:
    """Make the selected parameters trainable (adding a LoRA adapter for ``kind: lora``) and
    freeze the rest. Raises :class:`UserError` on an empty selection."""
    kind = _field(spec, "kind", "lora")
    preview = preview_trainable(unet, spec)
    unet.requires_grad_(False)
    if kind == "lora":
        from peft import LoraConfig

        rank = int(_field(spec, "rank", 4))
        alpha = _field(spec, "alpha", None)
        init = _field(spec, "init", "resalign")
        cfg = LoraConfig(
            r=rank,
            lora_alpha=float(rank if alpha is None else alpha),
            target_modules=list(_field(spec, "targets", [])),
            init_lora_weights=True,
        )
        unet.add_adapter(cfg, adapter_name=ADAPTER)
        params = dict(unet.named_parameters())
        if init == "resalign":
            gen = generator if generator is not None else torch.Generator().manual_seed(0)
            with torch.no_grad():
                for n in preview.names:
                    p = params[n]
                    std = 0.008 if ".lora_A." in n else 0.002
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
        for n, p in unet.named_parameters():
            p.requires_grad_(n in set(preview.names))
        missing = [n for n in preview.names if n not in params]
        if missing:
            raise RuntimeError(f"peft did not create the expected LoRA tensors: {missing[:3]}")
    else:
        params = dict(unet.named_parameters())
        for n in preview.names:
            params[n].requires_grad_(True)
    return preview
