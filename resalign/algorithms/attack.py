"""Downstream fine-tuning attacks: the real fine-tuning loop a threat model runs.

Implements the paper's threat model (an adversary fine-tunes the released model on benign,
optionally poisoned, image-caption pairs) with ``torch.optim`` and diffusers' schedules:

- ``full``: every UNet parameter is trained (the published attack: AdamW, lr 1e-5, constant,
  200 steps, effective batch 4 = batch 1 x 4 accumulation, fp16 mixed precision).
- ``lora``: a fresh peft LoRA adapter (rank, alpha, target modules) is attached to the UNet and
  only its tensors change; the base weights stay bit-identical.
- ``dreambooth``: full-UNet DreamBooth with prior preservation: every step adds
  ``prior_weight`` times the denoising loss on a class-prior batch of the same size.
- ``embedding``: textual inversion (Pham et al., ICLR 2024): only new token embeddings are
  trained, the whole model stays bit-identical; the captions say the new token where they
  said ``embedding.replaces`` (:mod:`resalign.algorithms.embedding_attack`; the UNet is frozen
  and the conditioning is computed with gradients to the new rows).

The loss is the model's training objective (:mod:`resalign.models.diffusion`: DDPM with ε-
or v-prediction per the model's noise scheduler and timesteps uniform over the training
schedule, or flow matching with the velocity target and the published timestep sampling),
conditioned by :meth:`ModelBundle.encode_condition` (SDXL's and SD3's pooled conditioning
included).
Poisoned data arrive already mixed (``resalign.data.pairs.mix_pairs``, the ``mix`` dataset's
implementation). All randomness (batch order, timesteps, noise)
comes from one CPU ``torch.Generator`` seeded by the attack seed, so results do not depend on
the device's RNG and a resumed run continues the exact stream. Every ``checkpoint_every``
steps the full state (trainable tensors, optimizer, schedule, generator, sampler positions,
grad scaler) is written atomically to ``state_dir``; a rerun resumes from it.

Staged attacks (a threat's ``stages``, e.g. benign data first, then a small harmful set):
``AttackConfig.stages`` holds each stage's number of steps and ``run_attack`` gets one data
set per stage. The same loop runs them: one optimizer and one LR schedule over all
``config.steps``, and the batch sampler switches to the next stage's data at the boundary.
A stage's sampler is created when the stage begins (its first epoch's permutation is drawn
from the attack generator at that point), so the first stage of a staged attack is, bitwise,
a plain attack on the first stage's data stopped at its end (tests/test_attack_stages.py);
the checkpoint holds every begun stage's sampler state.

Precision is mixed precision (fp32 master weights, autocast compute) where the device supports
it: fp16 and bf16 on CUDA (fp16 with a gradient scaler), bf16 on CPU. fp16 on CPU (and any
half precision on MPS) falls back to fp32 with a logged warning; ``AttackResult.precision``
records what actually ran.

Departure from the published code: that code fine-tunes through ``accelerate`` with its own
defaults; here every knob is explicit and recorded.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..atomic import atomic_open
from ..errors import UserError
from ..models.bundle import as_condition
from ..models.diffusion import as_objective, predict, squared_error
from ..models.saving import merged_unet_state_dict, save_merged_unet  # noqa: F401  (re-export)

log = logging.getLogger("resalign.attack")

ADAPTER_NAME = "attack"
STATE_FILE = "attack_state.pt"


class DenoiserBundle(Protocol):
    """What the attack needs from ``resalign.models.bundle.ModelBundle``."""

    unet: Any
    objective: Any

    def encode_condition(self, captions: list[str]) -> dict[str, Any]: ...

    def encode_images(self, images: torch.Tensor) -> torch.Tensor: ...


class Pairs(Protocol):
    """What the attack needs from ``resalign.data.types.PairSet``."""

    images: torch.Tensor  # [N, C, H, W] in [-1, 1]
    captions: list[str]


@dataclass(frozen=True)
class AttackConfig:
    """One fine-tuning attack: a validated ``threats.<name>`` block and one seed.

    No defaults here: they live in the schema (``resalign.spec.schema.threats.ThreatSpec``,
    the published attack); build with :meth:`from_threat`."""

    algorithm: str
    optimizer: str
    lr: float
    weight_decay: float
    schedule: str
    warmup_steps: int
    steps: int
    stages: tuple[int, ...]  # steps of each data stage, summing to ``steps``; (steps,) if plain
    batch_size: int
    grad_accumulation: int
    precision: str
    max_grad_norm: float | None
    seed: int
    lora_rank: int
    lora_alpha: float | None
    lora_targets: tuple[str, ...]
    prior_weight: float
    checkpoint_every: int
    # algorithm embedding (textual inversion); None for the other algorithms
    embedding_token: str | None
    embedding_vectors: int | None
    embedding_init: str | None
    embedding_replaces: str | None

    @classmethod
    def from_threat(
        cls, threat: Mapping[str, Any] | Any, seed: int, checkpoint_every: int | None = None
    ) -> AttackConfig:
        """From a ``threats.<name>`` block (a ``ThreatSpec`` or its dict, as in the node
        params; validated here, so unwritten fields take the schema's published defaults)
        and one seed. ``checkpoint_every`` (the engine's override) wins over the block's."""
        from ..spec.schema.threats import ThreatSpec

        t = threat if isinstance(threat, ThreatSpec) else ThreatSpec.model_validate(dict(threat))
        return cls(
            algorithm=t.algorithm,
            optimizer=t.optimizer,
            lr=float(t.lr),
            weight_decay=float(t.weight_decay),
            schedule=t.schedule,
            warmup_steps=t.warmup_steps,
            steps=t.steps,
            stages=tuple(s.steps for s in t.stages) if t.stages else (t.steps,),
            batch_size=t.batch_size,
            grad_accumulation=t.grad_accumulation,
            precision=t.precision,
            max_grad_norm=t.max_grad_norm,
            seed=int(seed),
            lora_rank=t.lora.rank,
            lora_alpha=t.lora.alpha,
            lora_targets=tuple(t.lora.targets),
            prior_weight=float(t.prior_weight),
            checkpoint_every=int(checkpoint_every or t.checkpoint_every),
            embedding_token=t.embedding.token if t.embedding else None,
            embedding_vectors=t.embedding.vectors if t.embedding else None,
            embedding_init=t.embedding.init if t.embedding else None,
            embedding_replaces=t.embedding.replaces if t.embedding else None,
        )


@dataclass
class AttackResult:
    """Summary of a finished attack."""

    steps: int  # the last step run (``stop_at``, else the attack's length)
    precision: str  # what actually ran (may differ from the request, see notes)
    losses: list[float]
    trainable: int  # number of trained scalars
    trainable_tensors: int
    resumed_from: int | None = None
    notes: list[str] = field(default_factory=list)
    # algorithm embedding: the learned token rows (resalign.models.embeddings.LearnedEmbedding)
    embedding: Any = None

    def as_dict(self) -> dict[str, Any]:
        out = {
            "steps": self.steps,
            "precision": self.precision,
            "final_loss": self.losses[-1] if self.losses else None,
            "trainable": self.trainable,
            "trainable_tensors": self.trainable_tensors,
            "resumed_from": self.resumed_from,
            "notes": list(self.notes),
        }
        if self.embedding is not None:
            out["embedding"] = self.embedding.describe()
        return out


# --------------------------------------------------------------------------- helpers


class _Sampler:
    """Epoch-wise shuffled indices from a CPU generator; its state is checkpointable.

    With ``state`` (a :meth:`state_dict`) it continues from there and draws nothing now."""

    def __init__(self, n: int, generator: torch.Generator, state: Mapping[str, Any] | None = None):
        if n <= 0:
            raise UserError("the fine-tuning data set is empty")
        self.n = n
        self.g = generator
        if state is not None:
            self.load_state_dict(state)
        else:
            self.perm = torch.randperm(n, generator=generator)
            self.pos = 0

    def take(self, k: int) -> torch.Tensor:
        out = []
        for _ in range(k):
            if self.pos == self.n:
                self.perm = torch.randperm(self.n, generator=self.g)
                self.pos = 0
            out.append(int(self.perm[self.pos]))
            self.pos += 1
        return torch.tensor(out, dtype=torch.long)

    def state_dict(self) -> dict[str, Any]:
        return {"perm": self.perm.clone(), "pos": self.pos}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.perm = state["perm"].clone()
        self.pos = int(state["pos"])


# Most distinct captions whose conditioning an attack encodes once up front.
CAPTION_TABLE_MAX = 256


class _CaptionTable:
    """The conditioning of every distinct caption of an attack's data, encoded in one batch;
    a batch's conditioning is the rows of its captions (``take_condition``). Bitwise equal to
    encoding each batch (tests/test_hot_path.py): the text encoder is frozen and treats the
    items of a batch independently."""

    def __init__(self, rows: dict[str, int], cond: Mapping[str, Any]):
        self.rows = rows
        self.cond = cond

    @classmethod
    def build(
        cls, bundle: DenoiserBundle, stages: Sequence[Pairs], prior: Pairs | None
    ) -> _CaptionTable | None:
        distinct: dict[str, int] = {}
        for pairs in [*stages, *([prior] if prior is not None else [])]:
            for c in pairs.captions:
                distinct.setdefault(c, len(distinct))
                if len(distinct) > CAPTION_TABLE_MAX:
                    return None
        with torch.no_grad():
            cond = bundle.encode_condition(list(distinct))
        return cls(distinct, cond)

    def condition(self, captions: Sequence[str]) -> dict[str, Any]:
        from ..models.bundle import take_condition

        device = self.cond["encoder_hidden_states"].device
        index = torch.tensor([self.rows[c] for c in captions], dtype=torch.long, device=device)
        return take_condition(self.cond, index)


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str | None]:
    """The precision that will actually run on ``device`` and, if it differs, why."""
    if precision == "fp32":
        return "fp32", None
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            return "fp32", "bf16 requested but this GPU does not support it; ran fp32"
        return precision, None
    if device.type == "cpu" and precision == "bf16":
        return "bf16", None
    return "fp32", f"{precision} autocast is not supported on {device.type}; ran fp32"


def _autocast(precision: str, device: torch.device) -> AbstractContextManager[Any]:
    if precision == "fp32":
        return nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _schedule_name(schedule: str, warmup: int) -> str:
    if schedule == "constant":
        return "constant_with_warmup" if warmup > 0 else "constant"
    return schedule


# torch.optim's multi-tensor implementation everywhere (torch picks it by default on CUDA
# only): on the CPU the per-tensor loop runs in C++ instead of Python, with the same
# arithmetic per tensor (bitwise equal updates, tests/test_hot_path.py). None: torch's choice.
FOREACH: bool | None = True


def make_optimizer(params: list[torch.nn.Parameter], config: AttackConfig) -> torch.optim.Optimizer:
    """The attack's optimizer (torch defaults for betas/eps/momentum)."""
    kw = {"lr": config.lr, "weight_decay": config.weight_decay, "foreach": FOREACH}
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, **kw)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, **kw)
    return torch.optim.AdamW(params, **kw)


def attach_fresh_lora(unet: torch.nn.Module, config: AttackConfig) -> list[str]:
    """Attach a new peft LoRA adapter to ``unet`` and freeze everything else.

    The adapter starts as a no-op (peft's default: Kaiming ``lora_A``, zero ``lora_B``), so
    step 0 of a LoRA attack is the attacked model itself. ``lora_A`` is drawn under the
    attack seed (peft draws it from the global RNG, whose state depended on whatever ran
    before in the worker: the same attack node gave different weights in a fresh and in a
    resumed run). Returns the adapted module names.
    """
    from peft import LoraConfig

    names = [n for n, _ in unet.named_modules()]
    matched = [n for n in names if any(n == t or n.endswith("." + t) for t in config.lora_targets)]
    if not matched:
        raise UserError(
            f"LoRA targets {list(config.lora_targets)} match no module of the UNet",
            hint="use module name suffixes such as to_q, to_k, to_v, to_out.0",
        )
    lora_config = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha if config.lora_alpha is not None else config.lora_rank,
        target_modules=list(config.lora_targets),
        init_lora_weights=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        unet.add_adapter(lora_config, adapter_name=ADAPTER_NAME)
    unet.set_adapter(ADAPTER_NAME)
    for name, p in unet.named_parameters():
        p.requires_grad_("lora_" in name and f".{ADAPTER_NAME}" in name)
    return matched


def denoise_loss(
    unet: torch.nn.Module,
    objective: Any,
    latents: torch.Tensor,
    cond: torch.Tensor | Mapping[str, Any],
    generator: torch.Generator,
) -> torch.Tensor:
    """The model's training loss (:mod:`resalign.models.diffusion`; ``objective`` an
    ``Objective`` or a training scheduler): squared error of the denoiser's prediction
    against the objective's target (ε or v for DDPM, the velocity for flow matching), batch
    mean. ``cond`` is the batch's conditioning (:meth:`ModelBundle.encode_condition`; text
    embeddings alone for models without added conditioning)."""
    obj = as_objective(objective)
    noise, t = obj.draw(latents, generator)
    noisy, target = obj.noise_and_target(latents, noise, t)
    pred = predict(unet, noisy, t, as_condition(cond))
    return squared_error(pred, target)


def _save_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_open(path) as f:
        torch.save(state, f)


# --------------------------------------------------------------------------- the loop

StepCallback = Callable[[int, Mapping[str, float]], None]
CheckpointHook = Callable[[int, torch.nn.Module], None]


def stage_ends(config: AttackConfig) -> list[int]:
    """The step at which each stage of ``config`` ends (its last step), in order."""
    ends, total = [], 0
    for n in config.stages:
        total += int(n)
        ends.append(total)
    return ends


def run_attack(
    bundle: DenoiserBundle,
    data: Pairs | Sequence[Pairs],
    config: AttackConfig,
    *,
    prior: Pairs | None = None,
    eval_at: Sequence[int] = (),
    on_eval: CheckpointHook | None = None,
    callback: StepCallback | None = None,
    state_dir: Path | None = None,
    device: torch.device | str | None = None,
    checkpoints: Any = None,
    stop_at: int | None = None,
) -> AttackResult:
    """Fine-tune ``bundle.unet`` in place on ``data`` as the attack ``config`` says.

    ``data``: one pair set, or one per stage of ``config.stages`` (in order); stage ``i``
    runs its steps on ``data[i]`` with the optimizer, schedule and generator of the whole
    attack (module notes). ``stop_at``, ``eval_at`` and checkpoints may fall in any stage.

    ``on_eval(step, unet)`` is called after each step in ``eval_at`` (typically to save a
    merged UNet); ``callback(step, {"loss", "lr"})`` after every optimizer step. With
    ``state_dir`` the loop checkpoints every ``config.checkpoint_every`` steps and resumes
    from the last checkpoint there; ``checkpoints`` (an object with ``save_checkpoint(state,
    step)`` and ``load_checkpoint() -> (state, step) | None``, e.g. a step's context) does the
    same through it instead of files of its own. ``on_eval`` of steps before the resume point
    is not repeated: the caller must keep what it wrote then under durable storage too.
    ``stop_at`` ends the loop after that step (a checkpoint is written there) with the
    schedule of the whole ``config.steps``: continuing from that checkpoint later is the
    uninterrupted attack, bitwise (an attack segment, :mod:`resalign.steps.attack`).
    """
    stop = config.steps if stop_at is None else int(stop_at)
    if not 0 < stop <= config.steps:
        raise ValueError(f"stop_at must be in 1..{config.steps}, not {stop_at}")
    # one data set (a plain attack) or a sequence of them, one per stage
    stages: list[Pairs] = [data] if hasattr(data, "captions") else list(data)  # type: ignore[arg-type]
    ends = stage_ends(config)
    if len(stages) != len(ends) or ends[-1] != config.steps:
        raise ValueError(
            f"the attack has stages of {list(config.stages)} steps (total {config.steps}), "
            f"but {len(stages)} data set(s) were given or the stages do not sum to the total"
        )
    for i, pairs in enumerate(stages):
        if len(pairs.captions) == 0:
            where = f" of stage {i + 1}" if len(stages) > 1 else ""
            raise UserError(f"the fine-tuning data set{where} is empty")
    unet = bundle.unet
    dev = torch.device(device) if device is not None else next(unet.parameters()).device
    precision, note = resolve_precision(config.precision, dev)
    notes = []
    if note:
        log.warning(note)
        notes.append(note)
    if config.algorithm == "dreambooth" and prior is None:
        raise UserError(
            "a dreambooth attack needs a class-prior data set for prior preservation",
            hint="set the threat's 'prior' to a dataset name",
        )

    for module in (getattr(bundle, "text_encoder", None), getattr(bundle, "vae", None)):
        if module is not None:
            module.requires_grad_(False)
    emb = None  # algorithm embedding: the new token rows (resalign.algorithms.embedding_attack)
    if config.algorithm == "lora":
        attach_fresh_lora(unet, config)
    elif config.algorithm == "embedding":
        from .embedding_attack import attach_embeddings

        unet.requires_grad_(False)
        emb = attach_embeddings(
            bundle,
            token=str(config.embedding_token),
            vectors=int(config.embedding_vectors or 1),
            init=str(config.embedding_init),
            replaces=str(config.embedding_replaces),
            captions=[c for pairs in stages for c in pairs.captions],
        )
    else:
        for p in unet.parameters():
            p.requires_grad_(True)
    if emb is not None:
        named = emb.named_parameters()
    else:
        named = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    params = [p for _, p in named]

    from diffusers.optimization import get_scheduler

    optimizer = make_optimizer(params, config)
    lr_sched = get_scheduler(
        _schedule_name(config.schedule, config.warmup_steps),
        optimizer,
        num_warmup_steps=config.warmup_steps,
        num_training_steps=config.steps,
    )
    scaler = torch.amp.GradScaler(dev.type, enabled=(precision == "fp16"))
    gen = torch.Generator().manual_seed(config.seed)
    # one sampler per stage, created when its stage begins (module notes); stage 1's now
    samplers: list[_Sampler | None] = [_Sampler(len(stages[0].captions), gen)]
    samplers += [None] * (len(stages) - 1)
    prior_sampler = _Sampler(len(prior.captions), gen) if prior is not None else None

    start = 0
    losses: list[float] = []
    resumed_from = None
    state_path = Path(state_dir) / STATE_FILE if state_dir is not None else None
    st = None
    if checkpoints is not None:
        loaded = checkpoints.load_checkpoint()
        st = loaded[0] if loaded is not None else None
    elif state_path is not None and state_path.exists():
        st = torch.load(state_path, weights_only=True, map_location="cpu")
    if st is not None:
        with torch.no_grad():
            for n, p in named:
                p.copy_(st["params"][n])
        optimizer.load_state_dict(st["optimizer"])
        lr_sched.load_state_dict(st["lr_scheduler"])
        scaler.load_state_dict(st["scaler"])
        gen.set_state(st["generator"])
        samplers[0].load_state_dict(st["sampler"])  # type: ignore[union-attr]
        # later stages begun before the checkpoint (absent in checkpoints of plain attacks)
        for i, ss in enumerate(st.get("stage_samplers") or (), start=1):
            if ss is not None:
                samplers[i] = _Sampler(len(stages[i].captions), gen, state=ss)
        if prior_sampler is not None:
            prior_sampler.load_state_dict(st["prior_sampler"])
        start = resumed_from = int(st["step"])
        losses = [float(x) for x in st["losses"]]

    # The captions' conditioning, encoded once (the frozen text encoder gives every
    # occurrence of a caption the same rows): the demo's 10 captions were re-encoded for every
    # micro-batch, 10 % of an attack's CPU time. Above CAPTION_TABLE_MAX distinct captions
    # (one per image, on real data sets) each batch is encoded as before.
    table = _CaptionTable.build(bundle, stages, prior) if emb is None else None

    def batch(pairs: Pairs, smp: _Sampler) -> tuple[torch.Tensor, dict[str, Any]]:
        idx = smp.take(config.batch_size)
        captions = [pairs.captions[i] for i in idx.tolist()]
        with torch.no_grad():
            images = pairs.images[idx].to(dev)
            latents = bundle.encode_images(images).float()
            if emb is None:
                cond = (
                    table.condition(captions)
                    if table is not None
                    else bundle.encode_condition(captions)
                )
        if emb is not None:  # the rewritten captions, with gradients to the new rows
            cond = emb.condition(captions)
        return latents, cond

    unet.train()
    eval_steps = set(eval_at)
    for step in range(start, stop):
        stage = bisect.bisect_right(ends, step)  # the stage this step (0-based) belongs to
        sampler = samplers[stage]
        if sampler is None:  # the stage begins: its data's first permutation is drawn now
            sampler = samplers[stage] = _Sampler(len(stages[stage].captions), gen)
        total = 0.0
        for _ in range(config.grad_accumulation):
            latents, cond = batch(stages[stage], sampler)
            if prior_sampler is not None and prior is not None:
                p_lat, p_cond = batch(prior, prior_sampler)
            with _autocast(precision, dev):
                loss = denoise_loss(unet, bundle.objective, latents, cond, gen)
                if prior_sampler is not None:
                    loss = loss + config.prior_weight * denoise_loss(
                        unet, bundle.objective, p_lat, p_cond, gen
                    )
            scaler.scale(loss / config.grad_accumulation).backward()
            total += float(loss.detach()) / config.grad_accumulation
        if config.max_grad_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        lr_now = optimizer.param_groups[0]["lr"]
        scaler.step(optimizer)
        scaler.update()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
        done = step + 1
        if callback is not None:
            callback(done, {"loss": total, "lr": float(lr_now)})
        if done in eval_steps and on_eval is not None:
            unet.eval()
            on_eval(done, unet)
            unet.train()
        durable = checkpoints is not None or state_path is not None
        if durable and (done % config.checkpoint_every == 0 or done in (stop, config.steps)):
            state = {
                "step": done,
                "params": {n: p.detach().cpu().clone() for n, p in named},
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_sched.state_dict(),
                "scaler": scaler.state_dict(),
                "generator": gen.get_state(),
                "sampler": samplers[0].state_dict(),  # type: ignore[union-attr]
                "prior_sampler": prior_sampler.state_dict() if prior_sampler else None,
                "losses": torch.tensor(losses, dtype=torch.float64),
            }
            if len(samplers) > 1:  # a plain attack's checkpoint keeps its former layout
                state["stage_samplers"] = [s.state_dict() if s else None for s in samplers[1:]]
            if checkpoints is not None:
                checkpoints.save_checkpoint(state, done)
            else:
                _save_state(state_path, state)  # type: ignore[arg-type]
    unet.eval()
    return AttackResult(
        steps=stop,
        precision=precision,
        losses=losses,
        trainable=sum(p.numel() for p in params),
        trainable_tensors=len(params),
        resumed_from=resumed_from,
        notes=notes,
        embedding=emb.merge() if emb is not None else None,
    )
