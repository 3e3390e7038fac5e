"""kill -9 on the real steps: the tiny spec's unlearn node (ResAlign) and then one of its attack
nodes are killed mid-way (SIGKILL to the whole `resalign run`); running the same command again
resumes each from its last ``ctx.save_checkpoint`` and ends with the bytes of an uninterrupted
run: the unlearned tensors, the attack's checkpoint UNets, every evaluation's metrics, and the
metric histories (each step once)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from resalign.engine.store import Store, read_metrics

TINY = Path(__file__).resolve().parent / "specs" / "tiny.yaml"


def spec(tmp_path: Path) -> Path:
    d = yaml.safe_load(TINY.read_text(encoding="utf-8"))
    d.pop("baselines")
    d["unlearn"]["steps"] = 12
    d["unlearn"]["checkpoint_every"] = 2
    d["threats"]["benign"].update(steps=12, eval_at=[12], checkpoint_every=2)
    d["tracking"]["system_metrics"] = False
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(d), encoding="utf-8")
    return p


def command(path: Path, store: Path) -> list[str]:
    return [sys.executable, "-m", "resalign.cli", "run", str(path), "--store", str(store),
            "--no-tracking"]  # fmt: skip


def run(path: Path, store: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(command(path, store), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


def kill_when(path: Path, store: Path, kind: str, records: int) -> None:
    """Start the run; SIGKILL it once a node of ``kind`` has logged ``records`` steps."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(command(path, store), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline:
            live = list((store / "state" / kind).glob("*/metrics.jsonl"))
            if any(len(read_metrics(m)) >= records for m in live):
                break
            assert proc.poll() is None, f"the run ended before a {kind} node could be killed"
            time.sleep(0.02)
        else:
            raise AssertionError(f"no {kind} node reached {records} steps")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def outputs(store: Path) -> dict[str, bytes]:
    """Every committed file that holds a result (weights, metrics), by node kind/key/path."""
    out = {}
    for kind, key, d in Store(store).node_dirs():
        for f in sorted(d.rglob("*")):
            rel = f.relative_to(d).as_posix()
            if f.suffix == ".safetensors" or rel in ("metrics.json", "trainable.safetensors"):
                out[f"{kind}/{key}/{rel}"] = f.read_bytes()
    return out


def histories(store: Path) -> dict[str, list]:
    return {
        f"{kind}/{key}": read_metrics(d / "metrics.jsonl")
        for kind, key, d in Store(store).node_dirs()
        if kind in ("unlearn", "attack", "model")
    }


@pytest.mark.slow
def test_kill9_in_real_unlearn_and_attack_then_rerun_equals_uninterrupted(tmp_path):
    path = spec(tmp_path)
    ref = tmp_path / "ref"
    run(path, ref)

    store = tmp_path / "runs"
    kill_when(path, store, "unlearn", 5)
    (un_state,) = (store / "state" / "unlearn").iterdir()
    assert (un_state / "checkpoint.pt").is_file()  # through ctx.save_checkpoint
    assert not list((store / "unlearn").glob("*/DONE")) if (store / "unlearn").exists() else True

    kill_when(path, store, "attack", 5)
    assert len(list((store / "unlearn").glob("*/DONE"))) == 1
    killed = [d for d in (store / "state" / "attack").iterdir() if (d / "checkpoint.pt").is_file()]
    assert killed, "the killed attack left no checkpoint"

    out = run(path, store)
    assert "resumes from checkpoint" in out
    assert outputs(store) == outputs(ref)
    hist, want = histories(store), histories(ref)
    assert hist == want
    for h in hist.values():
        steps = [r["step"] for r in h]
        assert steps == sorted(set(steps))  # each step once
    m = json.loads(next((store / "evaluate").glob("*/metrics.json")).read_text())
    assert m  # the evaluations ran on the resumed models
