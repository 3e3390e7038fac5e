"""Meta-learning split over 2 gloo processes under torchrun equals one process.

The file is both the test and the worker: pytest launches
``python -m torch.distributed.run --nproc_per_node 2 tests/test_distributed.py OUT [MODE]`` and
the same worker code once without torchrun, then compares the saved outer updates. Two
workers: the split on its own (a hand-written inner loop), and the real ``resalign`` method
(tiny diffusers UNet, float64, Moreau hypergradient) taking outer steps.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

J = 5  # odd, so the ranks get unequal shares (3 and 2)
OUTER_STEPS = 2
METHOD_J = 3


def _worker(out: str) -> None:
    from resalign.algorithms import distributed as D
    from resalign.algorithms.hypergrad import moreau_hypergradient

    ctx = D.setup()
    torch.manual_seed(0)
    dtype = torch.float64
    # A tiny denoiser-shaped model: 8-d inputs, 16 hidden, two trainable matrices.
    w1 = torch.randn(16, 8, dtype=dtype) * 0.3
    w2 = torch.randn(8, 16, dtype=dtype) * 0.3
    params = [w1, w2]
    x_harm = torch.randn(32, 8, dtype=dtype)
    pools = [torch.randn(32, 8, dtype=dtype) + k for k in range(3)]

    def loss(ps, x, noise):
        h = torch.tanh((x + noise) @ ps[0].T)
        return ((h @ ps[1].T - noise) ** 2).mean()

    configs = [
        {"lr": lr, "steps": s, "pool": p}
        for lr, s, p in [(0.05, 3, 0), (0.1, 2, 1), (0.02, 4, 2), (0.05, 2, 2), (0.1, 3, 0)]
    ]
    assert len(configs) == J
    for step in range(OUTER_STEPS):

        def per_config(j, cfg, step=step, params=params):
            g = torch.Generator().manual_seed(D.config_seed(7, step, j))
            data = pools[cfg["pool"]]
            cur = [p.clone() for p in params]
            for _ in range(cfg["steps"]):
                idx = torch.randint(0, len(data), (8,), generator=g)
                noise = torch.randn(8, 8, generator=g, dtype=dtype)
                leaves = [c.requires_grad_(True) for c in cur]
                grads = torch.autograd.grad(loss(leaves, data[idx], noise), leaves)
                cur = [(c - cfg["lr"] * gr).detach() for c, gr in zip(leaves, grads)]
            idx = torch.randint(0, len(data), (8,), generator=g)
            ft_noise = torch.randn(8, 8, generator=g, dtype=dtype)
            h_noise = torch.randn(32, 8, generator=g, dtype=dtype)
            leaves = [c.clone().requires_grad_(True) for c in cur]
            b = torch.autograd.grad(-loss(leaves, x_harm, h_noise), leaves)
            hyper, stats = moreau_hypergradient(
                b, lambda ps: loss(ps, data[idx], ft_noise), cur, max_norm=None
            )
            return hyper, {"j": j, "rank": ctx.rank, "residuals": stats.residuals}

        mean, stats = D.meta_hypergradient(configs, per_config, params, ctx)
        params = [p - 0.1 * m for p, m in zip(params, mean)]
        assert [s["j"] for s in stats] == list(range(J))
    if ctx.is_main:
        torch.save(
            {"params": params, "ranks": [s["rank"] for s in stats], "world": ctx.world_size},
            out,
        )
    D.teardown()


def _method_worker(out: str) -> None:
    """Two outer steps of the real ResAlign method, J = 3 configs (ranks get 2 and 1)."""
    from resalign.algorithms import distributed as D
    from resalign.algorithms.methods import UnlearnProblem, build_method
    from resalign.algorithms.toy import toy_pairs, toy_scheduler, toy_unet
    from resalign.models.trainable import apply_trainable
    from resalign.spec.schema.model import TrainableSpec
    from resalign.spec.schema.unlearn import UnlearnSpec

    ctx = D.setup()
    torch.manual_seed(0)
    dtype = torch.float64
    unet = toy_unet("tiny", dtype)
    sel = apply_trainable(unet, TrainableSpec(), torch.Generator().manual_seed(1))
    problem = UnlearnProblem(
        unet,
        toy_scheduler(),
        sel,
        harmful=toy_pairs(6, 8, seed=1, dtype=dtype, shift=1.0),
        retain=toy_pairs(6, 8, seed=2, dtype=dtype),
        pools={
            "a": toy_pairs(6, 8, seed=3, dtype=dtype),
            "b": toy_pairs(6, 8, seed=4, dtype=dtype),
        },
        default_pool=["a", "b"],
        uncond=torch.zeros(1, 4, 8, dtype=dtype),
    )
    spec = UnlearnSpec.model_validate(
        {
            "steps": 2,
            "optimizer": {"lr": 0.02},
            "resilience": {
                "hypergradient": {"kind": "moreau", "iterations": 2, "max_norm": None},
                "meta": {
                    "samples_per_step": METHOD_J,
                    "data": ["a", "b"],
                    "distribution": {
                        "lr": [1e-3, 1e-2],
                        "steps": [1, 2],
                        "optimizer": ["sgd", "adam"],
                    },
                },
            },
        }
    )
    seen: list[dict] = []
    m = build_method("resalign", problem, spec, seed=3, callback=seen.append)
    calls: list[int] = []
    inner = m.hypergradient

    def counted(*a, **k):
        calls.append(m.step_count)
        return inner(*a, **k)

    m.hypergradient = counted
    for _ in range(2):
        m.step()
    parts = [None] * ctx.world_size
    if ctx.distributed:
        import torch.distributed as dist

        dist.all_gather_object(parts, len(calls))
    else:
        parts = [len(calls)]
    if ctx.is_main:
        keys = [f"meta{j}.{k}" for j in range(METHOD_J) for k in ("config", "data", "inner_loss")]
        torch.save(
            {
                "params": [p.detach().clone() for p in m.params],
                "stats": [[s[k] for k in keys] for s in seen],
                "calls": parts,
                "world": ctx.world_size,
            },
            out,
        )
    D.teardown()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _single_and_torchrun(tmp_path: Path, *mode: str) -> tuple[dict, dict]:
    single, multi = tmp_path / "single.pt", tmp_path / "multi.pt"
    subprocess.run(
        [sys.executable, __file__, str(single), *mode], env=_env(), check=True, timeout=180
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            __file__,
            str(multi),
            *mode,
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return torch.load(single, weights_only=True), torch.load(multi, weights_only=True)


def test_torchrun_two_gloo_processes_equal_one_process(tmp_path):
    a, b = _single_and_torchrun(tmp_path)
    assert a["world"] == 1 and b["world"] == 2
    # the configs really were split: j even on rank 0, j odd on rank 1
    assert b["ranks"] == [j % 2 for j in range(J)] and a["ranks"] == [0] * J
    moved = max(float((p - q).abs().max()) for p, q in zip(a["params"], b["params"]))
    for p, q in zip(a["params"], b["params"]):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-13)
    # and the update was not trivially zero
    torch.manual_seed(0)
    w1 = torch.randn(16, 8, dtype=torch.float64) * 0.3
    assert float((a["params"][0] - w1).abs().max()) > 1e-4
    assert moved < 1e-12


def test_resalign_method_step_under_torchrun_equals_one_process(tmp_path):
    a, b = _single_and_torchrun(tmp_path, "method")
    assert a["world"] == 1 and b["world"] == 2
    # 2 outer steps x 3 configs: one process ran all 6, the ranks 4 and 2 (j = 0, 2 | 1)
    assert a["calls"] == [2 * METHOD_J] and b["calls"] == [4, 2]
    # the same configs and data were drawn, and each config's inner run saw the same batches
    assert [s[0::3] for s in a["stats"]] == [s[0::3] for s in b["stats"]]
    assert [s[1::3] for s in a["stats"]] == [s[1::3] for s in b["stats"]]
    for x, y in zip(a["stats"], b["stats"]):
        torch.testing.assert_close(
            torch.tensor(y[2::3], dtype=torch.float64),
            torch.tensor(x[2::3], dtype=torch.float64),
            rtol=1e-12,
            atol=0,
        )
    # equal updates: the summation order differs (rank-local partial sums), so float64
    # rounding, not bitwise
    for p, q in zip(a["params"], b["params"]):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12)
    # and the two outer steps moved the parameters
    ref = toy_params()
    assert max(float((p - r).abs().max()) for p, r in zip(a["params"], ref)) > 1e-4


def toy_params() -> list[torch.Tensor]:
    from resalign.algorithms.toy import toy_unet
    from resalign.models.trainable import apply_trainable
    from resalign.spec.schema.model import TrainableSpec

    unet = toy_unet("tiny", torch.float64)
    sel = apply_trainable(unet, TrainableSpec(), torch.Generator().manual_seed(1))
    params = dict(unet.named_parameters())
    return [params[n].detach().clone() for n in sel.names]


def test_assignment_and_seeds_do_not_depend_on_rank():
    from resalign.algorithms import distributed as D

    shares = [D.assigned(7, D.DistContext(rank=r, world_size=3)) for r in range(3)]
    assert sorted(j for s in shares for j in s) == list(range(7))
    assert shares[0] == [0, 3, 6]
    assert D.assigned(7, D.DistContext()) == list(range(7))
    seeds = {D.config_seed(0, s, j) for s in range(50) for j in range(15)}
    assert len(seeds) == 750 and all(0 <= x < 2**63 for x in seeds)


if __name__ == "__main__":
    if sys.argv[2:] == ["method"]:
        _method_worker(sys.argv[1])
    else:
        _worker(sys.argv[1])
