"""A SQLite tracking URI other than the store's default keeps artifacts next to its database,
not in a stray ``./mlruns`` of whatever the working directory is."""

from __future__ import annotations

import io
from pathlib import Path

from engine_steps import TinySpec, make_graph
from rich.console import Console

from resalign.engine.options import RunOptions
from resalign.engine.progress import ProgressUI
from resalign.engine.runner import run_graph
from resalign.engine.tracking import artifact_location, default_tracking_uri


def test_artifact_location_follows_the_sqlite_database(tmp_path):
    store = tmp_path / "runs"
    assert (
        artifact_location(default_tracking_uri(store), store)
        == (store.resolve() / "mlartifacts").as_uri()
    )
    other = tmp_path / "elsewhere" / "t.db"
    assert artifact_location(f"sqlite:///{other}", store) == (other.parent / "mlartifacts").as_uri()
    assert artifact_location("http://127.0.0.1:5000", store) is None


def test_non_default_sqlite_uri_writes_no_mlruns_in_cwd(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    db = tmp_path / "db" / "mlflow.db"
    db.parent.mkdir()
    uri = f"sqlite:///{db}"
    graph = make_graph(steps=4, ckpt=2, attack_lrs={})
    ui = ProgressUI(enabled=False, console=Console(file=io.StringIO()))
    run_graph(
        graph,
        TinySpec(),
        RunOptions(store=tmp_path / "runs", tracking=True, tracking_uri=uri, device="cpu", ui=ui),
    )
    assert list(cwd.iterdir()) == []  # no ./mlruns
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("resalign")
    assert exp.artifact_location == (db.parent / "mlartifacts").as_uri()
    run = next(r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get(
        "resalign.node.name") == "train")  # fmt: skip
    files = {f.path for f in c.list_artifacts(run.info.run_id)}
    assert "DONE" in files
    assert Path(db.parent / "mlartifacts").is_dir()


def _paths(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= _paths(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def test_model_folders_are_referenced_not_uploaded_unless_asked(tmp_path):
    import json

    from mlflow.tracking import MlflowClient

    from resalign.engine.tracking import artifact_location, log_node_artifacts

    node = tmp_path / "node"
    for model in ("unet", "checkpoints/step2/unet"):
        (node / model).mkdir(parents=True)
        (node / model / "config.json").write_text("{}")
        (node / model / "diffusion_pytorch_model.safetensors").write_bytes(b"w" * 4096)
    (node / "lora").mkdir()
    (node / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"l" * 64)
    (node / "images").mkdir()
    (node / "images" / "0.png").write_bytes(b"png")
    (node / "stats.json").write_text("{}")
    (node / "resume").mkdir()  # an attack segment's training state: never uploaded
    (node / "resume" / "checkpoint.pt").write_bytes(b"s" * 100)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("a", artifact_location=artifact_location(uri, tmp_path))

    lean = c.create_run(exp).info.run_id
    skipped = log_node_artifacts(c, lean, node, log_models=False)
    assert _paths(c, lean) == {
        "stats.json",
        "lora/pytorch_lora_weights.safetensors",
        "images/0.png",
        "local_models.json",
    }
    index = json.loads(
        Path(c.download_artifacts(lean, "local_models.json", str(tmp_path))).read_text()
    )
    assert index == skipped
    assert [(s["artifact"], s["local"], s["bytes"]) for s in index] == [
        ("checkpoints/step2/unet", str(node / "checkpoints/step2/unet"), 4098),
        ("resume", str(node / "resume"), 100),
        ("unet", str(node / "unet"), 4098),
    ]

    full = c.create_run(exp).info.run_id
    assert log_node_artifacts(c, full, node, log_models=True) == [
        {"artifact": "resume", "local": str(node / "resume"), "bytes": 100}
    ]
    assert _paths(c, full) == {
        "stats.json",
        "lora/pytorch_lora_weights.safetensors",
        "images/0.png",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "checkpoints/step2/unet/config.json",
        "checkpoints/step2/unet/diffusion_pytorch_model.safetensors",
        "local_models.json",  # lists resume/
    }
