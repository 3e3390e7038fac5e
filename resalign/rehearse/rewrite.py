"""The rehearsal rewrite: a real spec's YAML turned into its rehearsal spec (the
profiles, the caps on steps and counts, the stand-ins for missing files). It builds the
stand-in assets it points at (:mod:`.assets`, :mod:`.pipelines`), so it lives here rather
than in :mod:`resalign.spec`, whose modules have no side effects."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from .assets import _once, _once_file, build_clip, build_weights, write_images, write_prompts
from .pipelines import FLUX_REHEARSAL_RESOLUTION, build_pipeline

SUFFIX = ".rehearsal"


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


def _profile(name: str) -> Profile:
    if name not in PROFILES:
        raise UserError(
            f"unknown rehearsal profile {name!r}", hint=f"use one of {', '.join(PROFILES)}"
        )
    return PROFILES[name]


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
