"""Test-only step kinds for the engine tests, a small graph builder, and a CLI for subprocesses.

The steps do real (small) torch work: a float64 MLP trained with Adam on a random regression
set, checkpointing its full state (weights, optimizer, data RNG) through ``ctx``, so an
interrupted and resumed run can be compared bit for bit with an uninterrupted one.

Failure injection without touching node keys: ``ENGINE_TEST_FAIL=<node name>:<step>``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from resalign.graph.nodes import Graph, Node
from resalign.spec.schema.tracking import TrackingSpec
from resalign.steps.base import Step, StepContext, register


class TinySpec(BaseModel):
    name: str = "engine-test"
    seed: int = 0
    tracking: TrackingSpec = Field(default_factory=lambda: TrackingSpec(system_metrics=False))


def _maybe_fail(ctx: StepContext, step: int) -> None:
    want = os.environ.get("ENGINE_TEST_FAIL", "")
    if want and want == f"{ctx.node.name}:{step}":
        raise RuntimeError(f"injected failure at step {step}")


@register
class TData(Step):
    kind = "t_data"

    def run(self, ctx: StepContext) -> None:
        import torch
        from safetensors.torch import save_file

        p = ctx.params
        g = torch.Generator().manual_seed(int(p["seed"]))
        x = torch.randn(int(p["n"]), int(p["dim"]), generator=g, dtype=torch.float64)
        w = torch.randn(int(p["dim"]), 1, generator=g, dtype=torch.float64)
        y = torch.sin(x @ w) + 0.05 * torch.randn(int(p["n"]), 1, generator=g, dtype=torch.float64)
        save_file({"x": x, "y": y}, str(ctx.out / "data.safetensors"))


def _mlp(dim: int, hidden: int) -> Any:
    import torch

    return torch.nn.Sequential(
        torch.nn.Linear(dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
    ).double()


def _train(ctx: StepContext, model: Any, data_dir: Path) -> None:
    """Adam on minibatches; checkpoint every ``ckpt`` steps; resume from ctx.load_checkpoint."""
    import torch
    from safetensors.torch import load_file, save_file

    p = ctx.params
    d = load_file(str(data_dir / "data.safetensors"))
    x, y = d["x"], d["y"]
    opt = torch.optim.Adam(model.parameters(), lr=float(p["lr"]))
    gen = torch.Generator().manual_seed(int(p["seed"]))
    start = 0
    ck = ctx.load_checkpoint()
    if ck is not None:
        state, start = ck
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
    every = ctx.checkpoint_every or int(p["ckpt"])
    steps = int(p["steps"])
    with ctx.progress(steps - start, "train") as bar:
        for step in range(start + 1, steps + 1):
            idx = torch.randint(0, x.shape[0], (int(p["batch"]),), generator=gen)
            loss = ((model(x[idx]) - y[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            gn = torch.sqrt(sum((q.grad**2).sum() for q in model.parameters()))
            opt.step()
            ctx.log_metrics({"loss": loss.item(), "grad_norm": gn.item()}, step=step)
            _maybe_fail(ctx, step)
            if float(p.get("sleep", 0)):
                time.sleep(float(p["sleep"]))
            if step % every == 0 and step < steps:
                ctx.save_checkpoint(
                    {"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state()},
                    step,
                )
            bar.advance()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(ctx.out / "weights.safetensors"),
    )


@register
class TTrain(Step):
    kind = "t_train"

    def run(self, ctx: StepContext) -> None:
        import torch

        torch.manual_seed(int(ctx.params["seed"]))
        model = _mlp(int(ctx.params["dim"]), int(ctx.params["hidden"]))
        _train(ctx, model, ctx.inputs["data"])
        ctx.log_params({"n_params": sum(q.numel() for q in model.parameters())})


@register
class TAttack(Step):
    """Fine-tune the trained weights (stands in for an attack)."""

    kind = "t_attack"

    def run(self, ctx: StepContext) -> None:
        from safetensors.torch import load_file

        model = _mlp(int(ctx.params["dim"]), int(ctx.params["hidden"]))
        model.load_state_dict(load_file(str(ctx.inputs["model"] / "weights.safetensors")))
        _train(ctx, model, ctx.inputs["data"])


@register
class TEval(Step):
    kind = "t_eval"

    def run(self, ctx: StepContext) -> None:
        import torch
        from safetensors.torch import load_file

        d = load_file(str(ctx.inputs["data"] / "data.safetensors"))
        model = _mlp(int(ctx.params["dim"]), int(ctx.params["hidden"]))
        model.load_state_dict(load_file(str(ctx.inputs["model"] / "weights.safetensors")))
        with torch.no_grad():
            mse = float(((model(d["x"]) - d["y"]) ** 2).mean())
        (ctx.out / "metrics.json").write_text(json.dumps({"mse": {"value": mse}}))
        ctx.log_metrics({"mse": mse})


@register
class TWriter(Step):
    """Writes ``chunks`` chunks of a deterministic payload slowly (crash-safety tests)."""

    kind = "t_writer"

    def run(self, ctx: StepContext) -> None:
        n = int(ctx.params["chunks"])
        payload = expected_payload(n)
        with open(ctx.out / "payload.bin", "wb") as f:
            for i in range(n):
                f.write(payload[i * 4096 : (i + 1) * 4096])
                f.flush()
                time.sleep(float(ctx.params["sleep"]))
        (ctx.out / "sha256.txt").write_text(hashlib.sha256(payload).hexdigest())


def expected_payload(chunks: int) -> bytes:
    return b"".join(hashlib.sha256(str(i).encode()).digest() * 128 for i in range(chunks))


def key_of(kind: str, params: dict[str, Any], deps: list[str]) -> str:
    blob = json.dumps([kind, "1", params, sorted(deps)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def make_graph(
    name: str = "engine-test",
    *,
    steps: int = 30,
    ckpt: int = 5,
    sleep: float = 0.0,
    attack_lrs: dict[str, float] | None = None,
    attack_steps: int = 10,
    writer_chunks: int = 0,
    writer_sleep: float = 0.0,
) -> Graph:
    """data -> train -> attack/<t> -> evaluate/<t>, plus evaluate/pre (like the real graph)."""
    attack_lrs = {"a": 0.01, "b": 0.02} if attack_lrs is None else attack_lrs
    g = Graph(spec_name=name, spec_hash=hashlib.sha256(name.encode()).hexdigest()[:16])

    def add(kind: str, nname: str, params: dict[str, Any], deps: dict[str, str]) -> None:
        key = key_of(kind, params, [g[d].key for d in deps.values()])
        g.nodes[nname] = Node(kind=kind, name=nname, params=params, deps=deps, key=key)

    if writer_chunks:
        add("t_writer", "writer", {"chunks": writer_chunks, "sleep": writer_sleep}, {})
        return g
    arch = {"dim": 4, "hidden": 16}
    add("t_data", "data", {"n": 64, "dim": 4, "seed": 1}, {})
    add(
        "t_train",
        "train",
        {**arch, "steps": steps, "lr": 0.01, "seed": 2, "batch": 8, "ckpt": ckpt, "sleep": sleep},
        {"data": "data"},
    )
    add("t_eval", "evaluate/pre", arch, {"model": "train", "data": "data"})
    for t, lr in attack_lrs.items():
        add(
            "t_attack",
            f"attack/{t}",
            {**arch, "steps": attack_steps, "lr": lr, "seed": 3, "batch": 8, "ckpt": 5},
            {"model": "train", "data": "data"},
        )
        add("t_eval", f"evaluate/{t}", arch, {"model": f"attack/{t}", "data": "data"})
    return g


def main(argv: list[str] | None = None) -> int:
    """Run the test graph (used by the tests' subprocesses)."""
    from resalign.engine.progress import ProgressUI
    from resalign.engine.runner import RunFailed, run_graph
    from resalign.errors import UserError

    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--writer-chunks", type=int, default=0)
    ap.add_argument("--writer-sleep", type=float, default=0.0)
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--no-tracking", action="store_true")
    ap.add_argument("--attacks", default=None, help="name=lr,... (default a=0.01,b=0.02)")
    ap.add_argument("--attack-steps", type=int, default=10)
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args(argv)
    lrs = None
    if a.attacks is not None:
        lrs = {k: float(v) for k, v in (x.split("=") for x in a.attacks.split(",") if x)}
    graph = make_graph(
        steps=a.steps,
        sleep=a.sleep,
        writer_chunks=a.writer_chunks,
        writer_sleep=a.writer_sleep,
        attack_lrs=lrs,
        attack_steps=a.attack_steps,
    )
    from resalign.engine.options import RunOptions

    try:
        run_graph(
            graph,
            TinySpec(),
            RunOptions(
                store=a.root,
                tracking=not a.no_tracking,
                tracking_uri=a.tracking_uri,
                device="cpu",
                ui=ProgressUI(enabled=False),
                workers=a.workers,
                command=[sys.executable, __file__, *(argv or sys.argv[1:])],
            ),
        )
    except RunFailed as e:
        return e.exit_code
    except UserError as e:  # as `resalign run` renders it (cli._Group)
        print(e.render(), file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
