"""Image–caption pair sets: one loader for every dataset type of the ``datasets`` section."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from .types import PairSet, dataset_spec, datasets_of

__all__ = [
    "PairSet",
    "dataset_spec",
    "datasets_of",
    "fit_images",
    "label_counts",
    "load_pairs",
    "mix_pairs",
    "without_labels",
]


def fit_images(images: torch.Tensor, resolution: int, channels: int) -> torch.Tensor:
    """Images resized (bilinear, antialiased) to ``resolution`` and given ``channels``
    (grey → RGB by repetition, RGB → grey by luma)."""
    import torch.nn.functional as F

    images = images.float()
    if images.shape[1] != channels:
        if images.shape[1] == 1:
            images = images.repeat(1, channels, 1, 1)
        elif channels == 1 and images.shape[1] >= 3:
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images[:, :3] * w).sum(1, keepdim=True)
        else:
            raise UserError(f"cannot convert {images.shape[1]}-channel images to {channels}")
    if images.shape[-1] != resolution or images.shape[-2] != resolution:
        images = F.interpolate(
            images,
            size=(resolution, resolution),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        ).clamp(-1, 1)
    return images.contiguous()


def load_pairs(
    name: str,
    spec: Any,
    inputs: Mapping[str, Path] | None = None,
    resolution: int = 8,
    channels: int = 1,
) -> PairSet:
    """Load dataset ``name`` as a :class:`PairSet` at ``resolution`` with ``channels``.

    Types: ``imagefolder``; ``digits`` (with labels); ``dreambooth`` (instance pairs, class
    prior in ``.prior``); ``mix`` (``base`` with ``round(ratio·n)`` items replaced by
    ``poison`` items, :func:`resalign.data.mix.poison_plan`); ``harvest`` (the imagefolder of
    the ``harvest/<name>`` node, passed as ``inputs['harvest:<name>']``). Prompt lists have
    no images and are an error here. Any bad data is a :class:`UserError`.
    """
    inputs = inputs or {}
    ds = dataset_spec(name, spec)
    kind = ds.type
    if kind == "digits":
        from .digits import caption_for, select

        images, labels = select(
            ds.digits, ds.split, ds.test_fraction, tuple(ds.shard) if ds.shard else None, ds.limit
        )
        pairs = PairSet(
            images=fit_images(torch.from_numpy(images), resolution, channels),
            captions=[caption_for(int(y), ds.caption, ds.names) for y in labels],
            labels=[int(y) for y in labels],
        )
    elif kind == "imagefolder":
        from .imagefolder import load_imagefolder

        images, captions = load_imagefolder(
            Path(ds.path), ds.caption_column, resolution, channels, ds.limit
        )
        pairs = PairSet(images=images, captions=captions)
    elif kind == "harvest":
        from .imagefolder import load_imagefolder

        key = f"harvest:{name}"
        if key not in inputs:
            raise UserError(
                f"dataset {name!r} is harvested but the harvest output was not given",
                hint="harvested datasets are produced by the harvest/<name> graph node; run "
                "the spec (resalign run) rather than loading the dataset directly",
            )
        images, captions = load_imagefolder(Path(inputs[key]), "text", resolution, channels, None)
        pairs = PairSet(images=images, captions=captions)
    elif kind == "dreambooth":
        from .dreambooth import load_dreambooth

        pairs = load_dreambooth(ds, resolution, channels, spec)
    elif kind == "mix":
        base = load_pairs(ds.base, spec, inputs, resolution, channels)
        poison = load_pairs(ds.poison, spec, inputs, resolution, channels)
        pairs, _ = mix_pairs(base, poison, ds.ratio, ds.seed)
    elif kind == "prompts":
        raise UserError(
            f"dataset {name!r} is a prompt list (no images) where image–caption pairs are needed",
            hint="use an imagefolder/digits dataset, or a 'harvest' dataset to generate images "
            "from these prompts with the original model",
        )
    else:  # pragma: no cover - the schema admits no other type
        raise UserError(f"dataset {name!r} has unknown type {kind!r}")
    if len(pairs) == 0:
        raise UserError(
            f"dataset {name!r} is empty",
            hint="check its filters (digits, split, shard, limit) or its folder",
        )
    return pairs


def mix_pairs(base: PairSet, poison: PairSet, ratio: float, seed: int) -> tuple[PairSet, list[int]]:
    """``base`` with ``round(ratio·n)`` items replaced by ``poison`` items (the paper's
    poisoning): the one implementation behind the ``mix`` dataset type and a threat's
    ``poison`` block (which passes the attack seed). Which positions and which poison items
    follow :func:`resalign.data.mix.poison_plan`, deterministic in ``seed``. Labels are kept
    when both sets have them, ``base.prior`` is kept. Returns the mixed set and the sorted
    replaced positions."""
    from .mix import poison_plan

    if not 0.0 <= ratio <= 1.0:
        raise UserError(f"poison ratio must be in [0, 1], got {ratio}")
    plan = poison_plan(len(base), len(poison), ratio, seed)
    images = base.images.clone()
    captions = list(base.captions)
    keep_labels = base.labels is not None and poison.labels is not None
    labels = list(base.labels) if keep_labels else None  # type: ignore[arg-type]
    for pos, item in plan:
        images[pos] = poison.images[item]
        captions[pos] = poison.captions[item]
        if labels is not None:
            labels[pos] = poison.labels[item]  # type: ignore[index]
    mixed = PairSet(images=images, captions=captions, labels=labels, prior=base.prior)
    return mixed, sorted(p for p, _ in plan)


def without_labels(pairs: PairSet, labels: Sequence[int], name: str = "data") -> PairSet:
    """``pairs`` without every item whose label is in ``labels`` (order kept): the oracle
    control's pretraining data (a model that never saw the concepts). A :class:`UserError`
    when the data has no labels, holds no item to remove (the result would be the data
    itself) or nothing else."""
    drop = set(labels)
    if pairs.labels is None:
        raise UserError(
            f"dataset {name!r} has no labels, so items labelled {sorted(drop)} cannot be left out",
            hint="pretrain on a 'digits' dataset, or remove controls.oracle",
        )
    keep = [i for i, y in enumerate(pairs.labels) if y not in drop]
    if len(keep) == len(pairs):
        raise UserError(
            f"dataset {name!r} holds no item labelled {sorted(drop)}: without them it is the "
            "same data, and the oracle would be the original model",
            hint="pretrain on data that holds the concept, or remove controls.oracle",
        )
    if not keep:
        raise UserError(
            f"dataset {name!r} holds only items labelled {sorted(drop)}: nothing is left to "
            "pretrain the oracle on",
            hint="pretrain on data with other classes too, or remove controls.oracle",
        )
    return pairs.subset(keep)


def label_counts(pairs: PairSet) -> dict[str, int]:
    """Items per label (keys as strings, sorted by label; empty without labels)."""
    if pairs.labels is None:
        return {}
    counts: dict[int, int] = {}
    for y in pairs.labels:
        counts[y] = counts.get(y, 0) + 1
    return {str(k): counts[k] for k in sorted(counts)}
