"""``clip_score``: prompt–image agreement, 100 × cosine of CLIP ViT-B/32 embeddings.

Definition (version 1): mean over images of ``100 · cos(image embedding, prompt embedding)``
with a local CLIP model (``clip_path``, a transformers folder; ViT-B/32 as the paper). Prompts
longer than CLIP's 77 tokens are truncated. Unlike torchmetrics we do not clamp negative
cosines at 0 (the paper does not say it does; recorded as ``clamp: false``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import EvalImage, Metric, MetricValue, register_metric, require_files

WHERE = (
    "clip_path: a CLIP ViT-B/32 transformers folder (e.g. openai/clip-vit-base-patch32 "
    "downloaded once); point the metric's clip_path at it"
)


@register_metric
class ClipScore(Metric):
    id = "clip_score"
    version = "1"

    def params(self) -> dict[str, Any]:
        return {
            "prompts": self.spec.get("prompts"),
            "clip_path": str(self.spec["clip_path"]),
            "scale": 100.0,
            "clamp": False,
        }

    def check(self) -> None:
        require_files({"clip_path": self.spec["clip_path"]}, self.id, WHERE)

    def scores(self, images: Sequence[Any], prompts: Sequence[str]) -> list[float]:
        from ._clip import image_features, text_features

        self.check()
        path = str(self.spec["clip_path"])
        img = image_features(path, list(images))
        txt = text_features(path, list(prompts))
        return (100.0 * (img * txt).sum(dim=1)).tolist()

    def compute(self, images: Sequence[EvalImage]) -> list[MetricValue]:
        from PIL import Image

        self.check()

        s = self.scores([Image.open(im.path) for im in images], [im.prompt for im in images])
        return [
            self.value("clip_score", sum(s) / len(s), role="utility", better="higher", n=len(s))
        ]
