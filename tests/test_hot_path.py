"""The hot-path cuts (issue 25 item 3) change no result: the demo's nodes, shrunk to seconds
(sizes only: pretraining, ResAlign and plain unlearning, two attack segments, evaluations),
run once with the cuts and once with each cut switched back to the code it replaced, in the
same process (same thread count); every node's weights and metrics must be equal bitwise.

The cuts and what switching one off restores:
- ``Denoiser.eps`` passes ``tie_weights=False`` to ``functional_call`` when the denoiser has
  no tied tensors (``has_tied_tensors``): off = untie on every call, as before;
- attacks encode each distinct caption once (``_CaptionTable``): off = every micro-batch's
  captions encoded (``CAPTION_TABLE_MAX = 0``);
- attacks and pretraining use torch.optim's multi-tensor loop (``FOREACH = True``): off =
  torch's default (the per-tensor Python loop on the CPU).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from resalign.cli import cli

SPECS = Path(__file__).resolve().parents[1] / "specs"


def shrunk_demo(tmp_path: Path) -> Path:
    """A child of the demo that overrides only sizes (every node kind and method stays)."""
    demo = yaml.safe_load((SPECS / "digits_demo.yaml").read_text())
    configs = demo["unlearn"]["resilience"]["meta"]["configs"]
    child = {
        "version": 1,
        "extends": str(SPECS / "digits_demo.yaml"),
        "name": "digits_demo_hot",
        "model": {"tiny": {"pretrain": {"steps": 6, "batch_size": 8}}},
        "datasets": {
            n: {"limit": 24} for n, d in demo["datasets"].items() if d["type"] == "digits"
        },
        "unlearn": {
            "steps": 2,
            "harmful_loss": {"batch_size": 4},
            "regularizers": [{**demo["unlearn"]["regularizers"][0], "batch_size": 4}],
            "resilience": {
                "meta": {"configs": {n: {"steps": 3, "batch_size": 4} for n in configs}}
            },
        },
        "threats": {
            n: {"eval_at": [2, 4], "steps": 4, "seeds": [1], "batch_size": 4}
            for n in demo["threats"]
        },
        "evaluate": {"generation": {"steps": 2, "images_per_prompt": 1, "batch_size": 19}},
    }
    path = tmp_path / "hot.yaml"
    path.write_text(yaml.safe_dump(child, sort_keys=False))
    return path


def results(store: Path) -> dict[str, str]:
    """sha256 of every weight and metric file of every node, by node kind/key/path (the
    evaluation's ``metrics.json`` carries the concept rates; images are their input)."""
    out = {}
    for p in sorted(store.rglob("*")):
        rel = p.relative_to(store)
        if rel.parts[0] in ("state", "locks", "index", "tracking") or not p.is_file():
            continue
        if p.suffix == ".safetensors" or p.name in ("metrics.json", "steps.jsonl"):
            out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run(spec: Path, store: Path) -> dict[str, str]:
    res = CliRunner().invoke(cli, ["run", str(spec), "--store", str(store), "--no-tracking"])
    assert res.exit_code == 0, res.output
    return results(store)


def old_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every cut switched back to the code it replaced."""
    from resalign.algorithms import attack, objectives
    from resalign.models import pretrain

    monkeypatch.setattr(objectives, "has_tied_tensors", lambda module: True)
    monkeypatch.setattr(attack, "CAPTION_TABLE_MAX", 0)
    monkeypatch.setattr(attack, "FOREACH", None)
    monkeypatch.setattr(pretrain, "FOREACH", None)


@pytest.mark.slow
def test_demo_nodes_bitwise_equal_with_and_without_the_cuts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = shrunk_demo(tmp_path)
    new = run(spec, tmp_path / "new")
    with monkeypatch.context() as m:
        old_paths(m)
        old = run(spec, tmp_path / "old")
    kinds = {k.split("/")[0] for k in new}
    assert {"model", "unlearn", "attack", "evaluate"} <= kinds, sorted(kinds)
    assert sum(k.endswith("metrics.json") for k in new) >= 6  # pre + 2 segments per row
    assert new.keys() == old.keys()  # same node keys
    differ = [k for k in new if new[k] != old[k]]
    assert not differ, differ
    # the evaluations measured something (not all-zero metrics on blank images)
    values = [
        v["value"]
        for k in new
        if k.endswith("metrics.json")
        for v in json.loads((tmp_path / "new" / k).read_text()).values()
    ]
    assert any(x != 0 for x in values)


@pytest.mark.fast
def test_has_tied_tensors_sees_a_shared_parameter() -> None:
    import torch

    from resalign.algorithms.objectives import has_tied_tensors

    m = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    assert not has_tied_tensors(m)
    m[1].weight = m[0].weight
    assert has_tied_tensors(m)


@pytest.mark.fast
@pytest.mark.parametrize("family", ["tiny", "sdxl"])
def test_caption_table_equals_encoding_each_batch(family: str) -> None:
    import torch

    from resalign.algorithms.attack import _CaptionTable
    from tests.tiny_bundle import Pairs, tiny_bundle

    bundle = tiny_bundle(family=family)
    caps = [f"a handwritten digit {w}" for w in ("zero", "one", "two", "three")]
    pairs = Pairs(torch.zeros(4, 1, 8, 8), caps)
    table = _CaptionTable.build(bundle, [pairs], None)
    assert table is not None
    batch = [caps[i] for i in (3, 1, 1, 0, 2, 3)]
    with torch.no_grad():
        want = bundle.encode_condition(batch)
    got = table.condition(batch)
    assert want.keys() == got.keys()
    flat = [(k, v) for k, v in want.items() if not isinstance(v, dict)]
    flat += [(f"{k}.{j}", w) for k, v in want.items() if isinstance(v, dict) for j, w in v.items()]
    for name, v in flat:
        g = got[name] if "." not in name else got[name.split(".")[0]][name.split(".")[1]]
        assert torch.equal(v, g), name


@pytest.mark.fast
def test_richardson_norms_equal_the_per_tensor_formula_bitwise() -> None:
    """The Richardson solve's norms (one host transfer per list, x's per-tensor squares
    shared by ‖x‖ and the divergence test) equal the per-tensor ``float()`` formula they
    replaced, so residuals, ratios and the solution's norm in steps.jsonl do not move."""
    import math

    import torch

    from resalign.algorithms.hypergrad import _map_ratio, richardson_solve, squared_norms
    from resalign.algorithms.hypergrad import tensors_norm as norm

    def old_norm(a: list[torch.Tensor]) -> float:
        return math.sqrt(float(sum(float((x.double() ** 2).sum()) for x in a)))

    g = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (7,), (2, 2, 3), (1,), (4, 4)]
    a = [torch.randn(s, generator=g) * 10 ** float(i - 2) for i, s in enumerate(shapes)]
    a.append(torch.zeros(3))
    assert norm(a) == old_norm(a) and norm([]) == old_norm([]) == 0.0
    jx = [t * 0.7 + 0.01 for t in a]
    old_mean = [old_norm([u]) / old_norm([v]) for u, v in zip(jx, a) if old_norm([v]) > 0]
    assert _map_ratio(jx, squared_norms(a), norm(a), "tensor_mean") == sum(old_mean) / len(old_mean)
    assert _map_ratio(jx, squared_norms(a), norm(a), "global") == old_norm(jx) / old_norm(a)

    # a full solve: H = diag(d) per tensor; residuals as the old loop computed them
    d = [torch.rand(t.shape, generator=g) for t in a]
    b, gamma = [torch.randn(t.shape, generator=g) for t in a], 0.5
    x, st = richardson_solve(b, lambda v: [di * vi for di, vi in zip(d, v)], gamma, 4, tol=0.0)
    xs, res = [t.clone() for t in b], []
    for k in range(4):
        r = [xi + gamma * (di * xi) - bi for xi, di, bi in zip(xs, d, b)]
        res.append(old_norm(r))
        if k < 3:
            xs = [xi - ri for xi, ri in zip(xs, r)]
    assert st.residuals == res and st.norm == old_norm(xs)
    assert all(torch.equal(u, v) for u, v in zip(x, xs))
