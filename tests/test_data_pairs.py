"""Datasets: digits splits/shards, imagefolder/prompt loading, poison mixes, DreamBooth, and a
clear UserError for each kind of bad data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from resalign.data.digits import load_digits_arrays, select, split_indices
from resalign.data.imagefolder import write_imagefolder
from resalign.data.mix import poison_plan
from resalign.data.pairs import load_pairs
from resalign.data.prompts import load_prompts
from resalign.errors import UserError
from resalign.spec.schema import Spec


def make_spec(datasets: dict) -> Spec:
    return Spec.model_validate(
        {
            "name": "t",
            "model": {"family": "tiny"},
            "datasets": datasets,
            "concepts": {"c": {"harmful": [next(iter(datasets))]}},
        }
    )


def test_digits_arrays_match_sklearn():
    from sklearn.datasets import load_digits

    images, labels = load_digits_arrays()
    raw = load_digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == np.float32
    assert images.min() == -1.0 and images.max() == 1.0
    np.testing.assert_allclose((images[:, 0] + 1) / 2 * 16, raw.images, atol=1e-5)
    np.testing.assert_array_equal(labels, raw.target)


def test_splits_and_shards_partition():
    train, test = split_indices(1797, "train"), split_indices(1797, "test")
    assert len(test) == round(1797 * 0.25) and len(train) + len(test) == 1797
    assert not set(train) & set(test)
    a, la = select([1, 2, 3], "train", shard_spec=(0, 2))
    b, lb = select([1, 2, 3], "train", shard_spec=(1, 2))
    full, lf = select([1, 2, 3], "train")
    assert set(la) == set(lb) == {1, 2, 3}
    assert len(a) + len(b) == len(full)
    # disjoint halves: the two shards' dataset indices do not overlap
    from resalign.data.digits import shard

    _, labels = load_digits_arrays()
    idx = train[np.isin(labels[train], [1, 2, 3])]
    ia, ib = shard(idx, 0, 2), shard(idx, 1, 2)
    assert not set(ia) & set(ib) and len(ia) + len(ib) == len(idx)
    # the split is a fixed function of the data, not of any global RNG state
    np.random.seed(123)
    torch.manual_seed(5)
    assert np.array_equal(split_indices(1797, "train"), train)


def test_digit_pairs_captions_labels_resize():
    spec = make_spec({"d": {"type": "digits", "digits": [0, 7], "split": "test", "limit": 9}})
    pairs = load_pairs("d", spec, {}, resolution=8, channels=1)
    assert len(pairs) == 9 and pairs.images.shape == (9, 1, 8, 8)
    names = {0: "zero", 7: "seven"}
    assert pairs.captions == [f"a handwritten digit {names[y]}" for y in pairs.labels]
    big = load_pairs("d", spec, {}, resolution=16, channels=3)
    assert big.images.shape == (9, 3, 16, 16)
    assert big.images.min() >= -1 and big.images.max() <= 1
    assert load_prompts("d", spec) == ["a handwritten digit zero", "a handwritten digit seven"]


def test_poison_plan_counts_and_determinism():
    plan = poison_plan(40, 7, 0.25, seed=3)
    assert len(plan) == 10
    assert len({p for p, _ in plan}) == 10  # positions without replacement
    assert all(0 <= i < 7 for _, i in plan)
    assert plan == poison_plan(40, 7, 0.25, seed=3)
    assert plan != poison_plan(40, 7, 0.25, seed=4)
    assert poison_plan(40, 7, 0.0, seed=3) == []
    assert len(poison_plan(40, 7, 1.0, seed=3)) == 40


def test_mix_replaces_round_r_n_items():
    spec = make_spec(
        {
            "harm": {"type": "digits", "digits": [0], "limit": 5},
            "benign": {"type": "digits", "digits": [1, 2], "limit": 20},
            "m": {"type": "mix", "base": "benign", "poison": "harm", "ratio": 0.3, "seed": 1},
        }
    )
    m = load_pairs("m", spec, {}, 8, 1)
    base = load_pairs("benign", spec, {}, 8, 1)
    assert len(m) == 20
    assert sum(c.endswith("zero") for c in m.captions) == 6  # round(0.3 * 20)
    assert m.labels.count(0) == 6
    changed = [i for i in range(20) if not torch.equal(m.images[i], base.images[i])]
    assert len(changed) == 6


def test_threat_poison_is_the_mix_dataset_with_the_attack_seed():
    # one poisoning path: a threat's poison block (mix_pairs with the attack seed, as the
    # attack step calls it) gives exactly the mix dataset of that seed
    from resalign.data.pairs import mix_pairs

    datasets = {
        "harm": {"type": "digits", "digits": [0], "limit": 5},
        "benign": {"type": "digits", "digits": [1, 2], "limit": 20},
    }
    spec = make_spec({**datasets, "m": {"type": "mix", "base": "benign", "poison": "harm",
                                        "ratio": 0.3, "seed": 7}})  # fmt: skip
    base, harm = load_pairs("benign", spec, {}, 8, 1), load_pairs("harm", spec, {}, 8, 1)
    mixed, positions = mix_pairs(base, harm, 0.3, seed=7)
    m = load_pairs("m", spec, {}, 8, 1)
    assert torch.equal(mixed.images, m.images)
    assert (mixed.captions, mixed.labels) == (m.captions, m.labels)
    # the positions are those whose item changed, computed independently from the plan
    assert positions == sorted(p for p, _ in poison_plan(20, 5, 0.3, 7))
    assert positions == [i for i in range(20) if mixed.captions[i] != base.captions[i]]
    with pytest.raises(UserError, match="ratio"):
        mix_pairs(base, harm, 1.5, seed=0)


def _folder(tmp_path, n=3, caption_column="text", fmt="jsonl"):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rows = []
    for i in range(n):
        Image.fromarray((np.arange(64).reshape(8, 8) * (i + 1) % 256).astype(np.uint8)).save(
            folder / f"{i}.png"
        )
        rows.append({"file_name": f"{i}.png", caption_column: f"caption {i}"})
    if fmt == "jsonl":
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        lines = ["file_name," + caption_column] + [
            f"{r['file_name']},{r[caption_column]}" for r in rows
        ]
        (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_imagefolder_round_trip(tmp_path, fmt):
    folder = _folder(tmp_path, fmt=fmt)
    spec = make_spec({"f": {"type": "imagefolder", "path": str(folder)}})
    pairs = load_pairs("f", spec, {}, 8, 1)
    assert pairs.captions == ["caption 0", "caption 1", "caption 2"]
    expected = torch.from_numpy((np.arange(64).reshape(8, 8) * 2 % 256) / 127.5 - 1).float()
    assert torch.allclose(pairs.images[1, 0], expected, atol=1e-6)
    assert pairs.labels is None
    # write → read is lossless up to 8-bit quantisation
    write_imagefolder(tmp_path / "out", pairs.images, pairs.captions)
    again = load_pairs(
        "g", make_spec({"g": {"type": "imagefolder", "path": str(tmp_path / "out")}}), {}, 8, 1
    )
    assert torch.allclose(again.images, pairs.images, atol=1 / 127.5)
    assert load_prompts("f", spec) == pairs.captions


def test_harvest_reads_its_node_output(tmp_path):
    imgs = torch.rand(4, 1, 8, 8) * 2 - 1
    write_imagefolder(tmp_path / "h", imgs, ["p"] * 4)
    spec = make_spec(
        {"hv": {"type": "harvest", "prompts": "pr"}, "pr": {"type": "prompts", "path": "x.txt"}}
    )
    pairs = load_pairs("hv", spec, {"harvest:hv": tmp_path / "h"}, 8, 1)
    assert len(pairs) == 4
    with pytest.raises(UserError, match="harvest output was not given"):
        load_pairs("hv", spec, {}, 8, 1)


def test_dreambooth_instance_and_prior(tmp_path):
    for sub in ("inst", "prior"):
        (tmp_path / sub).mkdir()
        for i in range(2):
            Image.new("RGB", (12, 10), (i * 100, 0, 0)).save(tmp_path / sub / f"{i}.jpg")
    spec = make_spec(
        {
            "db": {
                "type": "dreambooth",
                "instance": str(tmp_path / "inst"),
                "prior": str(tmp_path / "prior"),
            }
        }
    )
    pairs = load_pairs("db", spec, {}, 8, 3)
    assert pairs.images.shape == (2, 3, 8, 8)
    assert pairs.captions == ["a photo of *s person"] * 2
    assert pairs.prior.captions == ["a photo of a person"] * 2


# -- bad data ---------------------------------------------------------------------------------


def _err(spec, name, inputs=None):
    with pytest.raises(UserError) as err:
        load_pairs(name, spec, inputs or {}, 8, 1)
    return err.value.render()


def test_missing_folder_and_metadata(tmp_path):
    msg = _err(make_spec({"f": {"type": "imagefolder", "path": str(tmp_path / "nope")}}), "f")
    assert "does not exist" in msg and "nope" in msg
    (tmp_path / "empty").mkdir()
    msg = _err(make_spec({"f": {"type": "imagefolder", "path": str(tmp_path / "empty")}}), "f")
    assert "no metadata.csv or metadata.jsonl" in msg


def test_missing_caption_column_names_the_columns(tmp_path):
    folder = _folder(tmp_path, caption_column="caption", fmt="csv")
    msg = _err(make_spec({"f": {"type": "imagefolder", "path": str(folder)}}), "f")
    assert "no column 'text'" in msg and "caption" in msg and "caption_column" in msg


def test_unreadable_and_missing_image_are_named(tmp_path):
    folder = _folder(tmp_path)
    (folder / "1.png").write_bytes(b"this is not a png")
    msg = _err(make_spec({"f": {"type": "imagefolder", "path": str(folder)}}), "f")
    assert "cannot read image" in msg and "1.png" in msg
    (folder / "1.png").unlink()
    msg = _err(make_spec({"f": {"type": "imagefolder", "path": str(folder)}}), "f")
    assert "does not exist" in msg and "1.png" in msg


def test_empty_sets(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "metadata.jsonl").write_text("")
    assert "no items" in _err(make_spec({"f": {"type": "imagefolder", "path": str(folder)}}), "f")
    (tmp_path / "p.txt").write_text("\n\n")
    with pytest.raises(UserError, match="no prompts"):
        load_prompts("p", make_spec({"p": {"type": "prompts", "path": str(tmp_path / "p.txt")}}))


def test_prompt_files(tmp_path):
    (tmp_path / "p.csv").write_text('prompt_index,prompt\n0,"a, b"\n1,c\n')
    spec = make_spec({"p": {"type": "prompts", "path": str(tmp_path / "p.csv")}})
    assert load_prompts("p", spec) == ["a, b", "c"]
    bad = make_spec({"p": {"type": "prompts", "path": str(tmp_path / "p.csv"), "column": "text"}})
    with pytest.raises(UserError, match="no column 'text'"):
        load_prompts("p", bad)
    with pytest.raises(UserError, match="prompt list"):
        load_pairs("p", spec, {}, 8, 1)
    with pytest.raises(UserError, match="unknown dataset 'q'"):
        load_pairs("q", spec, {}, 8, 1)
