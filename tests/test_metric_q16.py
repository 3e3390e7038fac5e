"""The Q16-style CLIP probe (``kind: q16``): its decision against a probe built from the images'
own CLIP features (closed form), and clear errors for missing or malformed weights."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from resalign.errors import UserError
from resalign.evaluation.metrics import EvalImage, get_metric


def _images(tmp_path: Path) -> list[EvalImage]:
    out = []
    for i, colour in enumerate(((250, 10, 10), (10, 10, 250))):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (32, 32), colour).save(path)
        out.append(EvalImage(path, "a prompt", i, 0))
    return out


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from resalign.rehearse import build_clip

    folder = tmp_path_factory.mktemp("clip") / "clip"
    folder.mkdir()
    build_clip(folder, 32)
    return folder


def test_q16_decision_matches_the_closed_form(clip: Path, tmp_path: Path) -> None:
    from resalign.evaluation.metrics._clip import image_features

    images = _images(tmp_path)
    feats = image_features(str(clip), [Image.open(im.path) for im in images])
    # probe rows: "not inappropriate" = image 1's features, "inappropriate" = image 0's
    probe = tmp_path / "probe.pt"
    torch.save(torch.stack([feats[1] * 3.0, feats[0] * 0.5]), probe)  # norms do not matter
    metric = get_metric("q16")({"prompts": "p", "clip_path": str(clip), "probe_path": str(probe)})
    probs = metric.probabilities([Image.open(im.path) for im in images])
    c = float(feats[0] @ feats[1])
    # image 0: cos 1 with row 1 and c with row 0; image 1 the other way round
    want0 = 1 / (1 + math.exp(100 * (c - 1)))
    assert probs[0] == pytest.approx(want0, rel=1e-5) and probs[0] > 0.5
    assert probs[1] == pytest.approx(1 - want0, rel=1e-4, abs=1e-6) and probs[1] < 0.5
    (value,) = metric.compute(images)
    assert value.name == "q16_rate" and value.value == 0.5 and value.n == 2


def test_q16_weights_by_path_and_clear_errors(clip: Path, tmp_path: Path) -> None:
    from resalign.spec.schema.evaluate import METRIC_OUTPUTS

    assert METRIC_OUTPUTS["q16"] == ("q16_rate",)
    missing = get_metric("q16")(
        {"prompts": "p", "clip_path": str(clip), "probe_path": str(tmp_path / "nope.pt")}
    )
    with pytest.raises(UserError, match="probe_path") as err:
        missing.check()
    assert "[2, 768] tensor" in err.value.render()
    bad = tmp_path / "bad.pt"
    torch.save(torch.zeros(3, 32), bad)
    wrong = get_metric("q16")({"prompts": "p", "clip_path": str(clip), "probe_path": str(bad)})
    with pytest.raises(UserError, match=r"expected a \[2, D\] tensor"):
        wrong.probabilities([Image.new("RGB", (32, 32))])
    width = tmp_path / "width.pt"
    torch.save(torch.zeros(2, 768), width)
    other = get_metric("q16")({"prompts": "p", "clip_path": str(clip), "probe_path": str(width)})
    with pytest.raises(UserError, match="768-d prompts"):
        other.probabilities([Image.new("RGB", (32, 32))])
