"""The ``execution`` section: how nodes are placed on processes. Never part of a node's key."""

from __future__ import annotations

from pydantic import Field, PositiveInt

from .base import StrictModel


class ExecutionSpec(StrictModel):
    """Process placement. Like ``model.device`` it changes where a node runs, not what it
    computes, so it enters no node key and not the spec hash: a node cached with one process
    count is reused with another."""

    nproc_per_node: PositiveInt = Field(
        default=1,
        description="processes (torchrun ranks, one per GPU on CUDA) each unlearn node runs "
        "on: the J sampled fine-tuning configs of every outer step are split over them and "
        "the hypergradients all-reduced (same result to float tolerance); 1 = in the engine's "
        "own process. `resalign run --nproc-per-node N` overrides it",
    )
