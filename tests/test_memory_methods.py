"""Memory levers wired into the unlearning methods: one outer step of the real ``resalign``
method (tiny SD-layout UNet, published LoRA, γ = 1, K = 5, published safeguards, distillation
regularizer) with each ``unlearn.memory`` setting against the plain fp32 step.

Tolerances, as in the issue: cosine > 0.99 for every lever; relative norm difference < 5% for
bf16/fp16 autocast (with or without half frozen weights); < 1e-4 for checkpointing in fp32
(summation order only); bitwise equal for levers that change no arithmetic (freeing the inner
state, offloading idle modules on a CPU); checkpointing equal to 1e-12 in float64.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from resalign.algorithms import memory
from resalign.algorithms.hypergrad import tensors_cosine
from resalign.algorithms.methods import UnlearnProblem, build_method
from resalign.algorithms.objectives import EncodedPairs
from resalign.algorithms.toy import toy_scheduler
from resalign.errors import UserError
from resalign.models.sd_arch import build_unet
from resalign.models.trainable import apply_trainable
from resalign.spec.schema.unlearn import UnlearnSpec

LORA = {"kind": "lora", "rank": 4, "targets": ["to_q", "to_k", "to_v", "to_out.0"]}
BETA, META_RATE = 0.8, 0.3
SPEC: dict[str, Any] = {
    "method": "resalign",
    "steps": 4,
    # SGD at lr 1 without decay: the parameter update of a step is exactly its outer gradient
    "optimizer": {"name": "sgd", "lr": 1.0, "weight_decay": 0.0},
    "regularizers": [{"kind": "distill", "weight": 1.6, "batch_size": 2}],
    "resilience": {
        "beta": BETA,
        "hypergradient": {"iterations": 5, "gamma": 1.0},
        "meta": {
            "samples_per_step": 2,
            "meta_rate": META_RATE,
            "data": ["benign"],
            "distribution": {"lr": [1e-4], "steps": [2], "optimizer": ["sgd", "adam"]},
        },
    },
}


def _pairs(n: int, seed: int, dtype: torch.dtype, shift: float = 0.0) -> EncodedPairs:
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn((n, 4, 8, 8), generator=g, dtype=dtype) * 0.8 + shift
    emb = torch.randn((n, 8, 16), generator=g, dtype=dtype)
    return EncodedPairs(lat, emb)


def _problem(dtype: torch.dtype = torch.float32) -> UnlearnProblem:
    unet = build_unet("tiny", seed=1, dtype=dtype)
    sel = apply_trainable(unet, LORA, torch.Generator().manual_seed(2))
    unet.to(dtype)
    return UnlearnProblem(
        unet,
        toy_scheduler(),
        sel,
        harmful=_pairs(6, 3, dtype, shift=0.5),
        retain=_pairs(6, 4, dtype),
        pools={"benign": _pairs(6, 5, dtype)},
        default_pool=["benign"],
        uncond=torch.zeros(1, 8, 16, dtype=dtype),
        idle=[torch.nn.Linear(4, 4).to(dtype)],
    )


def _spec(memory_spec: dict[str, Any]) -> UnlearnSpec:
    return UnlearnSpec.model_validate({**SPEC, "memory": memory_spec})


def _run(memory_spec: dict[str, Any], dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """One real outer step (``Method.step``): the update, the mean hypergradient, the stats."""
    prob = _problem(dtype)
    seen: list[dict[str, Any]] = []
    m = build_method("resalign", prob, _spec(memory_spec), seed=7, callback=seen.append)
    before = [p.detach().clone() for p in m.params]
    m.step()
    update = [b - p.detach() for b, p in zip(before, m.params)]
    # the same method from the same seed draws the same direct-term batches; the update is
    # meta_rate·(direct + β·mean_j h_j) (published), so the hypergradient is what is left
    twin = build_method("resalign", _problem(dtype), _spec(memory_spec), seed=7)
    direct, _ = twin.direct_terms(harm_coef=1.0 - BETA)
    hyper = [(u / META_RATE - d) / BETA for u, d in zip(update, direct)]
    return {"update": update, "hyper": hyper, "stats": seen[0], "method": m}


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float(((x.double() - y.double()) ** 2).sum()) for x, y in zip(a, b)) ** 0.5
    den = sum(float((y.double() ** 2).sum()) for y in b) ** 0.5
    return num / den


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    ref = _run({})
    # a safeguard decision (step halved, fallback) is a discontinuity no tolerance covers:
    # the reference takes none, and no lever may flip one
    assert ref["stats"]["retries"] == 0 and ref["stats"]["fallbacks"] == 0
    assert sum(float((h * h).sum()) for h in ref["hyper"]) > 0
    return ref


def _checkpointing_on(unet: torch.nn.Module) -> bool:
    return any(
        getattr(mod, "gradient_checkpointing", False)
        and getattr(mod, "_gradient_checkpointing_func", None) is memory._checkpoint_call
        for mod in unet.modules()
    )


@pytest.mark.parametrize(
    ("lever", "max_rel"),
    [
        ({"gradient_checkpointing": True}, 1e-4),
        ({"autocast": "bf16"}, 0.05),
        ({"autocast": "fp16"}, 0.05),
        ({"autocast": "bf16", "frozen_dtype": "bfloat16", "gradient_checkpointing": True}, 0.05),
    ],
    ids=["ckpt", "bf16", "fp16", "bf16+half+ckpt"],
)
def test_lever_keeps_update_and_hypergradient(
    reference: dict[str, Any], lever: dict[str, Any], max_rel: float
) -> None:
    got = _run(lever)
    st = got["stats"]
    assert (st["retries"], st["fallbacks"]) == (0.0, 0.0)
    for key in ("update", "hyper"):
        assert tensors_cosine(got[key], reference[key]) > 0.99, key
        assert _rel(got[key], reference[key]) < max_rel, key
    m = got["method"]
    assert all(p.dtype == torch.float32 for p in m.params)  # fp32 master parameters
    frozen = [p for p in m.unet.parameters() if not p.requires_grad]
    half = lever.get("frozen_dtype") == "bfloat16"
    assert all(p.dtype == (torch.bfloat16 if half else torch.float32) for p in frozen)
    assert _checkpointing_on(m.unet) == bool(lever.get("gradient_checkpointing"))
    if "autocast" in lever:
        # the lever really lowered the arithmetic: the step is not the fp32 one
        assert _rel(got["update"], reference["update"]) > 1e-6


def test_levers_without_arithmetic_change_nothing(reference: dict[str, Any]) -> None:
    got = _run({"free_inner_state": False, "offload_idle": True})
    for a, b in zip(got["update"], reference["update"]):
        assert torch.equal(a, b)


def test_gradient_checkpointing_through_the_method_is_exact_float64() -> None:
    plain = _run({}, torch.float64)
    ckpt = _run({"gradient_checkpointing": True}, torch.float64)
    assert _checkpointing_on(ckpt["method"].unet)
    assert not _checkpointing_on(plain["method"].unet)
    assert _rel(ckpt["update"], plain["update"]) < 1e-12
    assert _rel(ckpt["hyper"], plain["hyper"]) < 1e-12


def test_autocast_needs_fp32_trained_tensors() -> None:
    prob = _problem()
    prob.unet.to(torch.bfloat16)
    with pytest.raises(UserError, match="fp32 trained tensors"):
        build_method("resalign", prob, _spec({"autocast": "bf16"}))


def test_denoiser_autocast_scope(reference: dict[str, Any]) -> None:
    den = build_method("resalign", _problem(), _spec({"autocast": "bf16"})).den
    assert den.mode == "none"  # regularizer and HVPs: fp32
    with den.low_precision():
        assert den.mode == "bf16"  # inner fine-tuning and L_harm
    assert den.mode == "none"
    half = build_method(
        "resalign", _problem(), _spec({"autocast": "bf16", "frozen_dtype": "bfloat16"})
    ).den
    assert half.mode == "bf16"  # half weights: every forward under autocast
