"""attack → evaluate → report steps on the tiny model, through the engine's NodeContext."""

from __future__ import annotations

import json

import pytest

SPEC = """
name: steps-e2e
model:
  family: tiny
  tiny: {sample_size: 8, block_out_channels: [16, 32], attention_head_dim: 8,
         cross_attention_dim: 16, text_hidden_size: 16, text_layers: 1, max_length: 32}
datasets:
  benign: {type: digits, digits: [1, 2, 3], limit: 8}
  harm: {type: digits, digits: [0], limit: 4}
concepts:
  digit: {harmful: [harm], retain: [benign], label: 0}
threats:
  benign: {data: benign, steps: 2, eval_at: [1, 2], seeds: [1, 2], batch_size: 2,
           grad_accumulation: 1, precision: fp32, lr: 1.0e-3}
  poisoned: {data: benign, poison: {data: harm, ratio: 0.5}, steps: 2, seeds: [1, 2],
             batch_size: 2, grad_accumulation: 1, precision: fp32, lr: 1.0e-3}
evaluate:
  generation: {steps: 2, images_per_prompt: 1, batch_size: 10}
  metrics: [{kind: concept_rate}]
"""


@pytest.mark.slow
def test_attack_evaluate_report_steps(tmp_path):
    from resalign.engine.context import NodeContext
    from resalign.evaluation.report import results_from_dirs, write_report
    from resalign.graph.compile import compile_spec
    from resalign.models.loading import write_model_json
    from resalign.models.tiny import build_tiny_pipeline
    from resalign.spec.loader import load_spec_text
    from resalign.steps.attack import AttackStep
    from resalign.steps.evaluate import EvaluateStep

    resolved = load_spec_text(SPEC, base_dir=tmp_path)
    graph = compile_spec(resolved)
    spec = resolved.spec
    model = tmp_path / "model"
    build_tiny_pipeline(spec.model.tiny, spec.model.noise_schedule).save_pretrained(
        model / "pipeline"
    )
    write_model_json(
        model, {"family": "tiny", "noise_schedule": spec.model.noise_schedule.model_dump()}
    )

    done = {"model": model}
    evals = {}
    for node in graph:
        if node.row != "original" or node.kind not in ("attack", "evaluate"):
            continue
        out, state = tmp_path / "runs" / node.kind / node.key, tmp_path / "state" / node.key
        out.mkdir(parents=True)
        ctx = NodeContext(
            node=node,
            inputs={r: done[d] for r, d in node.deps.items()},
            out=out,
            state=state,
        )
        (AttackStep if node.kind == "attack" else EvaluateStep)().run(ctx)
        ctx.close()
        done[node.name] = out
        if node.kind == "evaluate":
            evals[node.name] = out

    stats = json.loads((done["attack/original/poisoned/seed1/step2"] / "stats.json").read_text())
    assert len(stats["poisoned_positions"]) == round(0.5 * 8) and stats["precision"] == "fp32"
    assert (done["attack/original/benign/seed2/step1"] / "unet/config.json").is_file()
    assert (done["attack/original/benign/seed2/step1"] / "resume/checkpoint.pt").is_file()
    # the segment to step 2 continued the one to step 1
    st2 = json.loads((done["attack/original/benign/seed2/step2"] / "stats.json").read_text())
    assert st2["resumed_from"] == 1 and st2["steps"] == 2
    m = json.loads((evals["evaluate/original/benign/seed1/step2"] / "metrics.json").read_text())
    assert set(m) == {"concept_rate", "retain_accuracy", "classifier_fid"}
    assert m["concept_rate"]["definition"] == "concept_rate" and m["concept_rate"]["version"] == "1"
    table = write_report(
        results_from_dirs(evals),
        tmp_path / "report",
        rows=["original"],
        threats={"benign": {"eval_at": [1, 2]}, "poisoned": {"eval_at": [2]}},
    )
    assert [c["id"] for c in table["columns"]][:3] == [
        "concept_rate/pre",
        "concept_rate/benign",
        "concept_rate/poisoned",
    ]
    assert table["table"][0]["cells"]["concept_rate/benign"]["n"] == 2
    assert (tmp_path / "report" / "concept_rate_vs_steps.png").is_file()
