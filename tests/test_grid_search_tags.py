"""A grid whose cells search an attack (issue 22): every cell runs through ``run_spec``, so
its search trials run with the cell's options. Real MLflow (SQLite in tmp): each search
round's run sits under its cell's run and carries the cell's tags, and so does each trial's
attack run, so `tags.grid.cell = '<id>'` finds a cell's trials. Before run_spec the grid
called run_searches without the cell's tags and the rounds had none."""

from __future__ import annotations

from pathlib import Path

import pytest

SPEC = Path(__file__).resolve().parent / "specs" / "tiny_search.yaml"

# rows original and plain, one 2-step trial per row and cell; the cells' search seeds
# differ, so each cell has its own studies (a study shared by cells runs once, in the first)
TEMPLATE = """\
---
name: tiny_search_grid
matrix:
  search_seed: [0, 1]
---
extends: SPEC
name: tiny-search-grid-{{ cell.slug }}
threats:
  poison:
    search:
      trials: 1
      seed: {{ search_seed }}
tracking:
  experiment: tiny_search_grid
"""


@pytest.mark.slow
def test_a_grid_cells_search_trials_carry_the_cells_tags(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from resalign.engine.grid import run_grid
    from resalign.engine.options import RunOptions

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tpl = tmp_path / "tiny_search_grid.yaml.j2"
    tpl.write_text(TEMPLATE.replace("SPEC", str(SPEC)))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_grid(tpl, RunOptions(store=tmp_path / "runs", tracking_uri=uri))
    assert [c.cell_id for c in summary.cells] == ["search_seed=0", "search_seed=1"]

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny_search_grid").experiment_id
    runs = client.search_runs([exp], max_results=1000)
    for cell in summary.cells:
        seed = cell.cell_id.split("=")[1]
        want = {"resalign.grid": "tiny_search_grid", "grid.cell": cell.cell_id,
                "grid.axis.search_seed": seed}  # fmt: skip
        rounds = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == cell.run_id
                  and "resalign.search.round" in r.data.tags]  # fmt: skip
        assert len(rounds) == 1, [r.data.tags for r in runs]  # one trial, one round
        (rnd,) = rounds
        assert {k: rnd.data.tags.get(k) for k in want} == want
        assert rnd.data.params["axis.search_seed"] == seed
        trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == rnd.info.run_id
                  and r.data.tags.get("resalign.kind") == "attack"]  # fmt: skip
        assert sorted(t.data.tags["resalign.node.name"] for t in trials) == [
            "attack/original/poison:trial0/seed1/step2",
            "attack/plain/seed0/poison:trial0/seed1/step2",
        ]
        for trial in trials:
            assert trial.data.tags["resalign.search.trial"] == "0"
            assert {k: trial.data.tags.get(k) for k in want} == want
        # MLflow filters on a run's own tags: the cell's trials are found by the cell's tag
        found = client.search_runs(
            [exp], f"tags.`grid.cell` = '{cell.cell_id}' and tags.`resalign.search.trial` = '0'"
        )
        assert sorted(r.info.run_id for r in found) == sorted(t.info.run_id for t in trials)
