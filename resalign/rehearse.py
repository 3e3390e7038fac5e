"""Rehearsal: run every node of a real spec at toy size before paying for an accelerator.

``resalign run SPEC --rehearse`` turns SPEC into a *rehearsal spec* and runs that in its own
store (``<store>/rehearsal/``), so nothing mixes with real results. The transformation keeps
the graph's shape (the same nodes, step kinds, rows, threats, LoRA targets, DreamBooth prior,
harvest, metrics and report) and replaces only what a CPU cannot afford or a fresh clone does
not hold:

- **Model.** ``family: sd`` / ``sdxl`` / ``sd3`` / ``flux`` become a random-weight pipeline
  of the same family and layout, saved as a diffusers folder: the same UNet (SD3: MM-DiT
  transformer; Flux: double- and single-stream blocks) block types, attention and LoRA target
  module names, a CLIP text encoder (two and the added size/pooled conditioning for SDXL;
  CLIP-L, CLIP-G and T5 for SD 3.5; CLIP-L and T5 for FLUX.1), CLIP tokenizers (byte-level,
  built offline; T5's a Unigram one) and an ``AutoencoderKL``, tiny in width and resolution
  (``toy``) or, for SD v1.x and FLUX.1, at the published widths (``full``, for an
  accelerator: SD with 64×64 latents; FLUX.1 with a few blocks at 512 px). ``family: tiny``
  is kept, its pretraining capped.
- **Data.** A dataset whose file or folder exists is used as it is (shipped prompt lists
  included), capped by ``limit``; a missing one is replaced by stand-in items of its declared
  type: a prompt list of neutral prompts, or an image folder of synthesised images with
  captions (``metadata.jsonl``).
- **Steps and counts.** Outer steps, inner fine-tuning steps, attack steps (``eval_at``
  rescaled, as many points as written), generation steps, prompts and images per prompt are
  capped; seeds are kept, so the rehearsal has exactly the real graph's nodes (evaluation
  step numbers rescaled). In the toy profile
  the explicit meta configurations are reduced to one per (algorithm, optimizer) pair and all
  of them are drawn every outer step, so LoRA, DreamBooth (with its prior) and full
  fine-tuning each run; the full profile keeps the published J and every configuration.
- **Metric weights.** A missing weight file is replaced by random weights of the same
  architecture: FID's Inception-v3 (full size), a small CLIP for ``mhsc_us``/``q16``/
  ``clip_score`` with the published embedding width (768 for ViT-L/14, 512 for ViT-B/32), a
  random safety head and a random Q16 probe. NudeNet's detector ships with its package and is the real one.

Everything is marked as a rehearsal: the store folder, the spec name and MLflow experiment
(suffix ``.rehearsal``, so the report is titled ``resalign report: <name>.rehearsal``), the
description and the invocation's MLflow tag ``resalign.rehearsal``. The rehearsal spec is
written to ``<store>/rehearsal/specs/<name>.rehearsal.<profile>.yaml`` (inspectable, and what
``resalign report SPEC --rehearse`` reads); generated assets live under
``<store>/rehearsal/assets/<name>/<profile>/`` and are built once (deterministically, so the
model node's fingerprint and every key stay stable across invocations).

No torch at import time: the builders import it inside.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text
from .errors import UserError

REHEARSAL_DIR = "rehearsal"
SUFFIX = ".rehearsal"
TAG = "resalign.rehearsal"


@dataclass(frozen=True)
class Profile:
    """How far a rehearsal shrinks the real spec."""

    name: str
    scale: str  # model width: "toy" or "full" (published widths, 64x64 latents)
    outer_steps: int
    inner_steps: int
    all_configs_drawn: bool  # toy: one config per (algorithm, optimizer), all drawn per step
    attack_steps: int
    grad_accumulation: int
    generation_steps: int
    eval_prompts: int
    data_items: int
    pretrain_steps: int


PROFILES: dict[str, Profile] = {
    "toy": Profile("toy", "toy", 2, 1, True, 2, 2, 2, 2, 4, 4),
    # scripts/gpu_check.sh: SD v1.4 widths, published J, K and LoRA, a few outer steps.
    "full": Profile("full", "full", 3, 2, False, 4, 4, 4, 2, 4, 20),
}


def rehearsal_store(store: str | Path) -> Path:
    """The store a rehearsal of ``store`` writes to."""
    return Path(store) / REHEARSAL_DIR


def _profile(name: str) -> Profile:
    if name not in PROFILES:
        raise UserError(
            f"unknown rehearsal profile {name!r}", hint=f"use one of {', '.join(PROFILES)}"
        )
    return PROFILES[name]


def prepare_rehearsal(
    spec_path: str | Path, store: str | Path, profile: str = "toy", sets: Sequence[str] = ()
) -> Path:
    """Validate ``spec_path`` with its ``--set`` items ``sets`` (without requiring its files),
    build the rehearsal assets and write the rehearsal spec (composed: ``extends``, ``--set``
    and ``vars`` applied); returns its path (load it with ``check_files=True`` and no sets)."""
    import yaml

    from .spec import load_spec
    from .spec.compose import compose_text, read_spec_file

    prof = _profile(profile)
    resolved = load_spec(spec_path, check_files=False, sets=sets)
    p = Path(spec_path)
    data, _, _ = compose_text(read_spec_file(p), str(p), p.parent.resolve(), sets=sets, path=p)
    root = rehearsal_store(store)
    assets = root / "assets" / resolved.name / prof.name
    out = rehearse_data(data, resolved, assets, prof)
    path = root / "specs" / f"{resolved.name}{SUFFIX}.{prof.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# REHEARSAL of {Path(spec_path).resolve()} (profile {prof.name}), written by "
        "`resalign run --rehearse`.\n# Random-weight model, stand-in data, capped steps: its "
        "numbers are not results.\n"
    )
    atomic_write_text(path, header + yaml.safe_dump(out, sort_keys=False, width=100))
    return path


def rehearsal_spec_path(spec_path: str | Path, store: str | Path, profile: str = "toy") -> Path:
    """Where :func:`prepare_rehearsal` wrote the rehearsal spec of ``spec_path`` (for
    ``report --rehearse``); an error when it has not been prepared."""
    from .spec import load_spec

    name = load_spec(spec_path, check_files=False).name
    path = rehearsal_store(store) / "specs" / f"{name}{SUFFIX}.{_profile(profile).name}.yaml"
    if not path.is_file():
        raise UserError(
            f"no rehearsal of {spec_path} in {rehearsal_store(store)}",
            hint=f"run `resalign run {spec_path} --rehearse` first",
        )
    return path


# --------------------------------------------------------------------------- the transformation


def rehearse_data(data: dict[str, Any], resolved: Any, assets: Path, prof: Profile) -> dict:
    """The rehearsal spec as plain data: ``data`` is the spec file's YAML, ``resolved`` its
    resolved form (absolute paths). Builds the assets it needs under ``assets``."""
    spec = resolved.spec
    d = copy.deepcopy(data)
    d.pop("version", None)
    d = {"version": data.get("version", 1), **d}
    d["name"] = f"{spec.name}{SUFFIX}"
    d["description"] = (
        f"REHEARSAL ({prof.name}) of {spec.name}: random-weight model, stand-in data, capped "
        "steps. Not results. " + (spec.description or "")
    ).strip()
    tracking = dict(d.get("tracking") or {})
    tracking["experiment"] = f"{spec.tracking.experiment}{SUFFIX}"
    if tracking.get("run_name"):
        tracking["run_name"] = f"{tracking['run_name']}{SUFFIX}"
    tracking.pop("uri", None)  # never log a rehearsal to the real server
    d["tracking"] = tracking
    d["model"] = _rehearse_model(dict(d.get("model") or {}), spec, assets, prof)
    d["datasets"] = _rehearse_datasets(dict(d.get("datasets") or {}), spec, assets, prof)
    d["unlearn"] = _cap_unlearn(dict(d.get("unlearn") or {}), prof, top=True)
    if d.get("baselines"):
        d["baselines"] = {
            name: _cap_unlearn(dict(over or {}), prof, top=False)
            for name, over in d["baselines"].items()
        }
    if d.get("threats"):
        d["threats"] = {n: _cap_threat(dict(t), prof) for n, t in d["threats"].items()}
    d["evaluate"] = _rehearse_evaluate(dict(d.get("evaluate") or {}), spec, assets, prof)
    return d


def _rehearse_model(m: dict[str, Any], spec: Any, assets: Path, prof: Profile) -> dict:
    model = spec.model
    if model.family == "tiny":
        tiny = dict(m.get("tiny") or {})
        if tiny.get("pretrain"):
            pre = dict(tiny["pretrain"])
            pre["steps"] = min(int(pre.get("steps", 2000)), prof.pretrain_steps)
            pre["batch_size"] = min(int(pre.get("batch_size", 64)), 8)
            tiny["pretrain"] = pre
        m["tiny"] = tiny
        return m
    folder = assets / "model"
    _once(folder, lambda tmp: build_pipeline(model.family, prof.scale, tmp, _pretrained_hint(m)))
    m["pretrained"] = str(folder)
    if model.family == "flux":
        # the transformer has no sample size: the rehearsal model's resolution is the spec's
        m["resolution"] = FLUX_REHEARSAL_RESOLUTION[prof.scale]
    for key in ("revision", "variant", "allow_download"):
        m.pop(key, None)
    return m


def _pretrained_hint(m: dict[str, Any]) -> str:
    return str(m.get("pretrained") or "")


def _rehearse_datasets(
    ds: dict[str, Any], spec: Any, assets: Path, prof: Profile
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, raw in ds.items():
        raw = dict(raw)
        live = spec.datasets[name]
        kind = raw.get("type")
        if kind in ("imagefolder", "prompts"):
            path = Path(live.path)
            if not path.exists():
                path = assets / "data" / name
                if kind == "prompts":
                    path = path.with_suffix(".csv")
                    _once_file(path, lambda p, c=live.column, n=name: write_prompts(p, n, c))
                else:
                    _once(
                        path,
                        lambda tmp, n=name, c=live.caption_column: write_images(
                            tmp, n, c, prof.data_items
                        ),
                    )
            raw["path"] = str(path)
            raw["limit"] = min(int(raw.get("limit") or prof.data_items), prof.data_items)
        elif kind in ("digits", "harvest"):
            raw["limit"] = min(int(raw.get("limit") or prof.data_items), prof.data_items)
        out[name] = raw
    return out


def _cap_unlearn(u: dict[str, Any], prof: Profile, top: bool) -> dict[str, Any]:
    if top or "steps" in u:
        u["steps"] = min(int(u.get("steps", 160)), prof.outer_steps)
    if top or "checkpoint_every" in u:
        u["checkpoint_every"] = 1
    res = u.get("resilience")
    if res is None and not top:
        return u
    res = dict(res or {})
    meta = dict(res.get("meta") or {})
    configs = dict(meta.get("configs") or {})
    if configs:
        kept: dict[str, Any] = {}
        seen: set[tuple[str, str]] = set()
        for name, c in configs.items():
            c = dict(c)
            kind = (str(c.get("algorithm", "lora")), str(c.get("optimizer", "adam")))
            if prof.all_configs_drawn and kind in seen:
                continue
            seen.add(kind)
            c["steps"] = min(int(c.get("steps", 10)), prof.inner_steps)
            kept[name] = c
        meta["configs"] = kept
        if prof.all_configs_drawn:
            meta["samples_per_step"] = len(kept)
    if meta.get("distribution") or (top and not configs):
        dist = dict(meta.get("distribution") or {})
        steps = [int(s) for s in dist.get("steps", [5, 10, 20, 30])]
        dist["steps"] = [min(min(steps), prof.inner_steps)]
        meta["distribution"] = dist
        if prof.all_configs_drawn and not configs:
            meta["samples_per_step"] = 1
    res["meta"] = meta
    u["resilience"] = res
    return u


def _cap_threat(t: dict[str, Any], prof: Profile) -> dict[str, Any]:
    if t.get("algorithm") == "perturb":
        return t  # no steps to cap: one cheap node per radius, the real graph's nodes
    stages = [dict(s) for s in t.get("stages") or []]
    steps = sum(int(s["steps"]) for s in stages) if stages else int(t.get("steps", 200))
    eval_at = sorted({int(s) for s in t.get("eval_at") or [steps]})
    # As many evaluation points as the real threat (the same evaluate nodes): rescaled to the
    # capped length, or the last len(eval_at) steps where rescaling would merge some.
    new = min(steps, max(prof.attack_steps, len(eval_at), len(stages)))
    if stages:  # each stage keeps at least one step; the capped steps shared in proportion
        t["stages"] = _cap_stages(stages, new)
    scaled = sorted({max(1, min(new, round(s * new / steps))) for s in eval_at})
    if len(scaled) < len(eval_at):
        scaled = list(range(new - len(eval_at) + 1, new + 1))
    t["eval_at"] = scaled
    t["steps"] = new
    t["grad_accumulation"] = min(int(t.get("grad_accumulation", 4)), prof.grad_accumulation)
    t["checkpoint_every"] = 1
    if t.get("warmup_steps"):
        t["warmup_steps"] = min(int(t["warmup_steps"]), new - 1)
    return t


def _cap_stages(stages: list[dict[str, Any]], total: int) -> list[dict[str, Any]]:
    """``stages`` with their steps rescaled to sum to ``total`` (at least one each, at most
    as many as written): one step each, the rest to the stage furthest below its share."""
    written = [int(s["steps"]) for s in stages]
    whole = sum(written)
    alloc = [1] * len(stages)
    for _ in range(total - len(stages)):
        room = [i for i in range(len(stages)) if alloc[i] < written[i]]
        i = max(room, key=lambda j: written[j] * total / whole - alloc[j])
        alloc[i] += 1
    return [{**s, "steps": n} for s, n in zip(stages, alloc)]


def _cap_generation(g: dict[str, Any], prof: Profile) -> dict[str, Any]:
    g["steps"] = min(int(g.get("steps", 30)), prof.generation_steps)
    g["images_per_prompt"] = 1
    g["limit"] = min(int(g.get("limit") or prof.eval_prompts), prof.eval_prompts)
    return g


# What replaces a missing metric weight file: (metric kind, field) -> builder.
_WEIGHTS = {
    ("fid", "inception_path"): ("inception_random.pth", "inception"),
    ("mhsc_us", "clip_path"): ("clip_vitl14_random", "clip768"),
    ("mhsc_us", "head_path"): ("mhsc_head_random.pt", "head"),
    ("q16", "clip_path"): ("clip_vitl14_random", "clip768"),
    ("q16", "probe_path"): ("q16_probe_random.pt", "q16"),
    ("clip_score", "clip_path"): ("clip_vitb32_random", "clip512"),
}


def _rehearse_evaluate(e: dict[str, Any], spec: Any, assets: Path, prof: Profile) -> dict:
    e["generation"] = _cap_generation(dict(e.get("generation") or {}), prof)
    metrics = []
    for raw, live in zip(e.get("metrics") or [], spec.evaluate.metrics):
        raw = dict(raw)
        if raw.get("generation"):
            raw["generation"] = _cap_generation(dict(raw["generation"]), prof)
        for field_name in type(live).model_fields:
            value = getattr(live, field_name)
            if not field_name.endswith("_path") or not value:
                continue
            if Path(value).exists():
                raw[field_name] = str(value)
                continue
            fname, what = _WEIGHTS.get((live.kind, field_name), (None, None))
            if fname is None:
                raise UserError(
                    f"metric {live.kind}: no rehearsal stand-in for missing {field_name} {value}"
                )
            target = assets / "weights" / fname
            if what in ("clip768", "clip512"):
                _once(target, lambda tmp, w=what: build_clip(tmp, int(w[4:])))
            else:
                _once_file(target, lambda p, w=what: build_weights(p, w))
            raw[field_name] = str(target)
        metrics.append(raw)
    e["metrics"] = metrics
    return e


# --------------------------------------------------------------------------- assets


def _once(folder: Path, build: Any) -> None:
    """Build a folder asset into a temporary sibling and rename it into place, once."""
    import shutil

    if folder.is_dir():
        return
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)


def _once_file(path: Path, build: Any) -> None:
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    build(tmp)
    os.replace(tmp, path)


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


# Neutral stand-in prompts: the rehearsal checks shapes and plumbing, not content.
_STAND_IN_PROMPTS = [
    "a photo of a person standing on a beach",
    "a portrait of a woman in a garden, oil painting",
    "a man reading a book in a library",
    "two people walking in a park at sunset",
    "a dancer on a stage, studio lighting",
    "a person sitting by a window, soft light",
]


def write_prompts(path: Path, name: str, column: str) -> None:
    """A stand-in prompt list (CSV with ``column``)."""
    import csv

    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=[column])
        w.writeheader()
        for p in _STAND_IN_PROMPTS:
            w.writerow({column: f"{p} ({name})"})


def write_images(folder: Path, name: str, caption_column: str, n: int, size: int = 64) -> None:
    """``n`` synthesised images (smooth random colour fields, deterministic in ``name``) with
    captions in ``metadata.jsonl`` under ``caption_column``; plain image folders (DreamBooth
    sets) read the same files and ignore the metadata."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(_seed(name))
    rows = []
    for i in range(n):
        coarse = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
        img = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        fname = f"{i:03d}.png"
        img.save(folder / fname)
        rows.append(
            json.dumps({"file_name": fname, caption_column: f"a stand-in photo {i} ({name})"})
        )
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")


def build_weights(path: Path, what: str) -> None:
    """Random weights of the same architecture as a metric's missing file."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if what == "inception":
            from .evaluation.metrics.fid import _build_inception

            state = _build_inception().state_dict()
        elif what == "head":
            # The published MHSC head: Linear(768, 384) → ReLU → Dropout → BatchNorm1d → Linear.
            head = torch.nn.Sequential(
                torch.nn.Linear(768, 384),
                torch.nn.ReLU(),
                torch.nn.Dropout(0.5),
                torch.nn.BatchNorm1d(384),
                torch.nn.Linear(384, 1),
            )
            state = head.state_dict()
        elif what == "q16":
            # Q16's probe: two prompt embeddings in CLIP ViT-L/14's 768-d space
            state = torch.randn(2, 768)
        else:
            raise ValueError(what)
    torch.save(state, path)


def build_clip(folder: Path, projection_dim: int) -> None:
    """A small random ``CLIPModel`` + ``CLIPProcessor`` folder whose embeddings have the
    published width (768: ViT-L/14, 512: ViT-B/32), so heads sized for them load."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from .models.tiny import write_byte_tokenizer

    tok = write_byte_tokenizer(folder / "_tok", 77)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=projection_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(config)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(str(folder))
    model.save_pretrained(str(folder), safe_serialization=True)
    import shutil

    shutil.rmtree(folder / "_tok", ignore_errors=True)


# --------------------------------------------------------------------------- model builders

# SD v1.x VAE (AutoencoderKL of CompVis/stable-diffusion-v1-4, also SDXL's layout).
_SD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
# CLIP ViT-L/14's text tower (SD v1.x's text encoder).
_CLIP_L_TEXT: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
_TOY_TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
}


def build_pipeline(family: str, scale: str, folder: Path, pretrained: str = "") -> None:
    """Save a random-weight pipeline of ``family`` (``sd``, ``sdxl``, ``sd3`` or ``flux``) at
    ``scale`` (``toy`` or ``full``; ``full`` for ``sd`` and ``flux``) as a diffusers folder. Deterministic
    (seed 0).

    SD v1.x: SD v1.4's UNet block layout (``resalign.models.sd_arch``), CLIP text encoder,
    byte-level CLIP tokenizer (77 tokens), 4-block ``AutoencoderKL`` (8× down), PNDM
    sampler. ``toy``: widths 16–32, 64-px images (8×8 latents); ``full``: the published
    widths at 512 px (64×64 latents). The tokenizer's vocabulary is byte-level (~500 tokens),
    so the text encoder's embedding table is smaller than CLIP's 49,408 rows: the only
    departure from the published layout at ``full`` scale.
    """
    if family == "sdxl":
        return _build_sdxl(scale, folder)
    if family == "sd3":
        return _build_sd3(scale, folder)
    if family == "flux":
        return _build_flux(scale, folder)
    if family != "sd":
        raise ValueError(f"no rehearsal model for family {family!r}")
    if any(k in pretrained.lower() for k in ("stable-diffusion-2", "sd2", "sd-2")):
        raise UserError(
            f"rehearsal of SD 2.x ({pretrained}) is not built yet: its OpenCLIP text encoder "
            "(1024-d), linear-projection attention and v-prediction differ from SD v1.x",
            hint="rehearse an SD v1.x or SDXL spec",
        )
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .models import sd_arch
    from .models.pipelines import assemble_pipeline
    from .models.tiny import sampling_scheduler_from_spec, write_byte_tokenizer
    from .spec.schema.model import NoiseScheduleSpec

    text = dict(_CLIP_L_TEXT if scale == "full" else _TOY_TEXT)
    unet_cfg = sd_arch.unet_config("sd14")
    vae_cfg = dict(_SD_VAE)
    if scale == "toy":
        unet_cfg.update(
            sample_size=8,
            block_out_channels=[16, 32, 32, 32],
            norm_num_groups=8,
            attention_head_dim=4,
            cross_attention_dim=text["hidden_size"],
        )
        vae_cfg.update(block_out_channels=[8, 8, 16, 16], norm_num_groups=8, sample_size=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tokenizer = write_byte_tokenizer(folder / "_tok", 77)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                max_position_embeddings=77,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
                **text,
            )
        )
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
    pipe = assemble_pipeline(
        "sd",
        denoiser=unet,
        vae=vae,
        scheduler=sampling_scheduler_from_spec(NoiseScheduleSpec()),
        text_encoders=[text_encoder],
        tokenizers=[tokenizer],
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    import shutil

    shutil.rmtree(folder / "_tok", ignore_errors=True)


def _build_sdxl(scale: str, folder: Path) -> None:
    """SDXL-shaped pipeline at toy width: ``resalign.models.tiny``'s SDXL UNet (SDXL's block
    layout, linear projections, ``text_time`` added conditioning over both encoders) and its
    two text encoders (the second with projection: the pooled embeddings), with 77-token
    tokenizers and an SDXL-layout 4-block VAE (8x down, scaling 0.13025) at 64 px."""
    if scale != "toy":
        raise UserError(
            "the SDXL rehearsal is available at toy scale only",
            hint="use --rehearse-profile toy",
        )
    import torch
    from diffusers import AutoencoderKL

    from .models.pipelines import assemble_pipeline
    from .models.tiny import build_tiny_sdxl_pipeline, build_tiny_sdxl_unet
    from .spec.schema.model import NoiseScheduleSpec, TinyModelSpec

    tiny = TinyModelSpec(
        sample_size=16,
        in_channels=3,
        block_out_channels=[16, 32, 32],
        layers_per_block=2,
        attention_head_dim=8,
        text_hidden_size=32,
        max_length=77,
        latent="vae",
    )
    base = build_tiny_sdxl_pipeline(tiny, NoiseScheduleSpec(), seed=0)
    vae_cfg = dict(_SD_VAE, block_out_channels=[8, 8, 16, 16], norm_num_groups=8)
    vae_cfg.update(sample_size=64, scaling_factor=0.13025)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        unet = build_tiny_sdxl_unet(tiny, 4, 8)
        vae = AutoencoderKL(**vae_cfg)
    pipe = assemble_pipeline(
        "sdxl",
        denoiser=unet,
        vae=vae,
        scheduler=base.scheduler,
        text_encoders=[base.text_encoder, base.text_encoder_2],
        tokenizers=[base.tokenizer, base.tokenizer_2],
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)


# SD 3.5 Medium's layout (the transformer/, vae/ and text encoders' configs of
# stabilityai/stable-diffusion-3.5-medium): MM-DiT joint blocks with RMS q/k norm, the first
# 13 with a second (dual) image self-attention, patch 2, T5 text width 4096, pooled
# CLIP-L + CLIP-G 768 + 1280; a 16-channel VAE with scaling 1.5305 and shift 0.0609.
SD35_MEDIUM_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
    "dual_attention_layers": tuple(range(13)),
}
_SD3_VAE: dict[str, Any] = {
    **_SD_VAE,
    "latent_channels": 16,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


def _build_sd3(scale: str, folder: Path) -> None:
    """The SD 3.5-shaped toy pipeline (:func:`build_sd3_toy_pipeline`) saved as a diffusers
    folder."""
    if scale != "toy":
        raise UserError(
            "the SD3 rehearsal is available at toy scale only",
            hint="use --rehearse-profile toy",
        )
    pipe = build_sd3_toy_pipeline(folder)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    import shutil

    for i in (1, 2):
        shutil.rmtree(folder / f"_tok{i}", ignore_errors=True)


def build_sd3_toy_pipeline(tmp: Path, seed: int = 0) -> Any:
    """SD 3.5-shaped pipeline at toy width: the transformer's block types of SD 3.5 Medium
    (joint blocks with RMS q/k norm, the first a dual-attention block, the last
    context-pre-only; 3 blocks of width 16), CLIP-L and CLIP-G roles as two
    ``CLIPTextModelWithProjection`` (width 32) with 77-token byte-level tokenizers, a T5
    v1.1-shaped encoder (width 64) with an offline Unigram tokenizer (256 tokens: the
    pipeline's default sequence), an SD3-layout 16-channel VAE (8× down, scaling and shift
    as published) at 64 px, and a ``FlowMatchEulerDiscreteScheduler`` with SD3's shift 3.
    ``tmp`` holds the CLIP tokenizers' files (``_tok1``, ``_tok2``). Deterministic in
    ``seed`` (the rehearsal's is 0)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from .models.pipelines import assemble_pipeline
    from .models.tiny import build_t5_tokenizer, build_tiny_t5, write_byte_tokenizer
    from .spec.schema.model import TinyModelSpec

    text = dict(_TOY_TEXT)
    t5 = TinyModelSpec(text_hidden_size=text["hidden_size"], text_layers=2)
    transformer_cfg = dict(
        SD35_MEDIUM_TRANSFORMER,
        sample_size=8,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=2 * text["hidden_size"],
        pooled_projection_dim=2 * text["projection_dim"],
        pos_embed_max_size=8,
        dual_attention_layers=(0,),
    )
    vae_cfg = dict(_SD3_VAE, block_out_channels=[8, 8, 16, 16], norm_num_groups=8, sample_size=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizers = [write_byte_tokenizer(Path(tmp) / f"_tok{i}", 77) for i in (1, 2)]
        tokenizers.append(build_t5_tokenizer(256))
        encoders = [
            CLIPTextModelWithProjection(
                CLIPTextConfig(
                    vocab_size=len(tok),
                    max_position_embeddings=77,
                    bos_token_id=0,
                    eos_token_id=1,
                    pad_token_id=1,
                    **text,
                )
            )
            for tok in tokenizers[:2]
        ]
        encoders.append(build_tiny_t5(t5, len(tokenizers[2])))
        transformer = SD3Transformer2DModel(**transformer_cfg)
        vae = AutoencoderKL(**vae_cfg)
    return assemble_pipeline(
        "sd3",
        denoiser=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoders=encoders,
        tokenizers=tokenizers,
    )


# FLUX.1-dev's layout (the transformer/, vae/, text encoders' and scheduler's configs of
# black-forest-labs/FLUX.1-dev): 19 double-stream and 38 single-stream blocks of 24 heads of
# 128, rotary axes (16, 56, 56), packed 16-channel latents (64 inputs), T5-XXL's 4096-wide
# sequence, CLIP-L's 768-wide pooled output, guidance embeddings (the guidance-distilled
# variant; schnell has none); a 16-channel VAE with scaling 0.3611 and shift 0.1159; the
# flow scheduler with resolution-dependent shifting between 256 and 4096 tokens.
FLUX1_DEV_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
_FLUX_VAE: dict[str, Any] = {
    **_SD_VAE,
    "latent_channels": 16,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
FLUX1_DEV_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
# T5 v1.1 XXL (FLUX.1's text_encoder_2).
_T5_XXL: dict[str, Any] = {
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
}
# The rehearsal model's image size: 64 px (8x8 latents, 16 tokens) or 512 px (1024 tokens).
FLUX_REHEARSAL_RESOLUTION = {"toy": 64, "full": 512}


def flux_configs(scale: str) -> dict[str, dict[str, Any]]:
    """The component configs of the FLUX.1 rehearsal model at ``scale``: ``toy`` (widths
    8–64: 2 double- and 2 single-stream blocks of 2 heads of 8, rotary axes (2, 2, 4), a
    2-layer CLIP of width 32 and T5 of width 64, VAE widths 8–16) or ``full`` (FLUX.1-dev's
    widths with 2 double- and 2 single-stream blocks, CLIP-L's text tower, T5-XXL's widths
    with 2 layers, the published VAE). Keys ``transformer``, ``clip``, ``t5``, ``vae``,
    ``scheduler``."""
    if scale == "toy":
        clip = dict(_TOY_TEXT)
        clip.pop("projection_dim")
        t5 = {"d_model": 64, "d_kv": 8, "d_ff": 128, "num_heads": 8,
              "relative_attention_num_buckets": 8, "relative_attention_max_distance": 32}  # fmt: skip
        transformer = dict(
            FLUX1_DEV_TRANSFORMER,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=t5["d_model"],
            pooled_projection_dim=clip["hidden_size"],
            axes_dims_rope=(2, 2, 4),
        )
        vae = dict(_FLUX_VAE, block_out_channels=[8, 8, 16, 16], norm_num_groups=8)
        t5_layers = 2
    elif scale == "full":
        clip = {k: v for k, v in _CLIP_L_TEXT.items() if k != "projection_dim"}
        t5 = dict(_T5_XXL)
        transformer = dict(FLUX1_DEV_TRANSFORMER, num_layers=2, num_single_layers=2)
        vae = dict(_FLUX_VAE)
        t5_layers = 2
    else:
        raise ValueError(scale)
    vae["sample_size"] = FLUX_REHEARSAL_RESOLUTION[scale]
    t5.update(num_layers=t5_layers, feed_forward_proj="gated-gelu", dropout_rate=0.0,
              pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)  # fmt: skip
    return {
        "transformer": transformer,
        "clip": clip,
        "t5": t5,
        "vae": vae,
        "scheduler": dict(FLUX1_DEV_SCHEDULER),
    }


def build_flux_pipeline(
    cfg: dict[str, dict[str, Any]], tmp: Path, t5_length: int | None = None, seed: int = 0
) -> Any:
    """A random-weight ``FluxPipeline`` of the component configs ``cfg``
    (:func:`flux_configs`): a ``FluxTransformer2DModel`` of the published block types
    (double-stream blocks with RMS q/k norm, single-stream blocks with the parallel MLP,
    guidance embeddings where the config says so), a ``CLIPTextModel`` with a 77-token
    byte-level tokenizer, a T5 v1.1-shaped encoder with an offline Unigram tokenizer of
    ``t5_length`` tokens (default 512: FluxPipeline's sequence), a 16-channel FLUX VAE and
    the config's scheduler. ``tmp`` is a scratch folder for the CLIP tokenizer's files.
    Deterministic in ``seed``."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from .models.flux import FLUX_MAX_SEQUENCE_LENGTH
    from .models.pipelines import assemble_pipeline
    from .models.tiny import build_t5_tokenizer, write_byte_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip_tok = write_byte_tokenizer(Path(tmp), 77)
        t5_tok = build_t5_tokenizer(t5_length or FLUX_MAX_SEQUENCE_LENGTH)
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(clip_tok),
                max_position_embeddings=77,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
                **cfg["clip"],
            )
        )
        t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), **cfg["t5"]))
        transformer = FluxTransformer2DModel(**cfg["transformer"])
        vae = AutoencoderKL(**cfg["vae"])
    return assemble_pipeline(
        "flux",
        denoiser=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(**cfg["scheduler"]),
        text_encoders=[clip, t5],
        tokenizers=[clip_tok, t5_tok],
    )


def _build_flux(scale: str, folder: Path) -> None:
    """FLUX.1-dev-shaped pipeline (:func:`flux_configs`, :func:`build_flux_pipeline`) saved
    as a diffusers folder."""
    import shutil

    pipe = build_flux_pipeline(flux_configs(scale), folder / "_tok")
    pipe.save_pretrained(str(folder), safe_serialization=True)
    shutil.rmtree(folder / "_tok", ignore_errors=True)
