"""Summary runs are created from the invocation's record, once: what ``resalign sync`` relies
on after a server outage (the driver describes them in invocation.json before any exists)."""

from __future__ import annotations

import json

from resalign.engine.tracking.summaries import VIEW_TAG, sync_summaries


def test_summary_runs_are_created_once_with_the_view_and_the_note(tmp_path):
    from mlflow.tracking import MlflowClient

    from resalign.engine.tracking.uris import _client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = _client(uri)
    exp = c.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    parent = c.create_run(exp, run_name="t").info.run_id
    inv_dir = tmp_path / "tracking" / parent
    inv_dir.mkdir(parents=True)
    runs = [
        {"name": f"{row} u0 · t", "tags": {"resalign.kind": "summary", "resalign.row": row},
         "params": {"row": row}, "metrics": {"concept_rate/pre": v, "relearning_area/x": 2 * v}}
        for row, v in (("resalign", 0.25), ("plain", 0.5))
    ]  # fmt: skip
    inv = {"experiment_id": exp, "parent_run_id": parent, "cached": {},
           "summaries": {"report_key": "k", "report_run": "r0", "runs": runs}}  # fmt: skip
    sync_summaries(c, inv_dir, inv)
    saved = json.loads((inv_dir / "invocation.json").read_text())
    ids = [s["run_id"] for s in saved["summaries"]["runs"]]
    assert all(ids) and all(s["logged"] for s in saved["summaries"]["runs"])
    sync_summaries(c, inv_dir, saved)  # again, from the saved record: nothing new
    plain = MlflowClient(uri)
    found = plain.search_runs([exp], "tags.`resalign.kind` = 'summary'")
    assert sorted(r.info.run_id for r in found) == sorted(ids)
    by_row = {r.data.tags["resalign.row"]: r for r in found}
    assert by_row["plain"].data.metrics == {"concept_rate/pre": 0.5, "relearning_area/x": 1.0}
    assert by_row["plain"].data.tags["resalign.invocation"] == parent
    assert by_row["plain"].data.tags["resalign.report_run"] == "r0"
    assert by_row["plain"].info.status == "FINISHED"
    view = json.loads(plain.get_experiment(exp).tags[VIEW_TAG])
    assert view["selectedColumns"] == ["metrics.`concept_rate/pre`", "metrics.`relearning_area/x`"]
    note = plain.get_run(parent).data.tags["mlflow.note.content"]
    assert all(f"(#/experiments/{exp}/runs/{i})" in note for i in ids)
