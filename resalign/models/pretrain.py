"""Pretraining a tiny model from scratch: the built-in demo's "original model".

Standard text-conditioned training of the denoiser with the model's objective (the loss of
:mod:`resalign.models.diffusion`: DDPM ε- or v-prediction MSE at uniformly drawn timesteps,
or flow matching's velocity MSE at the published timestep sampling for an SD3-shaped model;
the conditioning of :meth:`ModelBundle.encode_condition`, so SDXL- and SD3-shaped models
train too) on
image–caption pairs, with the text encoder and VAE frozen as in Stable Diffusion (here: a random CLIP text encoder and the identity pixel VAE). Captions are replaced by the
empty prompt with probability ``uncond_prob`` (SD's 10 %) so classifier-free guidance works at
sampling time. AdamW with a cosine decay to 10 % of ``lr``. With ``train_text_encoder`` the
(randomly initialised) text encoder is trained jointly — from scratch there is no pretrained
CLIP to keep frozen, and a random one separates captions that differ in a few characters
poorly; the trained encoder is then frozen for everything downstream, as SD's CLIP is.

Resumable: every ``checkpoint_every`` steps the UNet, optimizer, schedule and the sampling
generator are saved to ``state_dir``; a rerun continues from there and reaches exactly the
weights an uninterrupted run reaches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_open
from .bundle import take_condition
from .diffusion import predict, squared_error

CHECKPOINT = "pretrain.pt"
# torch.optim foreach for the AdamW of pretraining (None: torch's choice, the Python loop on CPU)
FOREACH: bool | None = True


def _encoder_key(i: int) -> str:
    # "text_encoder" as before for the first encoder: existing checkpoints stay readable.
    return "text_encoder" if i == 0 else f"text_encoder_{i + 1}"


def _lr_lambda(steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))

    return f


def pretrain_unet(
    bundle: Any,
    pairs: Any,
    *,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    uncond_prob: float = 0.1,
    train_text_encoder: bool = False,
    state_dir: Path | None = None,
    checkpoint_every: int = 200,
    on_step: Callable[[int, float], None] | None = None,
    checkpoints: Any = None,
) -> dict[str, float]:
    """Train ``bundle.unet`` in place for ``steps`` steps on ``pairs`` (images in [-1, 1],
    captions). ``on_step(step, loss)`` is called after every step (1-based). Returns
    ``{"final_loss": mean loss of the last 50 steps, "steps": steps}``."""
    device = bundle.device
    unet = bundle.unet
    latents = bundle.encode_images(pairs.images).float()
    uniq = sorted(set(pairs.captions))
    texts = [*uniq, ""]  # last row: the empty prompt
    cond_table = bundle.encode_condition(texts)
    text_ids = bundle.tokenize(texts)
    encoders = [e for e in bundle.text_encoders if e is not None]
    index = {c: i for i, c in enumerate(uniq)}
    cap_idx = torch.tensor([index[c] for c in pairs.captions], device=device)
    empty = len(uniq)
    objective = bundle.objective

    unet.train()
    unet.requires_grad_(True)
    params = list(unet.parameters())
    if train_text_encoder:
        for encoder in encoders:
            encoder.train()
            encoder.requires_grad_(True)
            params += list(encoder.parameters())
    # multi-tensor AdamW: same updates bitwise, the per-tensor loop in C++ (on the CPU torch
    # picks the Python loop: 16 % of a pretraining step, docs/benchmarks.md)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2, foreach=FOREACH)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    start = 0
    ckpt = Path(state_dir) / CHECKPOINT if state_dir is not None else None
    state = None
    if checkpoints is not None:  # e.g. a step's context: save_checkpoint / load_checkpoint
        loaded = checkpoints.load_checkpoint()
        state = loaded[0] if loaded is not None else None
    elif ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    if state is not None:
        unet.load_state_dict(state["unet"])
        if train_text_encoder:
            for i, encoder in enumerate(encoders):
                encoder.load_state_dict(state[_encoder_key(i)])
        opt.load_state_dict(state["optimizer"])
        lr_sched.load_state_dict(state["lr_schedule"])
        gen.set_state(state["generator"])
        start = int(state["step"])
    recent: list[float] = []
    n = latents.shape[0]
    for step in range(start + 1, steps + 1):
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        t = objective.draw_timesteps(batch_size, gen)
        noise = torch.randn((batch_size, *latents.shape[1:]), generator=gen)
        drop = torch.rand(batch_size, generator=gen) < uncond_prob
        idx, t, noise, drop = idx.to(device), t.to(device), noise.to(device), drop.to(device)
        # The draws above keep their order (index, t, noise, dropout): the demo's
        # pretrained model is a cached result of this stream.
        noisy, target = objective.noise_and_target(latents[idx], noise, t)
        rows = torch.where(drop, torch.full_like(cap_idx[idx], empty), cap_idx[idx])
        if train_text_encoder:
            # Encode only the distinct rows of the batch, then gather.
            used, inverse = torch.unique(rows, return_inverse=True)
            cond = bundle.condition_from_tokens([ids[used] for ids in text_ids])
            cond = take_condition(cond, inverse)
        else:
            cond = take_condition(cond_table, rows)
        pred = predict(unet, noisy, t, cond)
        loss = squared_error(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
        value = float(loss.detach())
        recent = (recent + [value])[-50:]
        if on_step is not None:
            on_step(step, value)
        durable = checkpoints is not None or ckpt is not None
        if durable and (step % checkpoint_every == 0) and step < steps:
            state = {
                "unet": unet.state_dict(),
                **(
                    {_encoder_key(i): e.state_dict() for i, e in enumerate(encoders)}
                    if train_text_encoder
                    else {}
                ),
                "optimizer": opt.state_dict(),
                "lr_schedule": lr_sched.state_dict(),
                "generator": gen.get_state(),
                "step": step,
            }
            if checkpoints is not None:
                checkpoints.save_checkpoint(state, step)
            else:
                with atomic_open(ckpt) as f:  # type: ignore[arg-type]
                    torch.save(state, f)
    unet.eval()
    unet.requires_grad_(False)
    for encoder in encoders:
        encoder.eval()
        encoder.requires_grad_(False)
    return {"final_loss": sum(recent) / max(1, len(recent)), "steps": float(steps)}
