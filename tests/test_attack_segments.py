"""Attack segments (issue 14): one attack node per evaluation step, each continuing the
previous one from its saved state. Checked on the real tiny spec through `resalign run`:

- the segment to step 4 of an attack evaluated at [2, 4] has the bytes (weights and loss
  history) of the attack evaluated at [4] alone, run in another store;
- adding evaluation step 3 runs exactly one attack segment and one evaluation per row (and
  the report); the segment to step 4 is not touched, and the new segment equals a run that
  starts from step 0.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from resalign.cli import cli

TINY = Path(__file__).resolve().parent / "specs" / "tiny.yaml"


def spec(tmp_path: Path, eval_at: list[int]) -> Path:
    d = yaml.safe_load(TINY.read_text(encoding="utf-8"))
    d.pop("baselines")
    d["threats"]["benign"].update(steps=4, eval_at=eval_at, checkpoint_every=1)
    d["tracking"]["system_metrics"] = False
    p = tmp_path / f"spec_{'_'.join(map(str, eval_at))}.yaml"
    p.write_text(yaml.safe_dump(d), encoding="utf-8")
    return p


def run(path: Path, store: Path) -> tuple[str, object]:
    from resalign.graph.compile import compile_spec
    from resalign.spec import load_spec

    res = CliRunner().invoke(cli, ["run", str(path), "--store", str(store), "--no-tracking"])
    assert res.exit_code == 0, res.output
    return res.output, compile_spec(load_spec(path))


def files(store: Path, graph, name: str) -> dict[str, bytes]:
    n = graph[name]
    d = store / n.kind / n.key
    return {
        f.relative_to(d).as_posix(): f.read_bytes()
        for f in sorted(d.rglob("*"))
        if f.is_file() and (f.suffix == ".safetensors" or f.name == "metrics.jsonl")
        and not f.relative_to(d).as_posix().startswith("resume/")
    }  # fmt: skip


@pytest.mark.slow
def test_segments_equal_the_uninterrupted_attack_and_an_eval_step_runs_one_segment(tmp_path):
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    _, g24 = run(spec(tmp_path, [2, 4]), s1)
    _, g4 = run(spec(tmp_path, [4]), s2)
    for row in ("original", "resalign/seed0"):
        seg = f"attack/{row}/benign/seed1/step4"
        assert g24[seg].key == g4[seg].key and "resume" in g24[seg].deps
        got, want = files(s1, g24, seg), files(s2, g4, seg)
        assert "unet/diffusion_pytorch_model.safetensors" in got and "metrics.jsonl" in got
        assert got == want
        stats = json.loads((s1 / "attack" / g24[seg].key / "stats.json").read_text())
        assert stats["resumed_from"] == 2 and stats["steps"] == 4  # it continued, not redid
        # the first segment keeps the state the second one continued from
        first = g24[f"attack/{row}/benign/seed1/step2"]
        assert (s1 / "attack" / first.key / "resume" / "checkpoint.pt").is_file()
        assert not (s1 / "attack" / g24[seg].key / "resume").exists()  # nothing comes after

    done4 = {
        row: (s1 / "attack" / g24[f"attack/{row}/benign/seed1/step4"].key / "DONE").stat()
        for row in ("original", "resalign/seed0")
    }
    out, g234 = run(spec(tmp_path, [2, 3, 4]), s1)
    ran = re.search(r"(\d+) node\(s\) to run, (\d+) cached", out)
    assert ran is not None, out
    # per row: the segment to step 3 and its evaluation; then the report
    assert int(ran.group(1)) == 2 * 2 + 1, out
    assert int(ran.group(2)) == len(g234) - 5
    for row, st in done4.items():
        seg4 = g234[f"attack/{row}/benign/seed1/step4"]
        assert seg4.deps["resume"] == f"attack/{row}/benign/seed1/step3"
        again = (s1 / "attack" / seg4.key / "DONE").stat()
        assert (again.st_mtime_ns, again.st_ino) == (st.st_mtime_ns, st.st_ino)

    # the new segment (continued from step 2) equals one that starts from step 0
    _, g3 = run(spec(tmp_path, [3]), s2)
    for row in ("original", "resalign/seed0"):
        seg = f"attack/{row}/benign/seed1/step3"
        assert "resume" not in g3[seg].deps
        assert files(s1, g234, seg) == files(s2, g3, seg)
        stats = json.loads((s1 / "attack" / g234[seg].key / "stats.json").read_text())
        assert stats["resumed_from"] == 2
