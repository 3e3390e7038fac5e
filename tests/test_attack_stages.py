"""Staged fine-tuning attacks (issue 16): a threat's ``stages`` (benign data first, then a
small harmful set) run in the one attack loop (``resalign.algorithms.attack.run_attack``) on
a real tiny diffusers UNet. Checked:

- the data switch: which items each step draws (stage A's before the boundary, stage B's
  after it, B's first epoch being the permutation the attack generator draws at the boundary,
  recomputed here from a plain attack's saved generator state);
- independent equality: stage 1 of a staged attack equals, bitwise, a plain attack on stage
  1's data of the same total length stopped at the boundary (same weights, losses and LR);
- resume: stopping and continuing at, before and after the boundary, and a crash after a
  checkpoint inside stage 2, all end bitwise where the uninterrupted staged attack does;
- the schema's rules and ``resalign validate``'s file:line errors, the graph's dataset
  closure, the rehearsal's capping;
- one end-to-end ``resalign run`` of the tiny spec with a staged, poisoned threat whose
  segments cross the boundary, equal to the same attack run in one go in-process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from pydantic import ValidationError
from tiny_bundle import Pairs
from tiny_bundle import tiny_bundle as bundle

from resalign.algorithms.attack import STATE_FILE, AttackConfig, run_attack
from resalign.cli import cli
from resalign.spec.schema.threats import ThreatSpec

TINY_SPEC = Path(__file__).resolve().parent / "specs" / "tiny.yaml"


def pairs(n: int, word: str, seed: int) -> Pairs:
    g = torch.Generator().manual_seed(seed)
    return Pairs(torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, [f"{word} {i}" for i in range(n)])


A, B = pairs(4, "a", 1), pairs(6, "b", 2)
COMMON = dict(batch_size=2, grad_accumulation=1, precision="fp32", lr=1e-2, schedule="cosine")


def staged(k: int = 3, m: int = 2, **kw: Any) -> AttackConfig:
    stages = [{"data": "a", "steps": k}, {"data": "b", "steps": m}]
    return AttackConfig.from_threat({"stages": stages, **COMMON, **kw}, seed=7)


def plain(steps: int, **kw: Any) -> AttackConfig:
    return AttackConfig.from_threat({"data": "a", "steps": steps, **COMMON, **kw}, seed=7)


def recording(b: Any) -> list[list[str]]:
    """Record the captions of every batch ``b`` encodes (one list per batch)."""
    seen: list[list[str]] = []
    encode = b.encode_condition

    def record(captions: list[str]) -> Any:
        seen.append(list(captions))
        return encode(captions)

    b.encode_condition = record
    return seen


def weights(b: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in b.unet.state_dict().items()}


def same(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> bool:
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# --------------------------------------------------------------------------- the loop


def test_config_carries_the_stage_lengths_and_their_sum():
    cfg = staged(3, 2)
    assert cfg.stages == (3, 2) and cfg.steps == 5
    assert plain(4).stages == (4,)


def test_the_data_switches_exactly_at_the_boundary(tmp_path, monkeypatch):
    from resalign.algorithms import attack

    # every batch encodes its own captions (the per-batch path), so recording sees each one
    monkeypatch.setattr(attack, "CAPTION_TABLE_MAX", 0)
    b = bundle()
    seen = recording(b)
    per_step: list[list[str]] = []
    run_attack(b, [A, B], staged(3, 2), callback=lambda s, m: per_step.append(seen.pop(0)))
    assert not seen and len(per_step) == 5
    # steps 1-3 draw from stage A only, steps 4-5 from stage B only (2 items each step)
    assert all(len(c) == 2 and all(x.startswith("a ") for x in c) for c in per_step[:3])
    assert all(len(c) == 2 and all(x.startswith("b ") for x in c) for c in per_step[3:])

    # Independently: a plain attack on A draws the same items in steps 1-3, and B's first
    # epoch is the permutation the attack generator (saved by that plain attack at step 3)
    # draws next.
    p = bundle()
    seen_p = recording(p)
    run_attack(p, A, plain(5), state_dir=tmp_path, stop_at=3)
    assert seen_p == per_step[:3]
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    g = torch.Generator()
    g.set_state(state["generator"])
    first_epoch = torch.randperm(len(B.captions), generator=g).tolist()
    assert [x for c in per_step[3:] for x in c] == [B.captions[i] for i in first_epoch[:4]]


def test_stage_one_equals_a_plain_attack_on_its_data_stopped_at_the_boundary(tmp_path):
    lrs_staged: list[float] = []
    s = bundle()
    part = run_attack(
        s, [A, B], staged(3, 2), stop_at=3, callback=lambda st, m: lrs_staged.append(m["lr"])
    )
    lrs_plain: list[float] = []
    p = bundle()
    ref = run_attack(p, A, plain(5), stop_at=3, callback=lambda st, m: lrs_plain.append(m["lr"]))
    assert part.losses == ref.losses and len(part.losses) == 3
    assert lrs_staged == lrs_plain  # one cosine schedule over all 5 steps, not over stage 1
    assert lrs_staged[0] > lrs_staged[1] > lrs_staged[2]
    assert same(weights(s), weights(p))

    # and the second stage does change what happens next: the staged attack run to the end
    # differs from the plain attack on A run to the end
    s2, p2 = bundle(), bundle()
    run_attack(s2, [A, B], staged(3, 2))
    run_attack(p2, A, plain(5))
    assert not same(weights(s2), weights(p2))


@pytest.mark.parametrize("stop", [2, 3, 4], ids=lambda s: f"stop{s}")
def test_a_segment_continued_across_the_boundary_is_the_uninterrupted_attack(tmp_path, stop):
    cfg = staged(3, 2, checkpoint_every=100)
    ref = bundle()
    ref_res = run_attack(ref, [A, B], cfg)
    first = bundle()
    part = run_attack(first, [A, B], cfg, state_dir=tmp_path, stop_at=stop)
    assert part.losses == ref_res.losses[:stop]
    second = bundle()  # a fresh process: everything comes from the state folder
    res = run_attack(second, [A, B], cfg, state_dir=tmp_path)
    assert res.resumed_from == stop and res.losses == ref_res.losses
    assert same(weights(second), weights(ref))
    st = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert len(st["stage_samplers"]) == 1 and st["stage_samplers"][0] is not None


def test_a_crash_in_stage_two_resumes_from_its_checkpoint_bitwise(tmp_path):
    cfg = staged(2, 3, checkpoint_every=3)  # the checkpoint at step 3 is inside stage 2
    ref = bundle()
    ref_res = run_attack(ref, [A, B], cfg)

    class Crash(Exception):
        pass

    def crash_at_5(step: int, m: Any) -> None:
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        run_attack(bundle(), [A, B], cfg, state_dir=tmp_path, callback=crash_at_5)
    st = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert st["step"] == 3 and st["stage_samplers"][0]["pos"] == 2  # B's sampler mid-epoch
    second = bundle()
    res = run_attack(second, [A, B], cfg, state_dir=tmp_path)
    assert res.resumed_from == 3 and res.losses == ref_res.losses
    assert same(weights(second), weights(ref))


def test_eval_at_inside_either_stage_sees_the_uninterrupted_weights():
    saved: dict[int, dict[str, torch.Tensor]] = {}

    def on_eval(step: int, unet: torch.nn.Module) -> None:
        saved[step] = {k: v.detach().clone() for k, v in unet.state_dict().items()}

    run_attack(bundle(), [A, B], staged(3, 2), eval_at=[2, 4], on_eval=on_eval)
    for stop in (2, 4):
        b = bundle()
        run_attack(b, [A, B], staged(3, 2), stop_at=stop)
        assert same(saved[stop], weights(b))


def test_the_loop_refuses_data_that_do_not_match_the_stages():
    with pytest.raises(ValueError, match="stages of"):
        run_attack(bundle(), A, staged(3, 2))
    from resalign.errors import UserError

    with pytest.raises(UserError, match="stage 2 is empty"):
        run_attack(bundle(), [A, Pairs(A.images[:0], [])], staged(3, 2))


# --------------------------------------------------------------------------- the spec


def test_schema_sums_the_stages_and_refuses_what_contradicts_them():
    t = ThreatSpec.model_validate(
        {"stages": [{"data": "a", "steps": 80}, {"data": "b", "steps": 20}], "eval_at": [50, 100]}
    )
    assert t.steps == 100 and t.data is None and t.eval_at == [50, 100]
    # a written steps that agrees is fine; a dump validates again to the same threat
    same_t = ThreatSpec.model_validate({**t.model_dump(mode="json"), "steps": 100})
    assert same_t == t
    two = [{"data": "a", "steps": 2}, {"data": "b", "steps": 1}]
    cases = {
        r"steps is 4 but the stages add up to 2 \+ 1 = 3": {"stages": two, "steps": 4},
        "remove data": {"stages": two, "data": "a"},
        "remove poison": {"stages": two, "poison": {"data": "b", "ratio": 0.1}},
        "at least two stages": {"stages": two[:1]},
        "needs 'data'": {"steps": 3},
        r"eval_at has checkpoint\(s\) \[4\] after the last step \(3\)": {
            "stages": two,
            "eval_at": [4],
        },
    }
    for message, threat in cases.items():
        with pytest.raises(ValidationError, match=message):
            ThreatSpec.model_validate(threat)
    with pytest.raises(ValidationError, match="steps"):
        ThreatSpec.model_validate(
            {"stages": [{"data": "a", "steps": 0}, {"data": "b", "steps": 1}]}
        )
    # a search over steps cannot contradict the stages either
    with pytest.raises(ValidationError, match="search.space.steps"):
        ThreatSpec.model_validate(
            {"stages": two, "search": {"space": {"steps": {"integer": [2, 5]}}, "trials": 2,
             "constraint": {"metric": "retain_accuracy", "min": 0.5}}}
        )  # fmt: skip


def _tiny(tmp_path: Path, threat: dict[str, Any], name: str = "spec.yaml") -> Path:
    d = yaml.safe_load(TINY_SPEC.read_text(encoding="utf-8"))
    d.pop("baselines")
    d["datasets"]["held_out"] = {"type": "digits", "split": "test", "digits": [0], "limit": 8}
    d["threats"] = {"staged": threat}
    d["tracking"]["system_metrics"] = False
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d, sort_keys=False), encoding="utf-8")
    return p


STAGED = {
    "stages": [
        {"data": "benign", "steps": 2},
        {"data": "harmful", "steps": 2, "poison": {"data": "held_out", "ratio": 0.5}},
    ],
    "eval_at": [1, 3, 4],
    "batch_size": 4,
    "grad_accumulation": 1,
    "precision": "fp32",
    "optimizer": "adam",
    "lr": 1.0e-3,
    "checkpoint_every": 1,
    "seeds": [1],
}


def test_validate_names_the_file_and_line_of_an_unknown_stage_dataset(tmp_path):
    bad = {**STAGED, "stages": [{"data": "benign", "steps": 2},
                                {"data": "harmfull", "steps": 2,
                                 "poison": {"data": "nope", "ratio": 0.5}}]}  # fmt: skip
    path = _tiny(tmp_path, bad)
    r = CliRunner().invoke(cli, ["validate", str(path)])
    assert r.exit_code == 2, r.output
    lines = path.read_text().splitlines()
    for ref, name in (("stages[1].data", "harmfull"), ("stages[1].poison.data", "nope")):
        (head,) = [x for x in r.output.splitlines() if f"threats.staged.{ref}:" in x]
        assert f"unknown dataset '{name}'" in head and "Traceback" not in r.output
        file, line = head.split(":")[:2]
        assert file == str(path) and name in lines[int(line) - 1]
    assert "did you mean 'harmful'?" in r.output


def test_graph_reads_every_stage_dataset_and_keeps_plain_keys(tmp_path):
    from resalign.graph.compile import compile_spec
    from resalign.spec import load_spec

    g = compile_spec(load_spec(_tiny(tmp_path, STAGED)))
    seg = g["attack/original/staged/seed1/step3"]
    assert set(seg.params["datasets"]) == {"benign", "harmful", "held_out"}
    assert seg.params["threat"]["stages"][1]["poison"]["data"] == "held_out"
    assert seg.deps["resume"] == "attack/original/staged/seed1/step1"
    # a plain threat's params have no 'stages' entry, so its keys are those from before
    plain_t = {k: v for k, v in STAGED.items() if k != "stages"} | {"data": "benign", "steps": 4}
    gp = compile_spec(load_spec(_tiny(tmp_path, plain_t, "plain.yaml")))
    assert "stages" not in gp["attack/original/staged/seed1/step4"].params["threat"]


def test_rehearsal_caps_the_stages_to_a_valid_threat():
    from resalign.rehearse import PROFILES, _cap_threat

    t = _cap_threat({**STAGED, "stages": [{"data": "a", "steps": 80}, {"data": "b", "steps": 20}],
                     "eval_at": [50, 90, 100]}, PROFILES["toy"])  # fmt: skip
    spec = ThreatSpec.model_validate(t)
    assert [s.steps for s in spec.stages] == [2, 1] and spec.steps == 3
    assert spec.eval_at == [1, 2, 3]


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_resalign_run_of_a_staged_threat_equals_the_attack_run_in_one_go(tmp_path):
    import json

    from diffusers import UNet2DConditionModel

    from resalign.data.pairs import load_pairs, mix_pairs
    from resalign.graph.compile import compile_spec
    from resalign.models.loading import load_row
    from resalign.spec import load_spec

    path = _tiny(tmp_path, STAGED)
    store = tmp_path / "runs"
    r = CliRunner().invoke(cli, ["run", str(path), "--store", str(store), "--no-tracking"])
    assert r.exit_code == 0, r.output
    resolved = load_spec(path)
    g = compile_spec(resolved)
    last = g["attack/original/staged/seed1/step4"]
    out = store / "attack" / last.key
    stats = json.loads((out / "stats.json").read_text())
    # segments 0-1, 1-3 (crosses the boundary at 2), 3-4
    assert stats["resumed_from"] == 3 and stats["steps"] == 4
    assert stats["config"]["stages"] == [2, 2]
    assert stats["data_items"] == [8, 8] and stats["poisoned_positions"][0] == []
    assert len(stats["poisoned_positions"][1]) == 4  # half of the 8 harmful items
    assert (store / "report" / g["report"].key / "table.json").is_file()
    for step in (1, 3, 4):
        assert (store / "evaluate" / g[f"evaluate/original/staged/seed1/step{step}"].key).is_dir()

    # the same attack, uninterrupted, in-process from the model node
    b = load_row(store / "model" / g["model"].key, None, None, device="cpu", dtype="float32")
    res, ch = b.resolution, int(b.vae.config.in_channels)
    benign = load_pairs("benign", resolved, {}, res, ch)
    harm, _ = mix_pairs(
        load_pairs("harmful", resolved, {}, res, ch),
        load_pairs("held_out", resolved, {}, res, ch),
        0.5,
        1,
    )
    run_attack(b, [benign, harm], AttackConfig.from_threat(last.params["threat"], 1))
    got = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    want = b.unet.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_the_ratio_size_template_has_every_ratio_and_size_and_a_staged_threat_per_spec():
    from resalign.engine.grid import prepare
    from resalign.spec.templates import load_template

    path = Path(__file__).resolve().parents[1] / "templates" / "ratio_size_digits.yaml.j2"
    tpl = load_template(path)
    ratios, sizes = tpl.variables["ratios"], tpl.variables["sizes"]
    _, prepared = prepare(path)
    for rc, g in prepared:
        spec = rc.spec.spec
        poisoned = {(t.poison.ratio, spec.datasets[t.data].limit)
                    for t in spec.threats.values() if t.poison}  # fmt: skip
        assert poisoned == {(r, n) for r in ratios for n in sizes}
        (st,) = [t for t in spec.threats.values() if t.stages]
        assert st.steps == sum(s.steps for s in st.stages)
        assert st.eval_at == [st.stages[0].steps, st.steps]  # the boundary and the end
        assert {t.steps for t in spec.threats.values()} == {st.steps}  # one budget
        # the staged threat's segments read both stages' data
        name = next(n for n, t in spec.threats.items() if t.stages)
        seg = g[f"attack/original/{name}/seed1/step{st.steps}"]
        assert {s.data for s in st.stages} <= set(seg.params["datasets"])
        # and a textual-inversion threat naming the digit's word, the same in every cell
        (ti,) = [t for t in spec.threats.values() if t.algorithm == "embedding"]
        assert ti.embedding.replaces == "zero" and ti.lr == tpl.variables["embedding_lr"]
    assert f"{len(prepared[0][1])} nodes per cell" in path.read_text()
