"""A read-only store (issue 24): ``plan``, ``report --out``, ``verify`` and an all-cached
``run`` with tracking elsewhere work and change nothing in it; what must write (a node to
run, MLflow in the store, the report's default folder, ``verify --fix`` with something to
remove) fails with exit 2 naming the path; the MLflow parent is never left RUNNING.

The tests run as root here, which may write anything: the store is made read-only with
``chmod -R a-w`` (what its owner would do), the code honours the mode bits as well as
``os.access`` (:func:`resalign.engine.store.writable`), and the proof is that no file, folder,
size, mtime or byte of the store changed."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from fake_store import TINY, fake_store

from resalign.cli import cli


def snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    st = root.lstat()
    out["."] = (st.st_mode, st.st_mtime_ns)
    return out


def chmod_tree(root: Path, writable: bool) -> None:
    for dirpath, dirs, files in os.walk(root):
        for name in [*dirs, *files, ""]:
            p = Path(dirpath) / name if name else Path(dirpath)
            mode = p.lstat().st_mode
            bits = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
            os.chmod(p, (mode | stat.S_IWUSR) if writable else (mode & ~bits))


def invoke(args: list[str]):
    r = CliRunner().invoke(cli, args)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    assert "Traceback" not in r.output
    return r


@pytest.fixture
def ro_store(tmp_path):
    root = tmp_path / "ro"
    _store, graph = fake_store(root)
    chmod_tree(root, writable=False)
    yield root, graph
    chmod_tree(root, writable=True)


def test_everything_that_only_reads_works_on_a_read_only_store(tmp_path, ro_store):
    from mlflow.tracking import MlflowClient

    root, graph = ro_store
    before = snapshot(root)
    r = invoke(["plan", str(TINY), "--store", str(root)])
    assert r.exit_code == 0 and "to run" not in r.output, r.output
    r = invoke(["verify", "--store", str(root)])
    assert r.exit_code == 0 and f"{len(graph)} node(s) checked: 0 damaged" in r.output, r.output
    r = invoke(["verify", "--store", str(root), "--fix"])
    assert r.exit_code == 0 and "removed nothing" in r.output, r.output
    r = invoke(["report", str(TINY), "--store", str(root), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rep" / "report.md").is_file()
    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    r = invoke(["run", str(TINY), "--store", str(root), "--tracking-uri", uri])
    assert r.exit_code == 0, r.output
    assert f"executed 0, cached {len(graph)}" in r.output
    assert snapshot(root) == before  # nothing in the store was written, not even a mtime
    runs = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("tiny").experiment_id]
    )
    # the invocation's parent and the report's summary runs (one per row and unlearning
    # seed, made for a tracking store that lacks them), all ended
    parents = [x for x in runs if x.data.tags.get("resalign.kind") != "summary"]
    assert len(parents) == 1 and {x.info.status for x in runs} == {"FINISHED"}
    assert not (root / "tracking").exists()


def test_what_must_write_to_a_read_only_store_fails_with_exit_2_naming_the_path(tmp_path, ro_store):
    root, graph = ro_store
    before = snapshot(root)
    r = invoke(["run", str(TINY), "--store", str(root)])  # MLflow's default db is in the store
    assert r.exit_code == 2, r.output
    assert f"cannot write {root / 'mlflow.db'}: the store is read-only" in r.output
    r = invoke(["run", str(TINY), "--store", str(root), "--no-tracking", "--force", "report"])
    assert r.exit_code == 2, r.output
    assert (
        f"cannot write {root}: read-only (its mode has no write bit); 1 node(s) must be "
        "written to the store (report: to run (forced)); nothing was run" in r.output
    )
    r = invoke(["report", str(TINY), "--store", str(root)])
    assert r.exit_code == 2 and f"cannot write {root / 'reports'}" in r.output, r.output
    assert snapshot(root) == before
    # a damaged node (root may write; a user would have found it so): --fix must remove it
    n = graph["report"]
    done = root / n.kind / n.key / "DONE"
    os.chmod(done, 0o644)
    done.write_bytes(b"\xff" * 10)
    os.chmod(done, 0o444)
    r = invoke(["verify", "--store", str(root), "--fix"])
    assert r.exit_code == 2, r.output
    assert f"cannot remove 1 item(s): {root / n.kind} is not writable" in r.output
    assert done.is_file()
