"""The model and harvest steps through the engine's NodeContext, and exact pretraining resume."""

from __future__ import annotations

import json

import pytest
import torch

SPEC = """
name: model-step
model:
  family: tiny
  noise_schedule: {beta_schedule: linear, beta_start: 1.0e-4, beta_end: 0.02}
  tiny: {block_out_channels: [16, 32], cross_attention_dim: 16, text_hidden_size: 16,
         text_layers: 1, max_length: 32,
         pretrain: {dataset: few, steps: 12, batch_size: 8, lr: 2.0e-3}}
datasets:
  few: {type: digits, digits: [0, 1], limit: 40}
  prompts: {type: prompts, path: prompts.txt}
  harvested: {type: harvest, prompts: prompts, images_per_prompt: 2, steps: 2}
concepts:
  digit: {harmful: [harvested], retain: [few], label: 0}
"""


def _ctx(tmp_path, node, inputs, checkpoint_every=None):
    from resalign.engine.context import NodeContext

    out, state = tmp_path / "runs" / node.kind / node.key, tmp_path / "state" / node.key
    out.mkdir(parents=True, exist_ok=True)
    return NodeContext(
        node=node,
        inputs=inputs,
        out=out,
        state=state,
        checkpoint_every=checkpoint_every,
    )


def test_model_and_harvest_steps(tmp_path):
    from resalign.data.pairs import load_pairs
    from resalign.graph.compile import compile_spec
    from resalign.models.loading import load_model_node
    from resalign.spec.loader import load_spec_text
    from resalign.steps.harvest import HarvestStep
    from resalign.steps.model import ModelStep

    (tmp_path / "prompts.txt").write_text("a handwritten digit zero\na handwritten digit one\n")
    resolved = load_spec_text(SPEC, base_dir=tmp_path)
    graph = compile_spec(resolved)
    ctx = _ctx(tmp_path, graph["model"], {}, checkpoint_every=5)
    ModelStep().run(ctx)
    ctx.close()
    info = json.loads((ctx.out / "model.json").read_text())
    assert info["family"] == "tiny" and info["resolution"] == 8
    stats = json.loads((ctx.out / "stats.json").read_text())
    assert stats["pretrain_steps"] == 12 and stats["pretrain_items"] == 40
    losses = [json.loads(x) for x in (ctx.state / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses] == [10, 12]
    bundle = load_model_node(ctx.out)
    # pretraining changed the UNet away from its initialisation
    from resalign.models.tiny import build_tiny_pipeline

    init = build_tiny_pipeline(resolved.spec.model.tiny, resolved.spec.model.noise_schedule, 0)
    assert not torch.equal(init.unet.conv_in.weight, bundle.unet.conv_in.weight)

    node = graph["harvest/harvested"]
    hctx = _ctx(tmp_path, node, {"model": ctx.out})
    HarvestStep().run(hctx)
    hctx.close()
    meta = [json.loads(x) for x in (hctx.out / "metadata.jsonl").read_text().splitlines()]
    assert len(meta) == 4 and meta[0]["text"] == "a handwritten digit zero"
    pairs = load_pairs("harvested", resolved, {"harvest:harvested": hctx.out}, 8, 1)
    assert pairs.images.shape == (4, 1, 8, 8)
    # the two images of one prompt come from different seeds
    assert not torch.equal(pairs.images[0], pairs.images[1])


def test_caption_longer_than_max_length_is_a_user_error(tmp_path):
    from resalign.errors import UserError
    from resalign.graph.compile import compile_spec
    from resalign.spec.loader import load_spec_text
    from resalign.steps.model import ModelStep

    (tmp_path / "prompts.txt").write_text("x\n")
    # "a handwritten digit <name>" is 6 tokens with BOS/EOS (one per word); 4 cuts it.
    resolved = load_spec_text(SPEC.replace("max_length: 32", "max_length: 4"), base_dir=tmp_path)
    ctx = _ctx(tmp_path, compile_spec(resolved)["model"], {})
    with pytest.raises(UserError, match="max_length"):
        ModelStep().run(ctx)


def test_sd_family_records_source_without_copying(tmp_path):
    from resalign.graph.compile import compile_spec
    from resalign.models.loading import load_model_node
    from resalign.models.tiny import build_tiny_pipeline
    from resalign.spec.loader import load_spec_text
    from resalign.spec.schema.model import NoiseScheduleSpec, TinyModelSpec
    from resalign.steps.model import ModelStep

    build_tiny_pipeline(TinyModelSpec(max_length=32), NoiseScheduleSpec(), 0).save_pretrained(
        tmp_path / "ckpt"
    )
    text = SPEC.split("datasets:")[0].split("model:")[0] + (
        "model: {family: sd, pretrained: ckpt}\n"
        "datasets: {few: {type: digits}}\nconcepts: {digit: {harmful: [few], retain: [few]}}\n"
    )
    resolved = load_spec_text(text, base_dir=tmp_path)
    ctx = _ctx(tmp_path, compile_spec(resolved)["model"], {})
    ModelStep().run(ctx)
    source = json.loads((ctx.out / "source.json").read_text())
    assert source["path"] == str((tmp_path / "ckpt").resolve())
    assert not (ctx.out / "pipeline").exists()
    bundle = load_model_node(ctx.out)
    assert bundle.family == "sd" and bundle.resolution == 8


def test_pretraining_resumes_exactly(tmp_path):
    from resalign.data.pairs import PairSet
    from resalign.models.loading import bundle_from_pipeline
    from resalign.models.pretrain import pretrain_unet
    from resalign.models.tiny import build_tiny_pipeline
    from resalign.spec.schema.model import NoiseScheduleSpec, TinyModelSpec

    tiny = TinyModelSpec(
        block_out_channels=[16],
        cross_attention_dim=16,
        text_hidden_size=16,
        text_layers=1,
        max_length=8,
    )
    pairs = PairSet(images=torch.rand(10, 1, 8, 8) * 2 - 1, captions=["a", "b"] * 5)

    def fresh():
        pipe = build_tiny_pipeline(tiny, NoiseScheduleSpec(), 0)
        return bundle_from_pipeline(pipe, "tiny", NoiseScheduleSpec().model_dump())

    full = fresh()
    losses_full = []
    pretrain_unet(full, pairs, steps=9, batch_size=4, on_step=lambda s, v: losses_full.append(v))

    class Crash(Exception):
        pass

    def crash_at_7(step, loss):
        if step == 7:
            raise Crash

    first = fresh()
    with pytest.raises(Crash):
        pretrain_unet(
            first,
            pairs,
            steps=9,
            batch_size=4,
            state_dir=tmp_path,
            checkpoint_every=3,
            on_step=crash_at_7,
        )
    resumed = fresh()
    losses_resumed = {}
    pretrain_unet(
        resumed,
        pairs,
        steps=9,
        batch_size=4,
        state_dir=tmp_path,
        checkpoint_every=3,
        on_step=lambda s, v: losses_resumed.__setitem__(s, v),
    )
    assert sorted(losses_resumed) == [7, 8, 9]  # continued after the step-6 checkpoint
    a, b = full.unet.state_dict(), resumed.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses_resumed[9] == losses_full[8]
