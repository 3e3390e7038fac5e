"""A store that knows: DONE records every output file's size and sha256; a node whose files do
not match is damaged (plan says so, run re-runs it and never uses it); `resalign verify`
hashes everything, lists damaged nodes and orphans, and `--fix` removes them."""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
from pathlib import Path

from click.testing import CliRunner
from engine_steps import TinySpec, make_graph
from rich.console import Console

from resalign.cli import cli
from resalign.engine.options import RunOptions
from resalign.engine.plan import plan_status
from resalign.engine.progress import ProgressUI
from resalign.engine.runner import run_graph
from resalign.engine.store import Store


def run(root: Path, graph, console: Console | None = None):
    ui = ProgressUI(enabled=False, console=console or Console(file=io.StringIO(), width=200))
    return run_graph(graph, TinySpec(), RunOptions(store=root, tracking=False, device="cpu", ui=ui))


def folder(root: Path, graph, name: str) -> Path:
    n = graph[name]
    return Store(root).node_dir(n.kind, n.key)


def test_done_lists_every_file_with_its_size_and_sha256(tmp_path):
    g = make_graph(steps=6, ckpt=3, attack_lrs={"a": 0.01}, attack_steps=3)
    run(tmp_path, g)
    d = folder(tmp_path, g, "train")
    manifest = json.loads((d / "DONE").read_text())
    on_disk = sorted(
        str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != "DONE"
    )
    assert sorted(manifest["files"]) == on_disk
    assert "weights.safetensors" in on_disk and "metrics.jsonl" in on_disk
    for rel, rec in manifest["files"].items():
        data = (d / rel).read_bytes()
        assert rec["size"] == len(data)
        assert rec["sha256"] == hashlib.sha256(data).hexdigest()


def test_truncated_or_altered_weights_are_damaged_rerun_and_never_used(tmp_path):
    g = make_graph(steps=6, ckpt=3, attack_lrs={"a": 0.01}, attack_steps=3)
    run(tmp_path, g)
    weights = folder(tmp_path, g, "train") / "weights.safetensors"
    good = weights.read_bytes()
    eval_before = (folder(tmp_path, g, "evaluate/pre") / "metrics.json").read_text()

    # truncated: found by size, on every read
    weights.write_bytes(good[: len(good) // 2])
    st = plan_status(g, tmp_path)
    assert st["train"].state == "run"
    assert st["train"].reason.startswith("damaged: weights.safetensors has")
    assert f"{len(good) // 2} bytes, DONE recorded {len(good)}" in st["train"].reason
    assert {n for n, s in st.items() if s.state == "run"} == {"train"}  # downstream: cached

    out = io.StringIO()
    summary = run(tmp_path, g, Console(file=out, width=300))
    assert summary.executed == ["train"]
    assert "run  train [damaged: weights.safetensors has" in out.getvalue()
    # the same key recomputed: the same bytes (the step is deterministic), clean again
    assert weights.read_bytes() == good
    assert plan_status(g, tmp_path)["train"].state == "cached"

    # altered in place at the same size: found by hash (the mtime moved)
    flipped = bytearray(good)
    flipped[-9] ^= 0xFF
    weights.write_bytes(bytes(flipped))
    st = plan_status(g, tmp_path)
    assert st["train"].reason == (
        "damaged: weights.safetensors content differs from DONE's sha256 (same size)"
    )
    # a file added or removed counts too
    (folder(tmp_path, g, "evaluate/pre") / "extra.txt").write_text("x")
    (folder(tmp_path, g, "attack/a") / "metrics.jsonl").unlink()
    st = plan_status(g, tmp_path)
    assert st["evaluate/pre"].reason == "damaged: extra.txt is not listed in DONE"
    assert st["attack/a"].reason == "damaged: metrics.jsonl is missing"
    run(tmp_path, g)
    assert all(s.state == "cached" for s in plan_status(g, tmp_path).values())
    assert (folder(tmp_path, g, "evaluate/pre") / "metrics.json").read_text() == eval_before


def test_touched_but_unchanged_file_is_hashed_once_then_trusted(tmp_path):
    g = make_graph(steps=6, ckpt=3, attack_lrs={})
    run(tmp_path, g)
    d = folder(tmp_path, g, "train")
    w = d / "weights.safetensors"
    os.utime(w, ns=(w.stat().st_atime_ns, w.stat().st_mtime_ns + 10**9))  # e.g. cp without -p
    assert plan_status(g, tmp_path)["train"].state == "cached"
    rec = json.loads((d / "DONE").read_text())["files"]["weights.safetensors"]
    assert rec["mtime_ns"] == w.stat().st_mtime_ns  # recorded: the next read is a stat


def test_verify_reports_damage_and_orphans_and_fix_removes_them(tmp_path):
    g = make_graph(steps=6, ckpt=3, attack_lrs={"a": 0.01}, attack_steps=3)
    run(tmp_path, g)
    store = Store(tmp_path)
    r = CliRunner().invoke(cli, ["verify", "--store", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "5 node(s) checked: 0 damaged, 0 orphan(s)" in r.output

    # same size, same mtime, different bytes: only a full hash finds it
    w = folder(tmp_path, g, "attack/a") / "weights.safetensors"
    st = w.stat()
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert plan_status(g, tmp_path)["attack/a"].state == "cached"  # cheap check misses it
    # orphans: a staging leftover, resume state of a complete node, a dead process's lock
    tn = g["train"]
    (tmp_path / "t_train" / f".tmp-{tn.key}-deadbeef").mkdir()
    (tmp_path / "t_train" / f".{tn.key}.cafe0001.old").mkdir()  # swap_dir's moved-aside result
    (store.state_dir("t_train", tn.key)).mkdir(parents=True)
    (store.state_dir("t_train", tn.key) / "checkpoint.pt").write_bytes(b"x")
    (tmp_path / "locks" / f"t_train-{tn.key}.lock").write_text("")
    held = tmp_path / "locks" / "t_eval-0123456789abcdef.lock"  # a live holder: not an orphan
    f = open(held, "a+")  # noqa: SIM115
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
        r = CliRunner().invoke(cli, ["verify", "--store", str(tmp_path)])
        assert r.exit_code == 1, r.output
        an = g["attack/a"]
        assert (
            f"damaged  t_attack/{an.key}: weights.safetensors content differs from DONE's "
            "sha256 (same size)" in r.output
        )
        assert f".tmp-{tn.key}-deadbeef: staging leftover of t_train/{tn.key}" in r.output
        assert f".{tn.key}.cafe0001.old: replaced result of t_train/{tn.key}" in r.output
        assert f"state/t_train/{tn.key}: resume state" in r.output
        assert f"t_train-{tn.key}.lock: lock file no live process holds" in r.output
        assert "t_eval-0123456789abcdef" not in r.output
        ev = g["evaluate/a"]  # read the damaged weights: derived from them
        assert f"derived  t_eval/{ev.key}: computed from damaged t_attack/{an.key}" in r.output
        assert "1 damaged, 1 derived from them, 4 orphan(s)" in r.output

        r = CliRunner().invoke(cli, ["verify", "--store", str(tmp_path), "--fix"])
        assert r.exit_code == 0, r.output
        assert "removed 6: 1 damaged node(s), 1 derived from them, 4 orphan(s)" in r.output
        assert held.exists()
    finally:
        f.close()
        held.unlink()
    assert not store.has_done("t_attack", an.key)
    assert not (tmp_path / "t_train" / f".tmp-{tn.key}-deadbeef").exists()
    assert not (tmp_path / "t_train" / f".{tn.key}.cafe0001.old").exists()
    out = io.StringIO()
    summary = run(tmp_path, g, Console(file=out, width=300))
    # both recomputed (same keys); the other branch (evaluate/pre) kept
    assert summary.executed == ["attack/a", "evaluate/a"]
    assert "evaluate/pre" in summary.cached
    r = CliRunner().invoke(cli, ["verify", "--store", str(tmp_path)])
    assert r.exit_code == 0, r.output
