"""Registered, versioned evaluation metrics (see :mod:`.base`).

The metric modules import torch / transformers / nudenet lazily inside their methods, so
importing the registry is cheap.
"""

from __future__ import annotations

from .base import METRICS, EvalImage, Metric, MetricValue, get_metric, register_metric


def _load_all() -> None:
    from . import clip_score, concept_rate, fid, mhsc_us, nudenet_ip, q16  # noqa: F401


_load_all()

__all__ = ["METRICS", "EvalImage", "Metric", "MetricValue", "get_metric", "register_metric"]
