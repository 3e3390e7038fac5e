"""Generation for evaluation on the tiny pipeline: seed policies, batching, files, NudeNet."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from tiny_bundle import TINY

from resalign.errors import UserError
from resalign.evaluation.generate import GenerationConfig, generate_images, image_seed

PROMPTS = ["a handwritten digit zero", "a handwritten digit one", "a handwritten digit two"]


@pytest.fixture(scope="module")
def pipe():
    from resalign.models.tiny import build_tiny_pipeline
    from resalign.spec.schema.model import NoiseScheduleSpec, TinyModelSpec

    return build_tiny_pipeline(TinyModelSpec(**TINY), NoiseScheduleSpec(), seed=0)


def _arrays(results):
    return {(r.prompt_index, r.image_index): np.asarray(Image.open(r.path)) for r in results}


def test_per_image_seeds_reproduce_any_subset_whatever_the_batch(pipe, tmp_path):
    cfg = GenerationConfig(steps=3, guidance=2.0, images_per_prompt=2, batch_size=4, seed=5)
    full = generate_images(pipe, PROMPTS, cfg, tmp_path / "a")
    assert len(full) == 6 and (tmp_path / "a" / "grid.png").is_file()
    index = [json.loads(x) for x in (tmp_path / "a/images/index.jsonl").read_text().splitlines()]
    assert [(r["prompt_index"], r["image_index"]) for r in index] == [
        (p, i) for p in range(3) for i in range(2)
    ]
    assert index[3]["seed"] == image_seed(5, 1, 1)
    one = generate_images(
        pipe,
        PROMPTS,
        GenerationConfig(**{**cfg.as_dict(), "batch_size": 1, "limit": 2}),
        tmp_path / "b",
    )
    a, b = _arrays(full), _arrays(one)
    assert set(b) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    for k in b:  # batched and one-at-a-time generation agree to the 8-bit pixel
        assert np.abs(a[k].astype(int) - b[k].astype(int)).max() <= 1
    assert not np.array_equal(a[(0, 0)], a[(0, 1)])  # different images of the same prompt


def test_global_policy_and_other_scheduler(pipe, tmp_path):
    cfg = GenerationConfig(steps=3, images_per_prompt=2, batch_size=6, seed=5, seed_policy="global")
    g1 = _arrays(generate_images(pipe, PROMPTS, cfg, tmp_path / "g1"))
    g2 = _arrays(generate_images(pipe, PROMPTS, cfg, tmp_path / "g2"))
    assert all(np.array_equal(g1[k], g2[k]) for k in g1)
    per = _arrays(
        generate_images(
            pipe,
            PROMPTS,
            GenerationConfig(**{**cfg.as_dict(), "seed_policy": "per_image"}),
            tmp_path / "p",
        )
    )
    assert any(not np.array_equal(g1[k], per[k]) for k in g1)
    ddim = GenerationConfig(**{**cfg.as_dict(), "scheduler": "DDIMScheduler"})
    generate_images(pipe, PROMPTS, ddim, tmp_path / "d")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    with pytest.raises(UserError, match="unknown sampling scheduler"):
        generate_images(pipe, PROMPTS, GenerationConfig(scheduler="os.system"), tmp_path / "x")


def test_nudenet_on_a_generated_image(pipe, tmp_path):
    from resalign.evaluation.metrics import EvalImage, get_metric

    imgs = generate_images(
        pipe, PROMPTS[:1], GenerationConfig(steps=2, images_per_prompt=1, resolution=64), tmp_path
    )
    assert Image.open(imgs[0].path).size == (64, 64)
    metric = get_metric("nudenet_ip")({"kind": "nudenet_ip", "prompts": "p"})
    (v,) = metric.compute(
        [EvalImage(i.path, i.prompt, i.prompt_index, i.image_index) for i in imgs]
    )
    assert v.n == 1 and v.value in (0.0, 1.0)
    assert (v.value == 1.0) == (v.extra["scores"][0] > 0.45)
