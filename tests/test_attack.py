"""Fine-tuning attacks on the tiny SD-shaped model: what each kind changes, resume, precision."""

from __future__ import annotations

import logging
from dataclasses import MISSING, fields
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from tiny_bundle import Pairs
from tiny_bundle import tiny_bundle as Bundle

from resalign.algorithms.attack import (
    AttackConfig,
    merged_unet_state_dict,
    run_attack,
    save_merged_unet,
)
from resalign.errors import UserError


def config(seed: int = 42, **threat: Any) -> AttackConfig:
    """An attack config from a threat block: unwritten fields are the schema's defaults."""
    return AttackConfig.from_threat({"data": "x", **threat}, seed=seed)


def _data(n: int = 6, seed: int = 1, word: str = "benign") -> Pairs:
    g = torch.Generator().manual_seed(seed)
    return Pairs(torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, [f"{word} {i}" for i in range(n)])


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


FAST = dict(steps=3, batch_size=2, grad_accumulation=1, precision="fp32", lr=1e-2)


def test_full_attack_changes_every_unet_weight_matrix_and_nothing_else():
    b = Bundle()
    unet0, text0 = _snapshot(b.unet), _snapshot(b.text_encoder)
    losses = []
    res = run_attack(
        b, _data(), config(algorithm="full", **FAST), callback=lambda s, m: losses.append(m)
    )
    after = _snapshot(b.unet)
    changed = [k for k in unet0 if not torch.equal(unet0[k], after[k])]
    weights = [k for k in unet0 if k.endswith(".weight")]
    assert set(weights) <= set(changed)
    assert all(torch.equal(text0[k], v) for k, v in _snapshot(b.text_encoder).items())
    assert res.trainable == sum(p.numel() for p in b.unet.parameters())
    assert [s for s in range(1, 4)] == list(range(1, len(losses) + 1))
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in losses)


def test_lora_attack_changes_only_adapter_tensors_and_merge_is_exact(tmp_path):
    b = Bundle()
    base0 = _snapshot(b.unet)
    cfg = config(algorithm="lora", lora={"rank": 2, "targets": ["to_q", "to_v"]}, **FAST)
    res = run_attack(b, _data(), cfg)
    after = _snapshot(b.unet)
    lora_keys = [k for k in after if "lora_" in k]
    assert lora_keys and all(".to_q." in k or ".to_v." in k for k in lora_keys)
    # Base weights, under their peft-wrapped names, are bit-identical.
    for k, v in after.items():
        if "lora_" in k:
            continue
        assert torch.equal(base0[k.replace(".base_layer.", ".")], v), k
    # Only adapter tensors were trained; lora_B starts at 0 and must have moved.
    assert res.trainable == sum(after[k].numel() for k in lora_keys)
    assert any(after[k].abs().sum() > 0 for k in lora_keys if "lora_B" in k)

    # The merged UNet reproduces the adapted UNet's output (independent check: forward pass).
    from diffusers import UNet2DConditionModel

    save_merged_unet(b.unet, tmp_path / "unet")
    plain = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert set(plain.state_dict()) == set(base0)
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([10, 500])
    cond = b.encode_text(["benign 0", "benign 1"]).detach()
    with torch.no_grad():
        ref = b.unet(x, t, encoder_hidden_states=cond).sample
        got = plain(x, t, encoder_hidden_states=cond).sample
    assert torch.allclose(ref, got, atol=1e-5)
    assert not torch.allclose(got, Bundle().unet(x, t, encoder_hidden_states=cond).sample)


def test_lora_targets_that_match_nothing_is_a_user_error():
    with pytest.raises(UserError, match="match no module"):
        run_attack(Bundle(), _data(), config(algorithm="lora", lora={"targets": ["nope"]}, **FAST))


def test_dreambooth_uses_prior_batches_and_requires_a_prior(monkeypatch):
    from resalign.algorithms import attack

    with pytest.raises(UserError, match="prior"):
        run_attack(Bundle(), _data(), config(algorithm="dreambooth", **FAST))

    prior = _data(4, seed=9, word="prior")
    seen: list[list[str]] = []
    b = Bundle()
    table = attack._CaptionTable.condition

    def spy(self, captions):
        seen.append(list(captions))
        return table(self, captions)

    # observe whose captions condition each batch (the captions are encoded once, then each
    # batch takes its rows); the model is unchanged
    monkeypatch.setattr(attack._CaptionTable, "condition", spy)
    cfg = config(algorithm="dreambooth", prior_weight=1.0, **FAST)
    res = run_attack(b, _data(), cfg, prior=prior)
    assert len(seen) == 2 * 3  # instance + prior batch per step
    assert all(c.startswith("prior") for batch in seen[1::2] for c in batch)
    assert all(c.startswith("benign") for batch in seen[0::2] for c in batch)
    assert res.trainable == sum(p.numel() for p in b.unet.parameters())

    # prior_weight 0 gives a different trajectory than 1 (the prior term enters the loss).
    b0 = Bundle()
    run_attack(b0, _data(), config(algorithm="dreambooth", prior_weight=0.0, **FAST), prior=prior)
    w = "conv_in.weight"
    assert not torch.equal(b0.unet.state_dict()[w], b.unet.state_dict()[w])


@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
def test_optimizers_and_seed_determinism(opt):
    cfg = config(optimizer=opt, **FAST)
    a, b = Bundle(), Bundle()
    run_attack(a, _data(), cfg)
    run_attack(b, _data(), cfg)
    assert all(torch.equal(x, y) for x, y in zip(a.unet.parameters(), b.unet.parameters()))
    c = Bundle()
    run_attack(c, _data(), config(optimizer=opt, seed=7, **FAST))
    assert not all(torch.equal(x, y) for x, y in zip(a.unet.parameters(), c.unet.parameters()))


@pytest.mark.parametrize(
    ("schedule", "warmup", "expected"),
    [
        ("constant", 0, [1.0, 1.0, 1.0, 1.0]),
        ("constant", 2, [0.0, 0.5, 1.0, 1.0]),
        ("linear", 0, [1.0, 0.75, 0.5, 0.25]),
        ("cosine", 0, [1.0, 0.8535533905932737, 0.5, 0.14644660940672627]),
    ],
)
def test_lr_schedules(schedule, warmup, expected):
    lrs = []
    cfg = config(
        schedule=schedule,
        warmup_steps=warmup,
        steps=4,
        lr=1e-3,
        precision="fp32",
        batch_size=1,
        grad_accumulation=1,
    )
    run_attack(Bundle(), _data(), cfg, callback=lambda s, m: lrs.append(m["lr"]))
    assert lrs == pytest.approx([1e-3 * e for e in expected])


def test_gradient_accumulation_equals_bigger_batch_with_sgd():
    # With SGD, batch 1 x accumulation 2 and batch 2 x accumulation 1 see different samples
    # per micro-batch; compare instead accumulation 2 against an explicit two-batch mean.
    a = Bundle()
    run_attack(
        a,
        _data(2),
        config(
            optimizer="sgd",
            steps=1,
            batch_size=1,
            grad_accumulation=2,
            precision="fp32",
            lr=0.1,
            weight_decay=0.0,
        ),
    )
    b = Bundle()
    b.unet.requires_grad_(True)  # the bundle comes frozen; the attack unfreezes what it trains
    # Reference: the same draws, gradients averaged by hand.
    from resalign.algorithms.attack import _Sampler, denoise_loss

    g = torch.Generator().manual_seed(42)
    data = _data(2)
    smp = _Sampler(2, g)
    total = 0
    for _ in range(2):
        idx = smp.take(1)
        lat = b.encode_images(data.images[idx]).detach()
        cond = b.encode_condition([data.captions[i] for i in idx.tolist()])
        total = total + denoise_loss(b.unet, b.noise_scheduler, lat, cond, g) / 2
    total.backward()
    with torch.no_grad():
        for p in b.unet.parameters():
            p -= 0.1 * p.grad
    for x, y in zip(a.unet.parameters(), b.unet.parameters()):
        assert torch.allclose(x, y, atol=1e-6)


def test_max_grad_norm_clips_the_update():
    # SGD step = lr * clipped grad, so the total update norm is lr * max_grad_norm.
    b = Bundle()
    before = torch.cat([p.detach().flatten().clone() for p in b.unet.parameters()])
    cfg = config(
        optimizer="sgd",
        steps=1,
        lr=1.0,
        weight_decay=0.0,
        max_grad_norm=1e-3,
        precision="fp32",
        batch_size=2,
        grad_accumulation=1,
    )
    run_attack(b, _data(), cfg)
    after = torch.cat([p.detach().flatten() for p in b.unet.parameters()])
    assert float((after - before).norm()) == pytest.approx(1e-3, rel=1e-3)


def test_resume_from_state_continues_exactly(tmp_path):
    cfg = config(
        steps=4, checkpoint_every=2, batch_size=2, grad_accumulation=1, precision="fp32", lr=1e-2
    )
    ref = Bundle()
    ref_losses = run_attack(ref, _data(), cfg).losses

    class Crash(Exception):
        pass

    def crash_at_3(step, m):
        if step == 3:
            raise Crash

    first = Bundle()
    with pytest.raises(Crash):
        run_attack(first, _data(), cfg, state_dir=tmp_path, callback=crash_at_3)
    second = Bundle()  # a fresh process: weights come from the state folder
    res = run_attack(second, _data(), cfg, state_dir=tmp_path)
    assert res.resumed_from == 2
    assert res.losses == ref_losses
    for x, y in zip(ref.unet.parameters(), second.unet.parameters()):
        assert torch.equal(x, y)


def test_stop_at_then_continue_is_the_whole_attack(tmp_path):
    """An attack stopped at step 3 (a segment) and continued from its state ends where the
    uninterrupted attack does, with the whole schedule (cosine over 5 steps, not 3)."""
    cfg = config(steps=5, checkpoint_every=10, batch_size=2, grad_accumulation=1,
                 precision="fp32", lr=1e-2, schedule="cosine")  # fmt: skip
    ref = Bundle()
    ref_losses = run_attack(ref, _data(), cfg).losses
    first = Bundle()
    part = run_attack(first, _data(), cfg, state_dir=tmp_path, stop_at=3)
    assert part.steps == 3 and part.losses == ref_losses[:3]
    second = Bundle()
    res = run_attack(second, _data(), cfg, state_dir=tmp_path)
    assert res.resumed_from == 3 and res.losses == ref_losses
    for x, y in zip(ref.unet.parameters(), second.unet.parameters()):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="stop_at"):
        run_attack(Bundle(), _data(), cfg, stop_at=6)


def test_fp16_on_cpu_falls_back_to_fp32_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="resalign.attack"):
        res = run_attack(Bundle(), _data(), config(**{**FAST, "precision": "fp16"}))
    assert res.precision == "fp32"
    assert "fp16" in caplog.text and res.notes
    res = run_attack(Bundle(), _data(), config(**{**FAST, "precision": "bf16"}))
    assert res.precision == "bf16" and not res.notes


def test_eval_hook_gets_merged_checkpoints(tmp_path):
    from diffusers import UNet2DConditionModel

    b = Bundle()
    saved = []

    def hook(step, unet):
        save_merged_unet(unet, tmp_path / f"step{step}")
        saved.append(step)

    run_attack(
        b,
        _data(),
        config(algorithm="lora", **{**FAST, "steps": 4}),
        eval_at=[2, 4],
        on_eval=hook,
    )
    assert saved == [2, 4]
    s2 = UNet2DConditionModel.from_pretrained(tmp_path / "step2").state_dict()
    s4 = UNet2DConditionModel.from_pretrained(tmp_path / "step4").state_dict()
    final = merged_unet_state_dict(b.unet)
    assert all(torch.equal(s4[k], final[k]) for k in final)
    assert any(not torch.equal(s2[k], s4[k]) for k in s4)


def test_threat_block_maps_to_config_and_own_lora_is_refused():
    cfg = AttackConfig.from_threat(
        {
            "data": "x",
            "algorithm": "lora",
            "lora": {"mode": "fresh", "rank": 8, "targets": ["to_k"]},
            "optimizer": "sgd",
            "lr": 3e-4,
            "steps": 50,
            "grad_accumulation": 2,
            "precision": "bf16",
        },
        seed=3,
    )
    assert (cfg.algorithm, cfg.lora_rank, cfg.lora_targets, cfg.optimizer, cfg.seed) == (
        "lora",
        8,
        ("to_k",),
        "sgd",
        3,
    )
    # a threat's adapter is always fresh: the schema refuses 'own' (at validation, with the
    # spec's line), and a lora block without mode is fresh (it used to default to 'own' and
    # fail only when the attack ran)
    with pytest.raises(ValidationError, match="fresh"):
        AttackConfig.from_threat({"data": "x", "lora": {"mode": "own"}}, seed=0)
    assert config(algorithm="lora", lora={"rank": 2}).lora_rank == 2
    published = AttackConfig.from_threat({"data": "x"}, seed=42)
    assert (published.algorithm, published.steps, published.lr, published.optimizer) == (
        "full",
        200,
        1e-5,
        "adamw",
    )
    assert published.batch_size * published.grad_accumulation == 4
    assert published.lora_targets == ("to_q", "to_k", "to_v", "to_out.0")


def test_attack_defaults_live_only_in_the_schema():
    from resalign.spec.schema.threats import ThreatSpec

    # AttackConfig has no defaults of its own ...
    assert all(f.default is MISSING and f.default_factory is MISSING for f in fields(AttackConfig))
    # ... and takes every unwritten value from ThreatSpec's fields.
    spec = ThreatSpec(data="x")
    cfg = AttackConfig.from_threat(spec, seed=1)
    same = ["algorithm", "optimizer", "lr", "weight_decay", "schedule", "warmup_steps", "steps"]
    same += ["batch_size", "grad_accumulation", "precision", "max_grad_norm", "prior_weight"]
    same += ["checkpoint_every"]
    assert {k: getattr(cfg, k) for k in same} == {k: getattr(spec, k) for k in same}
    assert (cfg.lora_rank, cfg.lora_alpha) == (spec.lora.rank, spec.lora.alpha)
    assert AttackConfig.from_threat(spec, seed=1, checkpoint_every=7).checkpoint_every == 7


def test_lora_attack_does_not_depend_on_the_global_rng():
    # peft draws lora_A from the global RNG; the attack draws it under its own seed, so the
    # same node gives the same weights in a fresh worker and after other nodes ran.
    outs = []
    for global_seed in (0, 1234):
        torch.manual_seed(global_seed)
        b = Bundle()
        run_attack(b, _data(), config(algorithm="lora", lora={"rank": 2}, **FAST))
        outs.append(merged_unet_state_dict(b.unet))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    b = Bundle()
    run_attack(b, _data(), config(algorithm="lora", lora={"rank": 2}, seed=5, **FAST))
    other = merged_unet_state_dict(b.unet)
    assert any(not torch.equal(outs[0][k], other[k]) for k in other)
