"""λ_max of the fine-tuning Hessian of a digits spec's UNet (docs/algorithm.md, "γ and the
curvature of the model").

    python scripts/lambda_max_digits.py [SPEC] [WORKDIR]

Builds (or reuses) SPEC's model node in WORKDIR/model (the demo's pretraining: ~10 min on a
loaded 2-core CPU), builds the ResAlign row's unlearning problem exactly as the unlearn step
does, and prints power-iteration estimates (double-backward HVPs, 30 iterations at most, stop at
1e-3 relative change) of λ_max of ∇²L_FT on fresh batches of 16 of the meta data: at the
original weights (two batches) and at θ* after each of the row's simulated fine-tunes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import resalign.algorithms.methods as methods
from resalign.algorithms.hypergrad import make_hvp, power_iteration
from resalign.algorithms.inner import FunctionalOptimizer, finetune_loss, simulate_finetune
from resalign.algorithms.objectives import noise_batch
from resalign.engine.context import NodeContext
from resalign.graph.compile import compile_spec
from resalign.models.attention import math_attention
from resalign.spec.loader import load_spec_text
from resalign.steps.model import ModelStep
from resalign.steps.unlearn import UnlearnStep


def main() -> None:
    spec_path = Path(sys.argv[1] if len(sys.argv) > 1 else "specs/digits_demo.yaml").resolve()
    work = Path(sys.argv[2] if len(sys.argv) > 2 else "runs/lambda_max").resolve()
    torch.set_num_threads(1)
    resolved = load_spec_text(spec_path.read_text(), base_dir=spec_path.parent)
    graph = compile_spec(resolved)
    model_out = work / "model"
    if not (model_out / "model.json").is_file():
        model_out.mkdir(parents=True, exist_ok=True)
        ctx = NodeContext(
            node=graph["model"], spec=resolved, inputs={}, out=model_out, state=work / "model_state"
        )
        ModelStep().run(ctx)
        ctx.close()
    real = methods.build_method
    result: dict[str, list[float]] = {}

    def lam(m: methods.Method, theta: dict[str, torch.Tensor], nb: object) -> list[float]:
        names = list(theta)
        ft = finetune_loss(m.den, {}, 1.0)
        with math_attention(m.unet):
            hvp = make_hvp(lambda ps: ft(dict(zip(names, ps)), nb, None), list(theta.values()))
            est, n = power_iteration(
                hvp, list(theta.values()), 30, torch.Generator().manual_seed(0)
            )
        return [est, float(n)]

    def measure(
        name: str,
        problem: object,
        spec: object,
        seed: int = 0,
        callback: object = None,
        phases: object = None,
    ) -> methods.Method:
        m = real(name, problem, spec, seed, callback)
        gen = torch.Generator().manual_seed(1)
        pool = problem.pools[problem.default_pool[0]]  # type: ignore[attr-defined]
        for i in range(2):
            result[f"original_batch{i}"] = lam(
                m, m.theta(), noise_batch(pool.sample(16, gen), m.den.scheduler, gen)
            )
        for cfg in m.candidates:  # type: ignore[attr-defined]
            view = m._view(cfg)  # type: ignore[attr-defined]
            psi0 = {k: v.detach() for k, v in view.start(m.theta()).items()}
            data = problem.pools[cfg.data or problem.default_pool[0]]  # type: ignore[attr-defined]
            res = simulate_finetune(
                m.den,
                view,
                psi0,
                FunctionalOptimizer(cfg.optimizer, cfg.lr),
                cfg.steps,
                data,
                cfg.batch_size,
                gen,
            )
            nb = noise_batch(data.sample(16, gen), m.den.scheduler, gen)
            result[f"theta_star_{cfg.name}"] = lam(m, res.params, nb)
        print(json.dumps(result, indent=1))
        raise SystemExit(0)

    methods.build_method = measure  # type: ignore[assignment]
    node = next(
        n
        for n in graph.of_kind("unlearn")
        if n.row == resolved.spec.unlearn.label or n.name.startswith("unlearn/resalign")
    )
    out = work / "unlearn"
    out.mkdir(parents=True, exist_ok=True)
    ctx = NodeContext(
        node=node, spec=resolved, inputs={"model": model_out}, out=out, state=work / "unlearn_state"
    )
    UnlearnStep().run(ctx)


if __name__ == "__main__":
    main()
