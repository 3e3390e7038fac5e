"""scikit-learn's handwritten digits (``load_digits``: 1,797 real 8×8 images, shipped with the
package, no download) as image–caption pairs for the built-in demo.

Splits are a fixed function of the data (a permutation seeded with :data:`SPLIT_SEED`), never
of the experiment's seed, so that every run and every row sees the same train/test items.
Shards ``(index, count)`` take every ``count``-th item from ``index`` of a split: shards with
the same count and different indices are disjoint (the demo trains simulated fine-tunes and
attacks on disjoint halves).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

import numpy as np

from ..spec.schema.data import DIGIT_NAMES

SPLIT_SEED = 0


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32), data.target.astype(np.int64)


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All digits: images float32 ``[N, 1, 8, 8]`` in [-1, 1] (pixel / 16 · 2 − 1; the raw
    values are 0..16) and labels int64 ``[N]``."""
    images, labels = _raw()
    return (images / 16.0 * 2.0 - 1.0)[:, None].copy(), labels.copy()


def split_indices(n: int, split: str, test_fraction: float = 0.25) -> np.ndarray:
    """Indices of ``split`` (``train``, ``test`` or ``all``) in a fixed permutation of ``n``
    items; the test part is the first ``round(n·test_fraction)`` of the permutation."""
    if split == "all":
        return np.arange(n)
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(perm[:n_test] if split == "test" else perm[n_test:])


def shard(indices: np.ndarray, index: int, count: int) -> np.ndarray:
    """Every ``count``-th item of ``indices`` starting at ``index``."""
    return indices[index::count]


def caption_for(
    label: int,
    template: str = "a handwritten digit {name}",
    names: Mapping[int, str] | None = None,
) -> str:
    """The caption of a digit: ``template`` with ``{name}`` (``names[label]`` where given,
    else ``zero``…``nine``) and ``{digit}`` (``0``…``9``) filled in."""
    name = (names or {}).get(label, DIGIT_NAMES[label])
    return template.format(name=name, digit=label)


def select(
    digits: list[int],
    split: str = "train",
    test_fraction: float = 0.25,
    shard_spec: tuple[int, int] | None = None,
    limit: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of the chosen digits in a split (then shard, then limit), in the
    dataset's order."""
    images, labels = load_digits_arrays()
    idx = split_indices(len(labels), split, test_fraction)
    idx = idx[np.isin(labels[idx], np.asarray(digits))]
    if shard_spec is not None:
        idx = shard(idx, *shard_spec)
    if limit is not None:
        idx = idx[:limit]
    return images[idx], labels[idx]
