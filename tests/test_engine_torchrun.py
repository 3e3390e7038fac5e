"""The engine runs the unlearn node on torchrun ranks (2 gloo processes on CPU).

* The real unlearn node of a J=2 variant of tests/specs/tiny.yaml (each rank runs one of the
  two configs per outer step) gives the same weights, statistics and node key as the
  single-process run, and its MLflow run gets rank 0's metrics once.
* A failing rank is reported (which rank, its exit code, its error, its output) without a hang
  and without a committed result; ranks other than 0 write nothing shared.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from resalign.cli import cli

TESTS = Path(__file__).resolve().parent
TINY = TESTS / "specs" / "tiny.yaml"


def _spec(tmp_path: Path, name: str, **top: object) -> Path:
    """tiny.yaml with J = 2 configs per outer step (one per rank), no baselines or threats."""
    d = yaml.safe_load(TINY.read_text(encoding="utf-8"))
    d["name"] = "tiny-ranks"
    d.pop("baselines")
    d.pop("threats")
    meta = d["unlearn"]["resilience"]["meta"]
    meta["samples_per_step"] = 2
    meta["configs"]["adam"] = {
        "algorithm": "full",
        "optimizer": "adam",
        "lr": 1.0e-3,
        "steps": 2,
        "batch_size": 4,
        "data": "retain",
    }
    d["tracking"]["system_metrics"] = False
    d.update(top)
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d), encoding="utf-8")
    return p


@pytest.mark.slow
def test_unlearn_node_on_two_ranks_equals_one_process(tmp_path):
    import torch
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from resalign.engine.options import RunOptions
    from resalign.engine.progress import ProgressUI
    from resalign.engine.runner import run_graph
    from resalign.engine.store import Store, read_metrics
    from resalign.graph.compile import compile_spec
    from resalign.graph.nodes import Graph
    from resalign.spec import load_spec

    plain = _spec(tmp_path, "plain.yaml")
    placed = _spec(tmp_path, "placed.yaml", execution={"nproc_per_node": 2})
    g1, g2 = compile_spec(load_spec(plain)), compile_spec(load_spec(placed))
    # the process count is placement, not content: no key and not the spec hash change
    assert {n.name: n.key for n in g1} == {n.name: n.key for n in g2}
    assert g1.spec_hash == g2.spec_hash
    un = g1["unlearn/resalign/seed0"]

    one, two = tmp_path / "one", tmp_path / "two"
    # the single-process reference: the model and unlearn nodes only, in this process
    sub = Graph(g1.spec_name, g1.spec_hash, {n: g1[n] for n in ("model", un.name)})
    quiet = RunOptions(store=one, tracking=False, ui=ProgressUI(enabled=False))
    run_graph(sub, load_spec(plain), quiet)
    # the model node is shared, so only the unlearn node (and what follows) runs again
    m = g1["model"]
    shutil.copytree(Store(one).node_dir(m.kind, m.key), Store(two).node_dir(m.kind, m.key))
    t0 = time.perf_counter()
    r2 = CliRunner().invoke(
        cli, ["run", str(plain), "--store", str(two), "--nproc-per-node", "2", "-v"]
    )
    seconds = time.perf_counter() - t0
    assert r2.exit_code == 0, r2.output
    assert "unlearn/resalign/seed0: 2 processes (torchrun, gloo)" in r2.output
    assert seconds < 240

    d1, d2 = Store(one).node_dir(un.kind, un.key), Store(two).node_dir(un.kind, un.key)
    assert json.loads((d1 / "stats.json").read_text())["processes"] == 1
    assert json.loads((d2 / "stats.json").read_text())["processes"] == 2
    # The same sampled configs, and each config's inner run saw the same batches.
    h1 = [json.loads(x) for x in (d1 / "steps.jsonl").read_text().splitlines()]
    h2 = [json.loads(x) for x in (d2 / "steps.jsonl").read_text().splitlines()]
    assert [(h["meta0.config"], h["meta1.config"]) for h in h1] == [
        (h["meta0.config"], h["meta1.config"]) for h in h2
    ]
    assert {h["meta0.config"] for h in h1} | {h["meta1.config"] for h in h1} == {"sgd", "adam"}
    w1 = load_file(str(d1 / "trainable.safetensors"))
    w2 = load_file(str(d2 / "trainable.safetensors"))
    assert w1.keys() == w2.keys() and len(w1) > 0
    # float32. The one operation whose order differs is the sum of the two configs'
    # hypergradients (each rank holds one, then the all-reduce adds them): at most one
    # rounding of that sum per outer step, ~1e-7 relative, which Adam's normalised 1e-3 step
    # turns into ~1e-10 absolute on the weights; 1e-8 leaves two orders of margin.
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-6, atol=1e-8)
    # Per-config statistics: config 1 ran on rank 1, yet its inner losses and hypergradient
    # norm are those of the single process (same tolerance reasoning, no sum involved).
    for a, b in zip(h1, h2):
        for k in ("meta0.inner_loss", "meta1.inner_loss", "meta0.hypergrad_norm",
                  "meta1.hypergrad_norm", "hypergrad_norm"):  # fmt: skip
            torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=0)
        # a real update: Adam moves every weight with a non-zero gradient by ~lr per step
        assert a["meta1.hypergrad_norm"] > 0 and a["direct_grad_norm"] > 0

    # rank 0 alone logged: each step once, locally and in MLflow; the launch folder is gone
    local = read_metrics(d2 / "metrics.jsonl")
    assert [r["step"] for r in local] == [1, 2]
    assert not (Store(two).root / "launch" / un.kind / un.key).exists()
    c = MlflowClient(f"sqlite:///{Store(two).root / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("tiny").experiment_id])
    run = next(r for r in runs if r.data.tags.get("resalign.node.name") == "unlearn/resalign/seed0")
    assert run.info.status == "FINISHED"
    hist = c.get_metric_history(run.info.run_id, "hypergrad_norm")
    assert [(h.step, h.value) for h in hist] == [(r["step"], r["hypergrad_norm"]) for r in local]
    # tracking.log_models is false by default: the merged UNet stays local, referenced
    assert run.data.tags["resalign.node.dir"] == str(d2)
    arts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"trainable.safetensors", "lora", "stats.json", "local_models.json"} <= arts
    assert "unet" not in arts

    # the other spec (execution.nproc_per_node: 2) finds everything cached
    plan = CliRunner().invoke(cli, ["plan", str(placed), "--store", str(two)])
    assert plan.exit_code == 0 and plan.output.count("[cached]") == len(g1), plan.output


def _driver(
    root: Path, *args: str, timeout: float = 150
) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); import distributed_steps as d; "
        f"sys.exit(d.main(sys.argv[1:]))"
    )
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-c", code, "--root", str(root), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    return r, time.perf_counter() - t0


@pytest.mark.parametrize("mode", ["raise", "exit"])
def test_failing_rank_is_reported_not_hung(tmp_path, mode):
    """Rank 1 fails while rank 0 waits in an all-reduce that can never complete."""
    from distributed_steps import make_graph

    from resalign.engine.store import Store, read_metrics

    r, seconds = _driver(tmp_path, "--fail-rank", "1", "--mode", mode)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert seconds < 120  # the whole job was stopped, not left waiting on the dead peer
    failed = [line for line in out.splitlines() if line.startswith("FAILED ranks: ")]
    assert len(failed) == 1, out
    line = failed[0]
    assert "torchrun with 2 processes exited with code 1: " in line
    if mode == "raise":
        # the first failure named first, with its exit code and its exception
        assert "rank 1 failed (exit code 1): RuntimeError: injected failure on rank 1" in line
    else:
        # no error record: the exit code as torchrun saw it, and the rank's last words
        assert "rank 1 died (exit code 7), last output: rank 1 exiting hard" in line
    assert "; rank 0 then " in line  # rank 0 was stopped after it
    node = make_graph(fail_rank=1, mode=mode, code=7)["ranks"]
    logs = Store(tmp_path).root / "launch" / node.kind / node.key
    assert f"last lines of {logs / 'rank1.log'}" in out.replace("\n", "")
    # nothing committed, no staging left; rank 0's output never became a result
    assert not Store(tmp_path).is_complete(node.kind, node.key)
    assert not list((Store(tmp_path).root / node.kind).glob(".tmp-*"))
    if mode == "raise":
        # Before failing, both ranks took part in the all-reduce (1 + 2 = 3) and both logged
        # it: only rank 0's record reached the node's metrics; rank 1 wrote to its scratch.
        state = Store(tmp_path).state_dir(node.kind, node.key)
        assert read_metrics(state / "metrics.jsonl") == [{"step": 1, "sum": 3.0, "rank": 0.0}]
        assert (logs / "rank1.out" / "written_by_rank1.txt").read_text() == "3.0\n"
        # rank 1's own record; rank 0's may be missing: stopped in the all-reduce, it can be
        # killed before it writes one (seen under load 4), which the driver reports as death
        rec = json.loads((logs / "rank1.json").read_text())
        assert rec["ok"] is False and not rec["user_error"]
