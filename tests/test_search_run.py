"""A searched threat through the CLI (issue 16): tests/specs/tiny_search.yaml (3 trials per
row, rows original and plain) is killed with SIGKILL once round 0 is in the store and round 1
has started; the same command then finishes the study without repeating any finished trial
(counted in attack nodes), asks the interrupted trial the same values, and `resalign report`
shows the worst-case column and writes the best-so-far plot. The trials' attack runs carry
the study and trial tags in MLflow."""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

SPEC = Path(__file__).resolve().parent / "specs" / "tiny_search.yaml"
ROWS = 2  # original, plain
TRIALS = 3


def _command(store: Path) -> list[str]:
    return [sys.executable, "-m", "resalign", "run", str(SPEC), "--store", str(store)]


def _done_attacks(store: Path) -> set[str]:
    return {p.parent.name for p in (store / "attack").glob("*/DONE")}


@pytest.mark.slow
def test_searched_threat_resumes_after_kill_and_reports_worst_case(tmp_path):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "runs"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log1 = tmp_path / "run1.log"
    with log1.open("w") as out:
        proc = subprocess.Popen(_command(store), stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
        deadline = time.time() + 240
        # kill once round 0 (one attack per row) is done and round 1 has started an attack
        while time.time() < deadline and proc.poll() is None:
            if len(_done_attacks(store)) >= ROWS and "run  attack/" in _round(log1, 1):
                break
            time.sleep(0.2)
        assert proc.poll() is None, log1.read_text()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = _done_attacks(store)
    assert ROWS <= len(before) < ROWS * TRIALS
    first = log1.read_text()

    r = subprocess.run(_command(store), capture_output=True, text=True, env=env, timeout=300)
    second = r.stdout + r.stderr  # the progress lines go to stderr
    assert r.returncode == 0, second
    after = _done_attacks(store)
    assert len(after) == ROWS * TRIALS
    executed = re.findall(r"^done (attack/\S+) \(", second, re.M)
    # no finished trial ran again: exactly the missing attacks ran, none of the finished ones
    assert len(executed) == ROWS * TRIALS - len(before)
    assert not set(executed) & set(re.findall(r"^done (attack/\S+) \(", first, re.M))
    # the interrupted round asks the same values in the new process (seeded replay)
    asked1 = re.findall(r"^search (\S+): trial 1: (.*)$", first, re.M)
    asked2 = dict(re.findall(r"^search (\S+): trial 1: (.*)$", second, re.M))
    assert asked1 and dict(asked1) == asked2

    # the study written to the store holds every trial, and a replay from the nodes agrees
    from resalign.engine.search import study_records
    from resalign.graph.compile import compile_spec
    from resalign.spec import load_spec

    resolved = load_spec(SPEC)
    records = study_records(resolved, compile_spec(resolved), store)
    assert [len(x.trials) for x in records] == [TRIALS] * ROWS
    for rec in records:
        saved = json.loads((store / "search" / f"{rec.plan.key}.json").read_text())
        assert [t["params"] for t in saved["trials"]] == [t.params for t in rec.trials]
        assert (store / "search" / f"{rec.plan.key}.db").is_file()
        # the same budget and seed on every row: the sampler asked the same values
        assert [t.params for t in rec.trials] == [t.params for t in records[0].trials]

    rep = subprocess.run(
        [sys.executable, "-m", "resalign", "report", str(SPEC), "--store", str(store)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert rep.returncode == 0, rep.stdout + rep.stderr
    assert "worst-case concept_rate" in rep.stdout
    folder = store / "reports" / "tiny_search"
    assert (folder / "search_best_so_far.png").stat().st_size > 1000
    table = json.loads((folder / "table.json").read_text())
    worst = {r["row"]: r["cells"]["concept_rate/poison/worst"] for r in table["table"]}
    for rec in records:
        best = rec.best()
        assert worst[rec.plan.row]["mean"] == pytest.approx(best.objective)
    assert "found at trial" in (folder / "report.md").read_text()

    c = MlflowClient(f"sqlite:///{store.resolve() / 'mlflow.db'}")
    exp = c.get_experiment_by_name("tiny")
    runs = c.search_runs([exp.experiment_id], "tags.`resalign.search.trial` = '2'")
    names = {x.data.tags["resalign.node.name"] for x in runs}
    assert names == {
        "attack/original/poison:trial2/seed1/step2",
        "attack/plain/seed0/poison:trial2/seed1/step2",
    }
    tags = runs[0].data.tags
    assert (
        tags["resalign.search.study"].startswith("search/") and "resalign.search.param.lr" in tags
    )


def _round(log: Path, k: int) -> str:
    """The part of the log after round ``k`` was asked."""
    text = log.read_text()
    i = text.find(f": trial {k}: ")
    return "" if i < 0 else text[i:]


@pytest.mark.slow
def test_a_diverging_trial_is_told_failed_and_the_search_goes_on(tmp_path):
    """A trial whose attack diverges (lr 1e30: NonFiniteError) is recorded as failed, told to
    the sampler as FAIL and left out of the worst case; the other trial still runs, and a
    second invocation runs nothing (the recorded failure is not retried)."""
    from click.testing import CliRunner

    from resalign.cli import cli
    from resalign.engine.search import study_records
    from resalign.graph.compile import compile_spec
    from resalign.spec import load_spec

    spec = tmp_path / "diverge.yaml"
    spec.write_text(
        f"extends: {SPEC}\nname: tiny_diverge\nbaselines: !reset\n"
        "unlearn: {method: none}\n"  # the original row alone
        "threats:\n  poison:\n    search: !override\n      trials: 2\n      seed: 0\n"
        "      sampler: grid\n      space: {lr: {choice: [1.0e-3, 1.0e+30]}}\n"
        "      constraint: {metric: retain_accuracy, min: 0.0}\n"
    )
    store = tmp_path / "runs"
    args = ["run", str(spec), "--store", str(store), "--no-tracking"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "diverged; its trial is told to the sampler as failed" in res.output
    resolved = load_spec(spec)
    records = study_records(resolved, compile_spec(resolved), store)
    assert records
    for rec in records:  # original, and the none row (the same nodes)
        assert len(rec.trials) == 2
        failed = [t for t in rec.trials if t.failed is not None]
        ok = [t for t in rec.trials if t.failed is None]
        assert [t.params["lr"] for t in failed] == [1e30] and [t.params["lr"] for t in ok] == [1e-3]
        assert "loss is nan at step" in failed[0].failed
        assert rec.best() is not None and rec.best().number == ok[0].number
        saved = json.loads((store / "search" / f"{rec.plan.key}.json").read_text())
        assert saved["failed"] == 1
        assert [t["objective"] is None for t in saved["trials"]] == [
            t.failed is not None for t in rec.trials
        ]
        import optuna

        db = store / "search" / f"{rec.plan.key}.db"
        study = optuna.load_study(study_name=rec.plan.name, storage=f"sqlite:///{db}")
        assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "FAIL"]
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert not re.findall(r"^done attack/", again.output, re.M)  # nothing ran again
    rep = CliRunner().invoke(cli, ["report", str(spec), "--store", str(store)])
    assert rep.exit_code == 0, rep.output
    md = (store / "reports" / "tiny_diverge" / "report.md").read_text()
    assert "1/2, 1 diverged" in md


@pytest.mark.slow
def test_pruned_trials_stop_at_their_rung_and_replay_from_the_cache(tmp_path):
    """search.pruner (issue 25): 4 trials of a 4-step attack, evaluated at step 2 and 4, the
    median pruner after 1 trial. A trial below the median of the finished trials' values at
    step 2 stops there (checked against the rule computed here from the stored rung values):
    its last segment never runs, it is PRUNED in the Optuna study, counted in the report and
    never the worst case. A second invocation runs nothing and prunes the same trials."""
    import optuna
    from click.testing import CliRunner

    from resalign.cli import cli
    from resalign.engine.search import study_records
    from resalign.graph.compile import compile_spec
    from resalign.spec import load_spec

    spec = tmp_path / "prune.yaml"
    spec.write_text(
        f"extends: {SPEC}\nname: tiny_prune\nbaselines: !reset\n"
        "unlearn: {method: none}\n"  # the original row alone
        "threats:\n  poison:\n    steps: 4\n    search:\n      trials: 4\n"
        "      report_at: [0.5]\n      pruner: {kind: median, startup_trials: 1}\n"
        # classifier_fid varies between trials at this toy size (concept_rate is 0 for all)
        "      objective: {metric: classifier_fid}\n"
        "      space: !override\n        lr: {log_uniform: [1.0e-4, 1.0e-1]}\n"
    )
    store = tmp_path / "runs"
    args = ["run", str(spec), "--store", str(store), "--no-tracking"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    resolved = load_spec(spec)
    (rec, *_) = study_records(resolved, compile_spec(resolved), store)
    assert len(rec.trials) == 4
    # the rule, by hand: after 1 finished trial, a trial is pruned at step 2 when its value
    # there is below the median of the finished trials' values at step 2
    done_at2: list[float] = []
    expect = []
    for t in rec.trials:
        v = t.rungs[0]["objective"] if t.rungs else None
        assert t.rungs[0]["step"] == 2
        pruned = len(done_at2) >= 1 and v < statistics.median(done_at2)
        expect.append(2 if pruned else None)
        if not pruned:
            done_at2.append(v)
    assert [t.pruned_at for t in rec.trials] == expect
    assert any(expect), "no trial was pruned: the test exercises nothing"
    pruned = [t for t in rec.trials if t.pruned_at is not None]
    attacks = {p.parent.name for p in (store / "attack").glob("*/DONE")}
    graph_of = compile_spec(resolved)
    for t in pruned:
        # stopped at step 2: its step-2 segment ran, the segment to step 4 did not
        assert t.objective == t.rungs[0]["objective"] and len(t.attack_keys) == 1
        assert t.attack_keys[0] in attacks
        assert rec.best().number != t.number
    n_attacks = len(attacks)
    assert n_attacks == 2 * 4 - len(pruned)
    db = store / "search" / f"{rec.plan.key}.db"
    study = optuna.load_study(study_name=rec.plan.name, storage=f"sqlite:///{db}")
    states = [t.state.name for t in study.trials]
    assert states == ["PRUNED" if e else "COMPLETE" for e in expect]
    saved = json.loads((store / "search" / f"{rec.plan.key}.json").read_text())
    assert saved["pruned"] == len(pruned) and saved["pruner"]["kind"] == "median"

    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert not re.findall(r"^done (attack|evaluate)/", again.output, re.M)  # all cached
    (rec2, *_) = study_records(resolved, graph_of, store)
    assert [t.pruned_at for t in rec2.trials] == expect
    rep = CliRunner().invoke(cli, ["report", str(spec), "--store", str(store)])
    assert rep.exit_code == 0, rep.output
    md = (store / "reports" / "tiny_prune" / "report.md").read_text()
    assert f"{len(pruned)} pruned" in md


@pytest.mark.slow
def test_two_invocations_sharing_a_study_both_finish(tmp_path):
    """Two grid cells share the `original` row's study, so two invocations can run the same
    study at once (each waits on the other's node locks). The study used to live in
    ``<store>/search/<key>.db``, deleted and re-created by each invocation: the second one
    deleted the first one's trials and the first crashed (Optuna: "Record does not exist").
    Now each keeps its study in memory and writes the file whole: both finish, and the file
    holds the whole study."""
    import optuna

    store = tmp_path / "runs"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    with logs[0].open("w") as out_a, logs[1].open("w") as out_b:
        a = subprocess.Popen(_command(store), stdout=out_a, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 240
        # the second starts once the first has told its study round 0 (it is mid-study)
        while time.time() < deadline and a.poll() is None and not _round(logs[0], 1):
            time.sleep(0.2)
        assert a.poll() is None, logs[0].read_text()
        b = subprocess.Popen(_command(store), stdout=out_b, stderr=subprocess.STDOUT, env=env)
        codes = [a.wait(timeout=400), b.wait(timeout=400)]
    assert codes == [0, 0], "\n".join(p.read_text()[-3000:] for p in logs)
    for key in [p.stem for p in (store / "search").glob("*.json")]:
        saved = json.loads((store / "search" / f"{key}.json").read_text())
        db = f"sqlite:///{store / 'search' / f'{key}.db'}"
        study = optuna.load_study(study_name=saved["study"], storage=db)
        assert len(study.trials) == TRIALS == len(saved["trials"])
