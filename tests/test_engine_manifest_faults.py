"""No bytes in a node's ``DONE`` can crash a reader (issue 24): binary data, JSON of the wrong
shape, ``null`` entries, lists and the legacy ``ok`` make the node *damaged*, with the
reason; ``plan`` says so, ``verify`` lists it, ``verify --fix`` removes it, ``run``
recomputes it. Provenance: a node's manifest records a digest of each upstream node's files
as read; ``verify`` checks the chain and ``--fix`` removes what was derived from damage;
``run`` re-hashes small upstream files before a node reads them.

The CLI cases (``plan``, ``verify``, ``verify --fix``) use a store of tests/specs/tiny.yaml's
graph whose nodes hold stand-in files committed by the real :meth:`Store.commit` (no torch:
seconds); ``run`` uses the engine test graph of tests/engine_steps.py (fast real steps)."""

from __future__ import annotations

import io
import json
import os
import shutil
import traceback
from pathlib import Path

import pytest
from click.testing import CliRunner
from engine_steps import TinySpec, make_graph
from fake_store import TINY, fake_store
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from resalign.cli import cli
from resalign.engine.options import RunOptions
from resalign.engine.plan import plan_status
from resalign.engine.progress import ProgressUI
from resalign.engine.runner import run_graph
from resalign.engine.store import DONE, Store, check_files, parse_manifest


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine") / "runs"
    store, graph = fake_store(root)
    return root, graph


def cli_ok(args: list[str], codes: tuple[int, ...]) -> str:
    r = CliRunner().invoke(cli, args)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        tb = "".join(traceback.format_exception(r.exception))
        raise AssertionError(f"traceback from {args}:\n{tb}")
    assert r.exit_code in codes, (args, r.exit_code, r.output[-2000:])
    assert "Traceback" not in r.output
    return r.output


VALID = {"format": 1, "files": {"out.bin": {"size": 1, "sha256": "0" * 64, "mtime_ns": 0}}}
CASES = {
    "binary": bytes(range(256)) + b"\xff\xfe" * 20,
    "wrong shape (sizes only)": b'{"format":1,"files":{"metrics.jsonl":5}}',
    "null entry": b'{"format":1,"files":{"out.bin":null}}',
    "null files": b'{"format":1,"files":null}',
    "a list": b'[{"format":1}]',
    "legacy ok": b"ok\n",
    "empty": b"",
    "absolute path": json.dumps(
        {**VALID, "files": {"/dev/zero": VALID["files"]["out.bin"]}}
    ).encode(),
    "parent path": json.dumps({**VALID, "files": {"../x": VALID["files"]["out.bin"]}}).encode(),
    "bad inputs": json.dumps({**VALID, "inputs": ["unlearn/abc"]}).encode(),
    "bad cost": json.dumps({**VALID, "cost": {"wall_s": [1]}}).encode(),
    "huge int": b'{"format":1,"files":{"a":{"size":' + b"9" * 5000 + b"}}}",
    "deep nesting": b"[" * 100000,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_any_done_content_makes_the_node_damaged_with_a_reason(tmp_path, pristine, case):
    root = tmp_path / "runs"
    shutil.copytree(pristine[0], root)
    graph = pristine[1]
    n = graph["unlearn/resalign/seed0"]
    d = Store(root).node_dir(n.kind, n.key)
    (d / DONE).write_bytes(CASES[case])
    damage = check_files(d)
    assert damage is not None and str(damage)
    st_ = plan_status(graph, root)[n.name]
    assert st_.state == "run" and st_.reason.startswith("damaged: DONE"), st_
    out = cli_ok(["plan", str(TINY), "--store", str(root)], (0,))
    assert "damaged: DONE" in out
    out = cli_ok(["verify", "--store", str(root)], (1,))
    assert f"damaged  unlearn/{n.key}: DONE" in out
    # everything that read the unlearned model, transitively: attack, evaluations, report
    readers = {m.name for m in graph if m.name.startswith("attack/resalign")
               or m.name.startswith("evaluate/resalign") or m.name == "report"}  # fmt: skip
    assert f"1 damaged, {len(readers)} derived from them" in out
    out = cli_ok(["verify", "--store", str(root), "--fix"], (0,))
    assert not d.exists()
    assert all(not Store(root).has_done(graph[r].kind, graph[r].key) for r in readers)
    assert Store(root).is_complete(graph["unlearn/plain/seed0"].kind,
                                   graph["unlearn/plain/seed0"].key)  # fmt: skip


def test_the_legacy_ok_marker_is_unverifiable_so_its_node_is_recomputed(tmp_path):
    """A node whose weights were deleted behind an ``ok`` marker used to count as cached (and
    the next node failed on the missing file); now it runs again."""
    g = make_graph(steps=4, ckpt=2, attack_lrs={"a": 0.01}, attack_steps=2)
    run(tmp_path, g)
    n = g["train"]
    d = Store(tmp_path).node_dir(n.kind, n.key)
    (d / "weights.safetensors").unlink()
    (d / DONE).write_text("ok\n")
    st_ = plan_status(g, tmp_path)["train"]
    assert st_.state == "run" and "legacy 'ok'" in st_.reason
    s = run(tmp_path, g, force=["attack/a"])
    assert "train" in s.executed and (d / "weights.safetensors").is_file()


def run(root: Path, graph, force=(), out: io.StringIO | None = None):
    ui = ProgressUI(enabled=False, console=Console(file=out or io.StringIO(), width=300))
    return run_graph(
        graph,
        TinySpec(),
        RunOptions(store=root, force=force, tracking=False, device="cpu", ui=ui),
    )


# -- fuzz: random and structured garbage through plan, verify, verify --fix and run ---------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
    max_leaves=12,
)


@st.composite
def manifests(draw, valid: dict) -> bytes:
    """A node's real manifest with one part replaced by garbage, or garbage outright."""
    how = draw(st.sampled_from(["bytes", "json", "entry", "key", "files", "extra", "cut"]))
    if how == "bytes":
        return draw(st.binary(max_size=300))
    if how == "json":
        return json.dumps(draw(_json)).encode()
    m = json.loads(json.dumps(valid))
    if how == "entry":
        rel = draw(st.sampled_from(sorted(m["files"])))
        m["files"][rel] = draw(_json)
    elif how == "key":
        rel = draw(st.sampled_from(sorted(m["files"])))
        field = draw(st.sampled_from(["size", "sha256", "mtime_ns"]))
        m["files"][rel][field] = draw(_json)
    elif how == "files":
        m["files"][draw(st.text(max_size=30))] = m["files"][sorted(m["files"])[0]]
    elif how == "extra":
        m[draw(st.sampled_from(["inputs", "cost", "format"]))] = draw(_json)
    raw = json.dumps(m).encode()
    if how == "cut":
        raw = raw[: draw(st.integers(0, len(raw)))]
    return raw


SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def test_garbage_in_done_never_crashes_plan_or_verify(tmp_path, pristine):
    graph = pristine[1]
    names = [n.name for n in graph]
    root = tmp_path / "runs"
    shutil.copytree(pristine[0], root)
    valid = json.loads(
        (Store(root).node_dir(graph["model"].kind, graph["model"].key) / DONE).read_text()
    )

    @SETTINGS
    @given(st.sampled_from(names), manifests(valid))
    def check(name: str, raw: bytes) -> None:
        n = graph[name]
        d = Store(root).node_dir(n.kind, n.key)
        (d / DONE).write_bytes(raw)
        try:
            parse_manifest(raw)
        except ValueError:
            assert check_files(d) is not None  # not a manifest: damaged, never an exception
        cli_ok(["plan", str(TINY), "--store", str(root)], (0,))
        cli_ok(["verify", "--store", str(root)], (0, 1))
        cli_ok(["verify", "--store", str(root), "--fix"], (0,))
        cli_ok(["verify", "--store", str(root)], (0,))  # what is left is clean
        shutil.rmtree(root)
        shutil.copytree(pristine[0], root)

    check()


def test_garbage_in_done_never_crashes_run_and_the_node_is_recomputed(tmp_path):
    g = make_graph(steps=2, ckpt=1, attack_lrs={"a": 0.01}, attack_steps=1)
    ref = tmp_path / "ref"
    run(ref, g)
    names = [n.name for n in g]
    valid = json.loads((Store(ref).node_dir(g["train"].kind, g["train"].key) / DONE).read_text())
    work = tmp_path / "work"

    @SETTINGS
    @given(st.sampled_from(names), manifests(valid))
    def check(name: str, raw: bytes) -> None:
        if work.exists():
            shutil.rmtree(work)
        shutil.copytree(ref, work)
        n = g[name]
        d = Store(work).node_dir(n.kind, n.key)
        (d / DONE).write_bytes(raw)
        try:
            parse_manifest(raw)
            return  # still a manifest (its own files may then mismatch): covered elsewhere
        except ValueError:
            pass
        s = run(work, g)
        assert s.executed == [name]  # the damaged node alone; its readers' keys are unchanged
        assert Store(work).is_complete(n.kind, n.key)
        assert (d / DONE).read_bytes() != raw

    check()


# -- provenance -------------------------------------------------------------------------------


def flip_last_byte_keep_size_and_mtime(path: Path) -> None:
    st_ = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns))


def test_a_manifest_records_the_digest_of_every_upstream_it_read(tmp_path):
    from resalign.engine.store import files_digest, load_manifest

    g = make_graph(steps=2, ckpt=1, attack_lrs={"a": 0.01}, attack_steps=1)
    run(tmp_path, g)
    store = Store(tmp_path)
    for n in g:
        m = load_manifest(store.node_dir(n.kind, n.key) / DONE)
        want = {}
        for dep in n.deps.values():
            dn = g[dep]
            up = load_manifest(store.node_dir(dn.kind, dn.key) / DONE)
            want[f"{dn.kind}/{dn.key}"] = files_digest(up["files"])
        assert m["inputs"] == want, n.name


def test_same_size_same_mtime_damage_is_caught_before_a_node_reads_it(tmp_path):
    """The weights an attack is about to read were altered behind their size and mtime:
    the run re-hashes them (small files), recomputes the trained model first, and the
    attack's result is the one an undamaged store gives."""
    g = make_graph(steps=4, ckpt=2, attack_lrs={"a": 0.01}, attack_steps=2)
    ref = tmp_path / "ref"
    run(ref, g)
    store = Store(tmp_path / "runs")
    shutil.copytree(ref, store.root)
    tn, an = g["train"], g["attack/a"]
    shutil.rmtree(store.node_dir(an.kind, an.key))  # the attack must run, reading train
    w = store.node_dir(tn.kind, tn.key) / "weights.safetensors"
    flip_last_byte_keep_size_and_mtime(w)
    assert plan_status(g, store.root)["train"].state == "cached"  # the stat check misses it
    out = io.StringIO()
    s = run(store.root, g, out=out)
    assert s.executed[:2] == ["train", "attack/a"], out.getvalue()
    assert "damaged: weights.safetensors content differs" in out.getvalue()
    for name in ("train", "attack/a"):
        n = g[name]
        assert (store.node_dir(n.kind, n.key) / "weights.safetensors").read_bytes() == (
            Store(ref).node_dir(n.kind, n.key) / "weights.safetensors"
        ).read_bytes()


def test_verify_finds_a_node_computed_from_other_upstream_content(tmp_path):
    """The chain: an upstream replaced by other content (same files, different bytes, a
    valid manifest of its own) leaves its readers computed from what is gone."""
    from resalign.engine.store import atomic_write_json, build_manifest

    g = make_graph(steps=2, ckpt=1, attack_lrs={"a": 0.01}, attack_steps=1)
    run(tmp_path, g)
    store = Store(tmp_path)
    dn = g["data"]
    d = store.node_dir(dn.kind, dn.key)
    flip_last_byte_keep_size_and_mtime(d / "data.safetensors")
    atomic_write_json(d / DONE, build_manifest(d))  # a consistent node, other content
    r = CliRunner().invoke(cli, ["verify", "--store", str(tmp_path)])
    assert r.exit_code == 1, r.output
    readers = [n for n in g if "data" in n.deps.values()]
    for n in readers:
        assert f"damaged  {n.kind}/{n.key}: it was computed from {dn.kind}/{dn.key}" in r.output
    assert f"damaged  {dn.kind}/{dn.key}:" not in r.output  # its own files match its DONE
    r = CliRunner().invoke(cli, ["verify", "--store", str(tmp_path), "--fix"])
    assert r.exit_code == 0 and "derived from them" in r.output, r.output
    assert store.is_complete(dn.kind, dn.key)
    assert not any(store.has_done(n.kind, n.key) for n in g if n.name != "data")


def test_a_forced_rerun_of_an_upstream_leaves_the_chain_intact(tmp_path):
    """CPU results are bitwise: re-running the trained model with --force leaves what its
    readers recorded of it true, so verify finds nothing to remove."""
    g = make_graph(steps=2, ckpt=1, attack_lrs={"a": 0.01}, attack_steps=1)
    run(tmp_path, g)
    assert run(tmp_path, g, force=["train"]).executed == ["train"]
    r = CliRunner().invoke(cli, ["verify", "--store", str(tmp_path)])
    assert r.exit_code == 0 and "0 damaged, 0 orphan(s)" in r.output, r.output
