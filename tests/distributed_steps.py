"""A test-only step kind the engine runs on torchrun ranks, and a driver CLI for subprocesses.

``t_ranks`` (``distributed = True``) joins the ranks in one all-reduce, logs it, writes it to
``ctx.out``; with ``fail_rank`` set that rank then fails (``mode`` ``raise``: an exception;
``exit``: ``os._exit(code)`` without a word, as a crash in native code would) while the other
ranks wait in a second all-reduce that can never complete, so only the launcher's handling
keeps the run from hanging.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from typing import Any

from pydantic import BaseModel, Field

from resalign.graph.nodes import Graph, Node
from resalign.spec.schema.execution import ExecutionSpec
from resalign.steps.base import Step, StepContext, register


class RankSpec(BaseModel):
    name: str = "ranks-test"
    seed: int = 0
    # the engine reads the process count from here unless run_graph is given one
    execution: ExecutionSpec = Field(default_factory=lambda: ExecutionSpec(nproc_per_node=2))


@register
class TRanks(Step):
    kind = "t_ranks"
    distributed = True

    def run(self, ctx: StepContext) -> None:
        import torch
        import torch.distributed as dist

        from resalign.algorithms import distributed as D

        d = D.current()
        t = torch.tensor([float(d.rank + 1)])
        if d.distributed:
            dist.all_reduce(t)
        ctx.log_metrics({"sum": float(t), "rank": float(d.rank)}, step=1)
        ctx.log_params({"world": d.world_size})
        (ctx.out / f"written_by_rank{d.rank}.txt").write_text(f"{float(t)}\n")
        fail = ctx.params.get("fail_rank")
        if fail is not None and d.rank == int(fail):
            if ctx.params.get("mode") == "exit":
                sys.stderr.write(f"rank {d.rank} exiting hard\n")
                sys.stderr.flush()
                os._exit(int(ctx.params.get("code", 7)))
            raise RuntimeError(f"injected failure on rank {d.rank}")
        if fail is not None and d.distributed:
            dist.all_reduce(t)  # the failed rank never joins: blocks until torchrun stops us


def make_graph(**params: Any) -> Graph:
    key = hashlib.sha256(repr(sorted(params.items())).encode()).hexdigest()[:24]
    g = Graph(spec_name="ranks-test", spec_hash=key[:16])
    g.nodes["ranks"] = Node(kind="t_ranks", name="ranks", params=params, deps={}, key=key)
    return g


def main(argv: list[str] | None = None) -> int:
    from resalign.engine.options import RunOptions
    from resalign.engine.progress import ProgressUI
    from resalign.engine.runner import RunFailed, run_graph

    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--nproc", type=int, default=None)
    ap.add_argument("--fail-rank", type=int, default=None)
    ap.add_argument("--mode", default="raise")
    args = ap.parse_args(argv)
    graph = make_graph(fail_rank=args.fail_rank, mode=args.mode, code=7)
    try:
        run_graph(
            graph,
            RankSpec(),
            RunOptions(
                store=args.root,
                tracking=False,
                device="cpu",
                nproc_per_node=args.nproc,
                ui=ProgressUI(enabled=False),
            ),
        )
    except RunFailed as e:
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
