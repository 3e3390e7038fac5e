"""The time left on a running invocation's done lines (resalign.engine.pace): the estimate of
the nodes left, overlapped by the workers, times the pace of the finished nodes, against a
hand computation; a kind without history is estimated once one of its nodes has committed
its cost; and a real run's lines count down to the end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from resalign.engine.estimate import Recorded, duration, node_work
from resalign.engine.pace import Remaining
from resalign.engine.store import Store

ROOT = Path(__file__).resolve().parents[1]


def _demo():
    from resalign.graph.compile import compile_spec
    from resalign.spec import load_spec

    return compile_spec(load_spec(ROOT / "specs" / "digits_demo.yaml"))


@pytest.mark.fast
def test_time_left_is_the_estimate_overlapped_by_workers_times_the_pace(tmp_path):
    g = _demo()
    attacks = [n.name for n in g.of_kind("attack")]
    w = {a: node_work(g, g[a])[1] for a in attacks}
    # recorded attacks at exactly 1e-5 s per unit of work: the fit is that line
    rec = [Recorded("attack", "tiny", k * w[attacks[0]], 1e-5 * k * w[attacks[0]], None)
           for k in (0.5, 1, 2)]  # fmt: skip
    ev = [n.name for n in g.of_kind("evaluate")][:3]
    r = Remaining(g, attacks + ev, rec, workers=2)
    secs = [1e-5 * w[a] for a in attacks]
    want = max(sum(secs) / 2, max(secs))
    left, missing = r.left_seconds()
    assert left == pytest.approx(want) and missing == 3
    assert r.line() == f"0/{len(attacks) + 3}; about {duration(want)} left + 3 not estimated yet"

    # the first attack took 3x its estimate: what is left runs at that pace
    r.finished(attacks[0], 3 * secs[0])
    left, _ = r.left_seconds()
    assert r.pace == pytest.approx(3.0)
    assert left == pytest.approx(3 * max(sum(secs[1:]) / 2, max(secs[1:])))

    # an evaluation commits its cost: the other two are estimated from it (busy time = CPU
    # seconds on one thread, as plan --estimate fits it), and at its own pace of 1 the
    # overall pace is the summed wall over the summed estimate
    st = Store(tmp_path)
    e0 = g[ev[0]]
    staging = st.new_staging(e0.kind, e0.key)
    (staging / "node.json").write_text(json.dumps({"kind": e0.kind, "key": e0.key}))
    folder = st.commit(staging, e0.kind, e0.key,
                       {"cost": {"wall_s": 4.0, "cpu_s": 2.0, "threads": 1, "device": "cpu"}})  # fmt: skip
    r.finished(ev[0], 4.0, folder)
    left, missing = r.left_seconds()
    assert missing == 0 and r.pace == pytest.approx(3.0)  # ev[0] had no estimate
    per_eval = 2.0 * node_work(g, g[ev[1]])[1] / node_work(g, e0)[1]
    rest = secs[1:] + [per_eval, per_eval]
    assert left == pytest.approx(3 * max(sum(rest) / 2, max(rest)))

    # a node another invocation computed: its wait is not a pace
    r.finished(attacks[1], None)
    assert r.pace == pytest.approx(3.0)
    for name in attacks[2:] + ev[1:]:
        r.finished(name, 1.0)
    assert r.line() == f"{len(attacks) + 3}/{len(attacks) + 3}"


@pytest.mark.fast
def test_no_history_says_so_and_a_damaged_done_is_no_record(tmp_path):
    g = _demo()
    ev = [n.name for n in g.of_kind("evaluate")][:2]
    r = Remaining(g, ev, [], workers=1)
    assert r.line() == "0/2; no estimate yet"
    (tmp_path / "DONE").write_text("{not json")
    r.finished(ev[0], 5.0, tmp_path)
    assert r.recorded == [] and r.line().startswith("1/2; no estimate yet")


def test_a_runs_done_lines_count_down(tmp_path):
    from click.testing import CliRunner

    from resalign.cli import cli

    spec = ROOT / "tests" / "specs" / "tiny.yaml"
    args = ["run", str(spec), "--store", str(tmp_path / "s"), "--no-tracking"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    counts = [(int(a), int(b)) for a, b in re.findall(r"^done .* \[(\d+)/(\d+)", res.output, re.M)]
    total = counts[0][1]
    assert [c for c, _ in counts] == list(range(1, total + 1)) and {t for _, t in counts} == {total}
    # on an empty store: nothing is estimated at the start; the evaluations are, from this
    # run's first one on (the report, the last node, has no recorded kind until it ends)
    assert f"[0/{total}; no estimate yet]" in res.output
    last_eval = re.findall(r"^done evaluate/\S+ \(.*\) \[(.*)\]$", res.output, re.M)[-2]
    assert re.fullmatch(rf"{total - 2}/{total}; about \d+ s left \+ 1 not estimated yet", last_eval)
    assert res.output.count(f"[{total}/{total}]") == 1
