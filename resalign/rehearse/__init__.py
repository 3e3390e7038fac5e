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

from collections.abc import Sequence
from pathlib import Path

from ..atomic import atomic_write_text
from ..errors import UserError
from .assets import build_clip, build_weights
from .pipelines import (
    FLUX1_DEV_SCHEDULER,
    FLUX1_DEV_TRANSFORMER,
    SD35_MEDIUM_TRANSFORMER,
    build_flux_pipeline,
    build_pipeline,
    build_sd3_toy_pipeline,
    flux_configs,
)
from .rewrite import PROFILES, SUFFIX, Profile, _cap_threat, _profile, rehearse_data

REHEARSAL_DIR = "rehearsal"
TAG = "resalign.rehearsal"


def rehearsal_store(store: str | Path) -> Path:
    """The store a rehearsal of ``store`` writes to."""
    return Path(store) / REHEARSAL_DIR


def prepare_rehearsal(
    spec_path: str | Path, store: str | Path, profile: str = "toy", sets: Sequence[str] = ()
) -> Path:
    """Validate ``spec_path`` with its ``--set`` items ``sets`` (without requiring its files),
    build the rehearsal assets and write the rehearsal spec (composed: ``extends``, ``--set``
    and ``vars`` applied); returns its path (load it with ``check_files=True`` and no sets)."""
    import yaml

    from ..spec import load_spec
    from ..spec.compose import compose_text, read_spec_file

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
    from ..spec import load_spec

    name = load_spec(spec_path, check_files=False).name
    path = rehearsal_store(store) / "specs" / f"{name}{SUFFIX}.{_profile(profile).name}.yaml"
    if not path.is_file():
        raise UserError(
            f"no rehearsal of {spec_path} in {rehearsal_store(store)}",
            hint=f"run `resalign run {spec_path} --rehearse` first",
        )
    return path


__all__ = [
    "FLUX1_DEV_SCHEDULER",
    "FLUX1_DEV_TRANSFORMER",
    "PROFILES",
    "Profile",
    "REHEARSAL_DIR",
    "SD35_MEDIUM_TRANSFORMER",
    "SUFFIX",
    "TAG",
    "_cap_threat",
    "build_clip",
    "build_flux_pipeline",
    "build_pipeline",
    "build_sd3_toy_pipeline",
    "build_weights",
    "flux_configs",
    "prepare_rehearsal",
    "rehearsal_spec_path",
    "rehearsal_store",
    "rehearse_data",
]
