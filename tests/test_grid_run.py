"""A 2x2 grid on the tiny model, run for real: one MLflow grid run with four cell runs tagged
with their axes, nodes shared by the cells executed once (the cache), and `resalign report
TEMPLATE` making one table with a row per cell from the store. The cells run on two worker
processes from one pool. The slurm executor's job path
is tested on node tasks in tests/test_slurm.py; this grid's cell through submitit's local
cluster took ~190 s here (a fresh interpreter per node), too slow for this suite."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from resalign.cli import cli

TEMPLATE = """\
# 2x2 grid over plain unlearning's learning rate and steps on a seconds-long tiny model
---
name: tiny_grid
matrix:
  lr: [1.0e-3, 1.0e-2]
  steps: [1, 2]
---
version: 1
name: tiny-grid-{{ cell.slug }}
seed: 0
model:
  family: tiny
  device: cpu
  trainable: {kind: lora, rank: 2}
  noise_schedule: {beta_schedule: linear, beta_start: 1.0e-4, beta_end: 0.02}
  tiny:
    sample_size: 8
    block_out_channels: [8, 16]
    attention_head_dim: 8
    cross_attention_dim: 8
    text_hidden_size: 8
    text_layers: 1
    max_length: 32
    pretrain: {dataset: train, steps: 4, lr: 2.0e-3, batch_size: 16, seed: 0}
datasets:
  train: {type: digits, split: train, limit: 32}
  harmful: {type: digits, split: train, digits: [0], limit: 8}
  retain: {type: digits, split: train, digits: [1, 2, 3], limit: 8}
concepts:
  digit: {harmful: [harmful], retain: [retain], label: 0}
unlearn:
  method: plain
  label: unlearned
  steps: {{ steps }}
  optimizer: {name: adam, lr: {{ lr }}, weight_decay: 0.0}
  harmful_loss: {kind: neg_denoise, batch_size: 4}
  regularizers: [{kind: distill, weight: 1.0, batch_size: 4, schedule: {kind: constant}}]
evaluate:
  generation: {steps: 2, images_per_prompt: 1, batch_size: 10}
  metrics: [{kind: concept_rate}]
tracking:
  experiment: tiny_grid
"""

CELLS = ["lr=1.0e-3,steps=1", "lr=1.0e-3,steps=2", "lr=1.0e-2,steps=1", "lr=1.0e-2,steps=2"]
SHARED = {"model", "evaluate/original/pre/step0"}
OWN = {"unlearn/unlearned/seed0", "evaluate/unlearned/seed0/pre/step0", "report"}


@pytest.mark.slow
def test_two_by_two_grid_on_the_tiny_model(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from resalign.engine.executors.local import LocalExecutor
    from resalign.engine.grid import prepare, run_grid
    from resalign.engine.options import RunOptions
    from resalign.engine.store import Store

    tpl = tmp_path / "tiny_grid.yaml.j2"
    tpl.write_text(TEMPLATE)
    store = tmp_path / "runs"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    # on two worker processes, recording the executors and pools the grid makes
    made: list[LocalExecutor] = []
    pools: set[int] = set()
    shut: list[int] = []

    class Recording(LocalExecutor):
        def submit(self, task):
            fut = super().submit(task)
            pools.add(id(self._pool))
            return fut

        def shutdown(self):
            shut.append(len(pools))
            super().shutdown()

    def factory() -> LocalExecutor:
        made.append(Recording(workers=2))
        return made[-1]

    summary = run_grid(tpl, RunOptions(store=store, tracking_uri=uri, executor=factory))
    assert [c.cell_id for c in summary.cells] == CELLS
    # one executor and one spawn pool served the four cells' graph runs (a pool per cell
    # paid the workers' torch imports and first model load again), shut down once at the end
    assert len(made) == 1 and len(pools) == 1
    assert shut == [1] and made[0]._pool is None

    # shared nodes ran once, in the first cell; every later cell found them in the cache
    first, *rest = summary.cells
    assert set(first.executed) == SHARED | OWN and first.cached == []
    for c in rest:
        assert set(c.executed) == OWN and set(c.cached) == SHARED
    assert summary.executed == len(SHARED) + 4 * len(OWN) and summary.cache_hits == 3 * 2
    _, prepared = prepare(tpl)
    keys = {(n.kind, n.key) for _, g in prepared for n in g}
    assert len(keys) == len(SHARED) + 4 * len(OWN)  # distinct nodes of the four graphs
    st = Store(store)
    assert all(st.is_complete(k, key) for k, key in keys)
    done = {(p.parent.name, p.name) for p in store.glob("*/*") if (p / "DONE").is_file()}
    assert done == keys  # nothing computed twice under another key, nothing missing

    # MLflow: the grid run, four cell runs under it with axis tags/params, node runs under those
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny_grid")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    grid_runs = [r for r in runs if r.data.tags.get("resalign.grid") and not r.data.tags.get(
        "mlflow.parentRunId")]  # fmt: skip
    assert [r.info.run_id for r in grid_runs] == [summary.parent_run_id]
    grid_run = grid_runs[0]
    assert grid_run.data.metrics["grid.executed"] == summary.executed
    assert grid_run.data.metrics["grid.cache_hits"] == 6
    cell_runs = {
        r.data.tags["grid.cell"]: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == summary.parent_run_id
    }
    assert sorted(cell_runs) == sorted(CELLS)
    for cid, r in cell_runs.items():
        lr, steps = (kv.split("=")[1] for kv in cid.split(","))
        assert r.info.run_name == cid and r.info.status == "FINISHED"
        assert r.data.tags["grid.axis.lr"] == lr and r.data.tags["grid.axis.steps"] == steps
        assert r.data.params["axis.lr"] == lr and r.data.params["axis.steps"] == steps
        assert r.info.run_id == next(c.run_id for c in summary.cells if c.cell_id == cid)
        nodes = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == r.info.run_id]
        executed = next(c.executed for c in summary.cells if c.cell_id == cid)
        assert sorted(x.data.tags["resalign.node.name"] for x in nodes) == sorted(executed)
        assert all(x.info.status == "FINISHED" for x in nodes)

    # one table, a row per cell (original once: all cells share its evaluation)
    out = tmp_path / "report"
    res = CliRunner().invoke(cli, ["report", str(tpl), "--store", str(store), "--out", str(out)])
    assert res.exit_code == 0, res.output
    table = json.loads((out / "table.json").read_text())
    assert [r["row"] for r in table["table"]] == ["original", *CELLS]
    for (_, g), row in zip(prepared, table["table"][1:]):
        node = g["evaluate/unlearned/seed0/pre/step0"]
        metrics = json.loads((st.node_dir(node.kind, node.key) / "metrics.json").read_text())
        assert row["cells"]["concept_rate/pre"]["values"] == [metrics["concept_rate"]["value"]]
    for cid in CELLS:
        assert f"| {cid} |" in res.output

    # run again: every node of every cell is a cache hit
    again = run_grid(tpl, RunOptions(store=store, tracking=False))
    assert again.executed == 0 and again.cache_hits == 4 * (len(SHARED) + len(OWN))


def test_grid_report_names_the_missing_cell(tmp_path):
    tpl = tmp_path / "tiny_grid.yaml.j2"
    tpl.write_text(TEMPLATE)
    res = CliRunner().invoke(cli, ["report", str(tpl), "--store", str(tmp_path / "empty")])
    assert res.exit_code == 2
    assert "cell lr=1.0e-3,steps=1" in res.output and "resalign grid" in res.output
    assert "Traceback" not in res.output
