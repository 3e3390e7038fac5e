"""SIGTERM and SIGHUP (Slurm, ``docker stop``, systemd, a closed terminal) get what Ctrl-C
gets (issue 24): a real ``resalign run`` stops within seconds, exits 128 + the signal's
number with the resume command last, leaves no lock and no staging folder, keeps its
checkpoints, and its MLflow runs end KILLED. Runs a dead driver left RUNNING (kill -9) are
ended FAILED, tagged why, by the next run or by ``resalign sync``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from engine_steps import __file__ as ENGINE_STEPS

from resalign.engine.store import read_metrics

TINY = Path(__file__).resolve().parent / "specs" / "tiny.yaml"
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def long_pretraining_spec(tmp_path: Path) -> Path:
    """tiny.yaml with a pretraining long enough to be signalled in the middle of."""
    d = yaml.safe_load(TINY.read_text(encoding="utf-8"))
    d.pop("baselines")
    d["model"]["tiny"]["pretrain"]["steps"] = 2000
    d["tracking"]["system_metrics"] = False
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(d), encoding="utf-8")
    return p


def wait_for_steps(proc: subprocess.Popen, store: Path, kind: str, n: int) -> None:
    """Until a node of ``kind`` that had no resume state before has logged ``n`` steps."""
    old = set((store / "state" / kind).glob("*/metrics.jsonl"))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        live = set((store / "state" / kind).glob("*/metrics.jsonl")) - old
        if any(len(read_metrics(m)) >= n for m in live):
            return
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    raise AssertionError(f"no {kind} node reached {n} steps")


def statuses(uri: str, experiment: str) -> dict[str, tuple[str, str, dict]]:
    """run id -> (run name, status, tags) of every run of ``experiment``."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name(experiment).experiment_id])
    return {r.info.run_id: (r.info.run_name, r.info.status, r.data.tags) for r in runs}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_stop_a_real_run_like_ctrl_c(tmp_path, sig):
    spec = long_pretraining_spec(tmp_path)
    store = tmp_path / "runs"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "resalign.cli", "run", str(spec), "--store", str(store),
           "--tracking-uri", uri]  # fmt: skip
    log = tmp_path / "out.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV,
                                start_new_session=True)  # fmt: skip
    try:
        wait_for_steps(proc, store, "model", 3)
        t = time.monotonic()
        os.kill(proc.pid, sig)  # the driver alone, as `kill PID` does
        while "to resume, run:" not in log.read_text() and proc.poll() is None:
            time.sleep(0.05)
        stopped_in = time.monotonic() - t
        proc.wait(timeout=120)  # then the interpreter's teardown (seconds, more when loaded)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = log.read_text()
    assert proc.returncode == 128 + sig, out
    assert stopped_in < 10, stopped_in  # 0.3 s measured on the loaded 2-core machine
    lines = out.strip().splitlines()
    assert lines[-2] == f"interrupted ({sig.name}); to resume, run:", out
    assert lines[-1].startswith(f"resalign run {spec} --store {store} --tracking-uri "), out
    assert "Traceback" not in out
    assert not list((store / "locks").glob("*")), "a lock file was left"
    assert not list(store.rglob(".tmp-*")), "a staging folder was left"
    (state,) = (store / "state" / "model").iterdir()
    assert read_metrics(state / "metrics.jsonl")  # the history it resumes with is kept
    runs = sorted((name, status) for name, status, _ in statuses(uri, "tiny").values())
    assert runs == [("model", "KILLED"), ("tiny", "KILLED")], runs


def engine_run(root: Path, uri: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, ENGINE_STEPS, "--root", str(root), "--tracking-uri", uri, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
        start_new_session=True,
    )  # fmt: skip


@pytest.mark.slow
def test_runs_left_running_by_kill9_are_ended_failed_by_the_next_run_or_sync(tmp_path):
    from resalign.engine.tracking.tracker import END_REASON

    root = tmp_path / "runs"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def kill9_mid_training(steps: int) -> set[str]:
        """A run killed with SIGKILL while training; the ids of the runs it left RUNNING."""
        proc = engine_run(root, uri, "--steps", str(steps), "--sleep", "0.05")
        try:
            wait_for_steps(proc, root, "t_train", 3)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        runs = statuses(uri, "resalign")
        left = {i for i, (_, s, _) in runs.items() if s == "RUNNING"}
        assert {runs[i][0] for i in left} == {"engine-test", "train"}, runs
        return left

    def ended_failed_tagged(ids: set[str]) -> None:
        runs = statuses(uri, "resalign")
        for i in ids:
            name, status, tags = runs[i]
            assert status == "FAILED", (name, status)
            assert "died without ending it" in tags.get(END_REASON, ""), (name, tags)

    # the next run ends them FAILED, tagged why, and goes on (other steps: another key)
    left = kill9_mid_training(400)
    proc = engine_run(root, uri, "--steps", "20")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "ended 1 MLflow run(s) left RUNNING by a killed invocation" in out, out
    ended_failed_tagged(left)
    runs = statuses(uri, "resalign")
    assert all(s in ("FINISHED", "FAILED") for _, s, _ in runs.values()), runs

    # and `resalign sync` does the same
    left = kill9_mid_training(300)
    r = subprocess.run([sys.executable, "-m", "resalign.cli", "sync", "--store", str(root)],
                       capture_output=True, text=True, env=ENV, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    ended_failed_tagged(left)


@pytest.mark.slow
def test_sigterm_to_the_driver_stops_its_worker_processes_too(tmp_path):
    """``--workers 2``: ``kill PID`` reaches the driver only; it passes the stop on, and the
    node running in a worker process ends as under Ctrl-C."""
    root = tmp_path / "runs"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = engine_run(root, uri, "--steps", "400", "--sleep", "0.05", "--workers", "2")
    try:
        wait_for_steps(proc, root, "t_train", 3)
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, out
    assert "interrupted (SIGTERM); to resume, run:" in out
    assert not list((root / "locks").glob("*")) and not list(root.rglob(".tmp-*")), out
    runs = {name: status for name, status, _ in statuses(uri, "resalign").values()}
    assert runs["train"] == "KILLED" and runs["engine-test"] == "KILLED", runs
