"""The cost estimator (issue 25, resalign.engine.estimate): the per-kind linear fit against
numpy's least squares and hand computation, the work numbers of the demo's nodes, history
read back from real DONE manifests, and the no-history message."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from resalign.engine.estimate import Recorded, estimate, fit, history, render, work
from resalign.engine.store import Store

ROOT = Path(__file__).resolve().parents[1]


def _pts(ws, ts, kind="attack"):
    return [Recorded(kind, "tiny", float(w), float(t), 100.0) for w, t in zip(ws, ts)]


def test_fit_is_least_squares_with_its_ratio_range():
    ws = [10, 20, 40, 80]
    ts = [4.1, 5.9, 10.2, 17.8]
    f = fit(_pts(ws, ts))
    b, a = np.polyfit(ws, ts, 1)
    assert f.a == pytest.approx(a) and f.b == pytest.approx(b)
    ratios = [t / (a + b * w) for w, t in zip(ws, ts)]
    p, lo, hi = f.predict(60)
    assert p == pytest.approx(a + b * 60)
    assert lo == pytest.approx(p * min(ratios)) and hi == pytest.approx(p * max(ratios))
    exact = fit(_pts([1, 2, 3], [3.5, 4.0, 4.5]))
    assert (exact.a, exact.b) == pytest.approx((3.0, 0.5)) and exact.predict(5)[0] == 5.5
    assert exact.lo == pytest.approx(1) and exact.hi == pytest.approx(1)


def test_fit_falls_back_to_the_origin_or_a_proportional_scale():
    # a negative intercept: through the origin, b = sum(w t) / sum(w^2)
    ws, ts = [10, 20, 30], [1.0, 5.0, 9.0]
    f = fit(_pts(ws, ts))
    assert f.a == 0 and f.b == pytest.approx(sum(w * t for w, t in zip(ws, ts)) / 1400)
    # one recorded work value: wall proportional to work
    one = fit(_pts([50, 50], [10.0, 14.0]))
    assert one.a == 0 and one.predict(100)[0] == pytest.approx(24.0)
    assert one.predict(100)[1:] == pytest.approx((20.0, 28.0))
    # more work, less time (noise): the mean
    flat = fit(_pts([10, 20], [6.0, 4.0]))
    assert flat.predict(1000)[0] == pytest.approx(5.0)


def _demo():
    from resalign.graph.compile import compile_spec
    from resalign.spec import load_spec

    return compile_spec(load_spec(ROOT / "specs" / "digits_demo.yaml"))


def test_work_of_the_demos_nodes():
    g = _demo()
    seg = g["attack/plain/seed0/poison5_adam_3e-4/seed1/step50"]
    assert work("attack", seg.params, prev_stop=25) == 25 * 16 * 4
    first = g["attack/plain/seed0/poison5_adam_3e-4/seed1/step25"]
    assert work("attack", first.params) == 25 * 16 * 4
    assert work("model", g["model"].params) == 1000 * 64
    # ResAlign: 50 outer steps x (1 + J (1) x (mean of 10 and 20 inner steps + K 5))
    assert work("unlearn", g["unlearn/resalign/seed0"].params) == 50 * (1 + 1 * (15 + 5))
    assert work("unlearn", g["unlearn/plain/seed0"].params) == 50
    # the hypergradient's own passes: none for first order, the inner steps again unrolled
    import copy

    p = copy.deepcopy(g["unlearn/resalign/seed0"].params)
    p["unlearn"]["resilience"]["hypergradient"]["kind"] = "none"
    assert work("unlearn", p) == 50 * (1 + 15)
    p["unlearn"]["resilience"]["hypergradient"]["kind"] = "unrolled"
    assert work("unlearn", p) == 50 * (1 + 15 + 15)
    assert work("evaluate", g["evaluate/plain/seed0/pre/step0"].params) == 30 * 15


def test_estimate_scales_recorded_nodes_and_says_when_a_kind_has_none():
    from resalign.engine.estimate import model_size, node_work

    g = _demo()
    size = model_size(g["model"].params["model"])
    assert size == 8 * 8 * (16 * 16 + 32 * 32) * 1
    # recorded attacks: wall = 2 s + 1e-6 s per unit of work
    rec = [
        Recorded("attack", "tiny", w * size, 2 + 1e-6 * w * size, 900.0) for w in (400, 800, 1600)
    ]
    # the poisoned threat's segments (25-50 steps: inside the recorded range, no extrapolation)
    attacks = [n.name for n in g.of_kind("attack") if n.threat == "poison5_adam_3e-4"]
    names = attacks + ["unlearn/plain/seed0"]
    est = estimate(g, names, rec)
    want = sum(2 + 1e-6 * node_work(g, g[n])[1] for n in names[:-1])
    (att, un) = est.kinds
    assert att.kind == "attack" and att.nodes == 18 and att.seconds == pytest.approx(want)
    assert att.low == pytest.approx(want) and att.high == pytest.approx(want)
    assert un.kind == "unlearn" and un.seconds is None and est.without_history == 1
    text = render(est, title="estimate for digits_demo")
    assert "unlearn: 1 to run; no recorded unlearn node in the store: no estimate" in text
    assert "not counting 1 node(s) without history" in text
    assert "peak RSS up to 900 MiB" in text


def test_unlearn_nodes_with_and_without_a_resilience_term_are_fitted_apart():
    """ResAlign's fixed costs are not plain's: fitted together, ResAlign's intercept landed on
    every plain node (10 plain nodes of ~5 s predicted at 48 s each). Each group is fitted on
    its own; a group with no history falls back to the kind's other records."""
    from resalign.engine.estimate import group, node_work

    g = _demo()
    plain, res = g["unlearn/plain/seed0"], g["unlearn/resalign/seed0"]
    assert group("unlearn", plain.params) == "direct"
    assert group("unlearn", res.params) == "resilience"
    assert group("attack", {}) == ""
    wp, wr = node_work(g, plain)[1], node_work(g, res)[1]
    # ResAlign records: 60 s + 1e-6 s per unit (work 1x-4x its node); plain: 1e-6 s per unit
    rec = [Recorded("unlearn", "tiny", k * wr, 60 + 1e-6 * k * wr, None, "resilience")
           for k in (0.5, 1, 2)]  # fmt: skip
    rec += [Recorded("unlearn", "tiny", k * wp, 1e-6 * k * wp, None, "direct") for k in (1, 2)]
    est = estimate(g, [plain.name, res.name], rec)
    assert est.per_node[plain.name][0] == pytest.approx(1e-6 * wp)
    assert est.per_node[res.name][0] == pytest.approx(60 + 1e-6 * wr)
    # without plain's records, plain is scaled from ResAlign's (and says nothing is missing)
    alone = estimate(g, [plain.name], rec[:3])
    assert alone.per_node[plain.name][0] == pytest.approx(60 + 1e-6 * wp)
    assert alone.without_history == 0


def test_history_reads_the_cost_from_done_manifests(tmp_path):
    """Nodes committed by the store with a cost are read back (their work from node.json,
    the model size from their model input's node.json); a DONE without a cost is skipped."""
    g = _demo()
    st = Store(tmp_path)

    def commit(node, cost, inputs):
        staging = st.new_staging(node.kind, node.key)
        (staging / "node.json").write_text(json.dumps(
            {"kind": node.kind, "name": node.name, "key": node.key, "params": node.params,
             "deps": dict(node.deps), "inputs": inputs}))  # fmt: skip
        return st.commit(staging, node.kind, node.key, None if cost is None else {"cost": cost})

    model = commit(g["model"], {"wall_s": 172.0, "cpu_s": 170.0, "peak_rss_mb": 600.0}, {})
    seg = g["attack/plain/seed0/poison5_adam_3e-4/seed1/step50"]
    commit(seg, {"wall_s": 9.5, "cpu_s": 9.0, "peak_rss_mb": 700.0}, {"model": str(model)})
    commit(g["attack/plain/seed0/poison5_adam_3e-4/seed1/step25"], None, {"model": str(model)})
    done = json.loads((st.node_dir(seg.kind, seg.key) / "DONE").read_text())
    assert done["cost"]["wall_s"] == 9.5 and seg.name.endswith("step50")
    assert st.check(seg.kind, seg.key) is None  # the cost field leaves the manifest valid
    got = sorted(history(st), key=lambda r: r.kind)
    size = 8 * 8 * (16 * 16 + 32 * 32)
    assert [(r.kind, r.work, r.seconds) for r in got] == [  # busy time: cpu_s on one thread
        ("attack", 25 * 16 * 4 * size, 9.0),
        ("model", 64000 * size, 170.0),
    ]


def test_busy_seconds_are_cpu_time_on_the_cpu_and_wall_time_on_an_accelerator():
    """A CPU node's wall time at load measures the queue; its CPU time does not (this store's
    attack segments: 107 s wall, 8.8 s CPU at load > 10), so that is what is fitted."""
    from resalign.engine.estimate import busy_seconds

    loaded = {"wall_s": 107.0, "cpu_s": 8.8, "threads": 1, "device": "cpu", "load1": 14.0}
    assert busy_seconds(loaded) == 8.8
    # idle and waiting on I/O: the wall time, the smaller of the two
    assert busy_seconds({"wall_s": 6.5, "cpu_s": 7.0, "threads": 1, "device": "cpu"}) == 6.5
    # two busy threads: CPU seconds per thread
    assert busy_seconds({"wall_s": 20.0, "cpu_s": 10.0, "threads": 2, "device": "cpu"}) == 5.0
    # on a GPU the work is not in the host's CPU time
    assert busy_seconds({"wall_s": 3.0, "cpu_s": 0.4, "threads": 8, "device": "cuda"}) == 3.0
    # a record from before CPU time was kept
    assert busy_seconds({"wall_s": 12.0}) == 12.0


def test_load_note_says_how_the_current_load_stretches_the_estimate(monkeypatch):
    import os

    from resalign.engine.estimate import load_note

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "getloadavg", lambda: (4.0 * cores, 0.0, 0.0))
    note = load_note()
    assert note is not None and "4.0x" in note and f"on {cores} core(s)" in note
    monkeypatch.setattr(os, "getloadavg", lambda: (0.5 * cores, 0.0, 0.0))
    assert load_note() is None


def test_history_skips_a_damaged_done_without_failing(tmp_path):
    st = Store(tmp_path)
    for i, text in enumerate(['{"cost": {"wall_s": 3.0', "[1, 2]", '{"cost": "fast"}']):
        d = st.node_dir("attack", f"{i:064x}")
        d.mkdir(parents=True)
        (d / "DONE").write_text(text)
        (d / "node.json").write_text('{"params": {}}')
    assert len(list(st.node_dirs())) == 3 and history(st) == []
