"""Trainable selection: LoRA with the published init, full, module subsets, errors."""

from __future__ import annotations

import pytest
import torch

from resalign.algorithms.toy import toy_unet
from resalign.errors import UserError
from resalign.models.attention import math_attention
from resalign.models.trainable import apply_trainable, preview_trainable
from resalign.spec.schema.model import TrainableSpec

D = torch.float64


def _trained(unet):
    return {n: p for n, p in unet.named_parameters() if p.requires_grad}


def test_lora_published_init_and_counts():
    unet = toy_unet("small", D)
    spec = TrainableSpec()
    pre = preview_trainable(unet, spec)
    sel = apply_trainable(unet, spec, torch.Generator().manual_seed(0))
    tr = _trained(unet)
    assert sel.names == pre.names and set(tr) == set(sel.names)
    assert sel.num_params == sum(p.numel() for p in tr.values()) == pre.num_params
    assert sel.num_tensors == len(tr) and "lora" in sel.summary()
    down = torch.cat([p.detach().flatten() for n, p in tr.items() if ".lora_A." in n])
    up = torch.cat([p.detach().flatten() for n, p in tr.items() if ".lora_B." in n])
    assert float(down.std()) == pytest.approx(0.008, rel=0.1)
    assert float(up.std()) == pytest.approx(0.002, rel=0.1)
    # every target projection of every attention layer got an adapter
    n_attn = sum(1 for n, _ in unet.named_modules() if n.endswith(".attn1") or n.endswith(".attn2"))
    assert sel.num_tensors == n_attn * 4 * 2


def test_peft_default_init_is_a_no_op():
    unet = toy_unet("tiny", D)
    x = torch.randn(1, 1, 8, 8, dtype=D)
    e = torch.randn(1, 4, 8, dtype=D)
    t = torch.tensor([10])
    with torch.no_grad():
        before = unet(x, t, encoder_hidden_states=e).sample
        apply_trainable(unet, TrainableSpec(init="peft_default"))
        after = unet(x, t, encoder_hidden_states=e).sample
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_full_and_module_subsets():
    unet = toy_unet("tiny", D)
    total = sum(p.numel() for p in unet.parameters())
    sel = apply_trainable(unet, TrainableSpec(kind="full"))
    assert sel.num_params == total and len(_trained(unet)) == sel.num_tensors
    unet = toy_unet("tiny", D)
    sel = apply_trainable(unet, TrainableSpec(kind="modules", modules=["attn2"]))
    assert sel.names and all("attn2" in n for n in sel.names)
    assert set(_trained(unet)) == set(sel.names)


def test_empty_selection_is_a_user_error():
    with pytest.raises(UserError, match="selects no parameters"):
        apply_trainable(toy_unet("tiny", D), TrainableSpec(targets=["to_nothing"]))
    with pytest.raises(UserError, match="selects no parameters"):
        preview_trainable(toy_unet("tiny", D), {"kind": "modules", "modules": ["nope"]})


def test_math_attention_switches_and_restores():
    unet = toy_unet("tiny", D)
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    x = torch.randn(1, 1, 8, 8, dtype=D, requires_grad=True)
    e = torch.randn(1, 4, 8, dtype=D)
    with math_attention(unet):
        assert {type(v).__name__ for v in unet.attn_processors.values()} == {"AttnProcessor"}
        y = unet(x, torch.tensor([5]), encoder_hidden_states=e).sample
        (g,) = torch.autograd.grad((y**2).sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad((g**2).sum(), x)  # double backward works on this path
        assert torch.isfinite(gg).all()
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before
