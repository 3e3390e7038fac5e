"""The resolve pass: cross-references, defaults that depend on other sections, model rows.

After schema validation a spec is resolved into a :class:`ResolvedSpec`:

- every dataset name used anywhere must exist and be of a kind that fits its use
  (:mod:`.references`);
- a concept's (or a poison's) harmful dataset of type ``prompts`` is replaced by an implied
  ``harvest`` dataset named ``<prompts>__harvest`` (the original model generates the pairs);
- relative paths (datasets, a local model, metric weight files) become absolute, relative to
  the spec file's folder; a hub id stays an id;
- rows: ``original`` (no unlearning) first, then the ``unlearn`` block's label (default: its
  method), then each ``baselines`` entry deep-merged into the user's ``unlearn`` block and
  validated on its own; each row's ``seeds`` (one unlearn node each) default to
  ``[seed]``, its ``seed`` to the spec's ``seed``;
- meta-learning: without explicit ``configs`` and ``distribution`` the published product
  distribution is used; ``meta.data`` defaults to the concepts' retain datasets; a meta that
  samples more configs per step than exist, or a distribution with an empty axis, is an error.

Checks that need files on disk (data, local model, metric weights) run only with
``check_files`` so that a spec validates on a machine that does not hold the data yet.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .errors import Issue
from .references import (
    PROMPT_TYPES,
    check_references,
    check_search_metrics,
    get_at,
    items_of,
    names_at,
)
from .schema import Spec
from .schema.controls import ORACLE_ROW
from .schema.data import HarvestData
from .schema.unlearn import DistributionSpec, UnlearnSpec
from .source import PathT, SourceMap, dotted
from .validation import schema_issues

ORIGINAL_ROW = "original"
HARVEST_SUFFIX = "__harvest"

# What each metric weight file is, for the message when it is missing.
WEIGHT_FILES = {
    ("mhsc_us", "clip_path"): "a CLIP ViT-L/14 model folder (transformers save_pretrained "
    "layout, e.g. openai/clip-vit-large-patch14 downloaded once)",
    ("mhsc_us", "head_path"): "the multi-headed safety classifier checkpoint "
    "(the 'sexual' head on CLIP ViT-L/14 features)",
    ("q16", "clip_path"): "a CLIP ViT-L/14 model folder (transformers save_pretrained layout, "
    "e.g. openai/clip-vit-large-patch14 downloaded once)",
    ("q16", "probe_path"): "the Q16 probe: its two prompt embeddings as a [2, 768] tensor "
    "file (.safetensors or weights-only .pt)",
    ("fid", "inception_path"): "the FID Inception-v3 weights (pt_inception-2015-12-05 .pth, "
    "as pytorch-fid / torchmetrics use)",
    ("clip_score", "clip_path"): "a CLIP ViT-B/32 model folder (transformers save_pretrained "
    "layout, e.g. openai/clip-vit-base-patch32)",
}


@dataclass
class ResolvedSpec:
    """A validated spec with cross-section defaults filled in.

    ``spec``: the :class:`Spec` (paths absolute, implied harvest datasets added, concepts and
    poisons pointing at them, seeds and meta defaults filled). ``rows``: report row name →
    the row's :class:`UnlearnSpec` (``original`` has method ``none``). ``implied_harvests``:
    harvest dataset → the prompt dataset it was made from. ``overrides``: the ``--set``
    values applied (dotted path → value as written), logged with the run's parameters.
    """

    spec: Spec
    rows: dict[str, UnlearnSpec]
    source: str
    base_dir: Path
    implied_harvests: dict[str, str] = field(default_factory=dict)
    smap: SourceMap | None = None
    overrides: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name


# --------------------------------------------------------------------------- rows


def deep_merge(
    base: Mapping[str, Any], over: Mapping[str, Any], replace: Set[PathT] = frozenset()
) -> dict[str, Any]:
    """``over`` merged into ``base``: mappings merge key by key, anything else replaces, and
    so does a mapping at a path of ``replace`` (relative to ``over``: its ``!override``
    tags)."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) and (k,) not in replace:
            inner = {p[1:] for p in replace if len(p) > 1 and p[0] == k}
            out[k] = deep_merge(out[k], v, inner)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _baseline_issues(
    err: ValidationError, merged: Any, over: Mapping[str, Any], name: str, smap: SourceMap
) -> list[Issue]:
    """A baseline's errors, placed on its override when the bad value came from there, else
    on the ``unlearn`` block it inherited it from."""

    def prefix(path: PathT) -> PathT:
        return ("baselines", name) if path and get_at(over, path[0]) is not None else ("unlearn",)

    return schema_issues(err, merged, smap, root=UnlearnSpec, prefix=prefix)


def _meta_size(dist: DistributionSpec) -> int:
    return math.prod(
        len(getattr(dist, axis)) for axis in ("lr", "steps", "algorithm", "optimizer", "batch_size")
    )


def _check_meta(row: str, u: UnlearnSpec, path: PathT, smap: SourceMap) -> list[Issue]:
    issues: list[Issue] = []
    meta = u.resilience.meta
    mp = (*path, "resilience", "meta")
    if meta.distribution is not None:
        for axis in ("lr", "steps", "algorithm", "optimizer", "batch_size"):
            if not getattr(meta.distribution, axis):
                issues.append(
                    smap.issue(
                        (*mp, "distribution", axis),
                        f"{dotted((*mp, 'distribution', axis))}: empty axis, so the "
                        "distribution has no configurations; list at least one value or "
                        "remove the axis to use the published default",
                    )
                )
    if u.method != "resalign" or u.resilience.beta == 0:
        return issues
    total = len(meta.configs) + (_meta_size(meta.distribution) if meta.distribution else 0)
    # over: data runs J copies of the first configuration: no draw without replacement
    if meta.over == "data_and_configs" and meta.samples_per_step > total and not issues:
        issues.append(
            smap.issue(
                (*mp, "samples_per_step"),
                f"row '{row}': meta samples {meta.samples_per_step} configurations per step "
                f"without replacement but only {total} exist ({len(meta.configs)} explicit"
                + (
                    f" + {_meta_size(meta.distribution)} from the distribution"
                    if meta.distribution
                    else ""
                )
                + f"); lower samples_per_step to at most {total} or add configurations",
            )
        )
    needs_pool = any(c.data is None for c in meta.configs.values()) or (
        meta.distribution is not None and not meta.distribution.data
    )
    if needs_pool and not meta.data:
        # With no meta section written, point at the concepts, whose retain sets are the pool.
        at = mp if smap.position(mp) != smap.position(()) else ("concepts",)
        issues.append(
            smap.issue(
                at,
                f"row '{row}': simulated fine-tuning has no data: set "
                f"{dotted((*mp, 'data'))} to benign datasets, give each config a 'data', or "
                "give the concepts 'retain' datasets (the default pool)",
                at_key=True,
            )
        )
    return issues


def _fill_row(u: UnlearnSpec, seed: int, pool: list[str], label: str) -> UnlearnSpec:
    meta = u.resilience.meta
    updates: dict[str, Any] = {}
    if not meta.configs and meta.distribution is None:
        updates["distribution"] = DistributionSpec()
    if not meta.data:
        updates["data"] = list(pool)
    if updates:
        res = u.resilience.model_copy(update={"meta": meta.model_copy(update=updates)})
        u = u.model_copy(update={"resilience": res})
    # ``seeds`` (a list: one unlearn node per seed) wins over ``seed``; either defaults to the
    # spec's seed. ``seed`` is kept equal to the first seed for code that reads one.
    seeds = list(u.seeds) if u.seeds else [seed if u.seed is None else u.seed]
    return u.model_copy(update={"seed": seeds[0], "seeds": seeds, "label": label})


def build_rows(
    data: Mapping[str, Any], smap: SourceMap
) -> tuple[dict[str, UnlearnSpec], list[Issue]]:
    """Rows from the raw data, so a bad baseline is reported even when another section has
    errors. Errors of the ``unlearn`` block itself are left to the schema pass."""
    issues: list[Issue] = []
    seed = data.get("seed") if isinstance(data.get("seed"), int) else 0
    pool: list[str] = []
    for _, c in items_of(data.get("concepts")):
        for _, r in names_at(get_at(c, "retain"), ()):
            if isinstance(r, str) and r not in pool:
                pool.append(r)
    rows: dict[str, UnlearnSpec] = {
        ORIGINAL_ROW: UnlearnSpec(method="none", label=ORIGINAL_ROW, seed=seed, seeds=[seed])
    }
    raw_unlearn = data.get("unlearn")
    raw_unlearn = raw_unlearn if isinstance(raw_unlearn, Mapping) else {}
    try:
        main_spec: UnlearnSpec | None = UnlearnSpec.model_validate(raw_unlearn)
    except ValidationError:
        main_spec = None
    if main_spec is not None:
        main = main_spec.label or main_spec.method
        if main == ORIGINAL_ROW:
            issues.append(
                smap.issue(
                    ("unlearn", "label") if main_spec.label else ("unlearn", "method"),
                    "the row name 'original' is reserved for the model before unlearning; "
                    "set unlearn.label to another name",
                )
            )
        else:
            rows[main] = _fill_row(main_spec, seed, pool, main)
            issues += _check_meta(main, rows[main], ("unlearn",), smap)
    baselines = data.get("baselines")
    for name, over in items_of(baselines if isinstance(baselines, Mapping) else None):
        if not isinstance(over, Mapping):
            continue  # the schema reports it
        if name in rows:
            issues.append(
                smap.issue(
                    ("baselines", name),
                    f"baselines.{name}: row name '{name}' is already used "
                    f"({'reserved' if name == ORIGINAL_ROW else 'by the unlearn block'}); "
                    "rename the baseline",
                    at_key=True,
                )
            )
            continue
        tagged = {p[2:] for p in smap.overrides if p[:2] == ("baselines", name) and p[2:]}
        merged = deep_merge(raw_unlearn, over, tagged)
        merged.pop("label", None)
        try:
            u = UnlearnSpec.model_validate(merged)
        except ValidationError as err:
            issues += _baseline_issues(err, merged, over, name, smap)
            continue
        rows[name] = _fill_row(u, seed, pool, name)
        issues += _check_meta(name, rows[name], ("baselines", name), smap)
    return rows, issues


# --------------------------------------------------------------------------- paths


def is_hub_id(value: str, base_dir: Path) -> bool:
    """``org/name`` that is not an existing local path (nor an explicitly local one)."""
    if value.startswith(("/", ".", "~")) or "\\" in value:
        return False
    if (base_dir / value).exists():
        return False
    parts = value.split("/")
    return len(parts) == 2 and all(parts) and not value.endswith((".safetensors", ".ckpt"))


def _abs(value: str, base_dir: Path) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base_dir / p).resolve())


def _absolutize(spec: Spec, base_dir: Path) -> Spec:
    ds = {}
    for name, d in spec.datasets.items():
        ds[name] = (
            d.model_copy(update={"path": _abs(d.path, base_dir)}) if hasattr(d, "path") else d
        )
    metrics = []
    for m in spec.evaluate.metrics:
        upd = {
            f: _abs(getattr(m, f), base_dir)
            for f in type(m).model_fields
            if f.endswith("_path") and getattr(m, f)
        }
        metrics.append(m.model_copy(update=upd) if upd else m)
    model = spec.model
    if model.pretrained and not is_hub_id(model.pretrained, base_dir):
        model = model.model_copy(update={"pretrained": _abs(model.pretrained, base_dir)})
    return spec.model_copy(
        update={
            "datasets": ds,
            "evaluate": spec.evaluate.model_copy(update={"metrics": metrics}),
            "model": model,
        }
    )


def missing_files(spec: Spec, smap: SourceMap) -> list[Issue]:
    """Every referenced file exists: dataset paths, a local model, metric weight files.
    ``spec`` must already have absolute paths."""
    issues: list[Issue] = []
    for name, d in spec.datasets.items():
        path = getattr(d, "path", None)
        if path and not Path(path).exists():
            issues.append(
                smap.issue(
                    ("datasets", name, "path"),
                    f"datasets.{name}.path: '{path}' does not exist; put the "
                    + (
                        "image folder (images + metadata.jsonl/metadata.csv)"
                        if d.type == "imagefolder"
                        else "prompt file (.csv or .txt)"
                    )
                    + " there or fix the path (relative to the spec's folder)",
                )
            )
    for i, m in enumerate(spec.evaluate.metrics):
        for f in type(m).model_fields:
            value = getattr(m, f)
            if f.endswith("_path") and value and not Path(value).exists():
                what = WEIGHT_FILES.get((m.kind, f), "the weights this metric needs")
                issues.append(
                    smap.issue(
                        ("evaluate", "metrics", i, f),
                        f"evaluate.metrics[{i}].{f}: metric '{m.kind}' needs '{value}', which "
                        f"does not exist; put {what} there",
                    )
                )
    model = spec.model
    if model.pretrained and Path(model.pretrained).is_absolute():
        if not Path(model.pretrained).exists():
            issues.append(
                smap.issue(
                    ("model", "pretrained"),
                    f"model.pretrained: '{model.pretrained}' does not exist; give a diffusers "
                    "folder, a .safetensors file, or a hub id (org/name) in the local cache",
                )
            )
    return issues


# --------------------------------------------------------------------------- controls


def dataset_labels(name: str, spec: Spec) -> set[int] | None:
    """The class labels items of dataset ``name`` can carry (``digits``: its digits; ``mix``:
    those of base and poison when both carry labels), or None for data without labels."""
    d = spec.datasets.get(name)
    if d is None:
        return None
    if d.type == "digits":
        return set(d.digits)
    if d.type == "mix":
        base, poison = dataset_labels(d.base, spec), dataset_labels(d.poison, spec)
        return None if base is None or poison is None else base | poison
    return None


def oracle_labels(spec: Spec) -> list[int]:
    """The labels the oracle control's pretraining leaves out: every concept's ``label``
    (sorted, distinct). Only meaningful for a spec that passed :func:`check_controls`."""
    return sorted({lab for c in spec.concepts.values() for lab in c.labels})


def check_report(spec: Spec, rows: Mapping[str, UnlearnSpec], smap: SourceMap) -> list[Issue]:
    """A ``report.reference`` the spec writes names one of its unlearning rows (the default,
    ``plain``, may be absent: then no row is paired)."""
    ref = spec.report.reference
    if "reference" not in spec.report.model_fields_set or ref in rows:
        return []
    names = [r for r in rows if r != ORIGINAL_ROW]
    return [
        smap.issue(
            ("report", "reference"),
            f"report.reference is '{ref}', but no row has that label",
            allowed=", ".join(names) or "none (add baselines)",
        )
    ]


def check_controls(spec: Spec, rows: Mapping[str, UnlearnSpec], smap: SourceMap) -> list[Issue]:
    """``controls.oracle`` can be built: a tiny model pretrained here on labelled data that
    holds every concept's label, each concept with a ``label``, and no row named ``oracle``."""
    if not spec.controls.oracle:
        return []
    at = ("controls", "oracle")
    off = "or remove controls.oracle"
    model = spec.model
    pre = model.tiny.pretrain if model.tiny is not None else None
    if model.family != "tiny" or pre is None:
        why = (
            f"model.family is '{model.family}': a given checkpoint cannot be pretrained again "
            "without the concept"
            if model.family != "tiny"
            else "model.tiny has no 'pretrain', so there is no pretraining data to remove the "
            "concept from"
        )
        return [
            smap.issue(
                at,
                f"controls.oracle needs a model this spec pretrains (model.family tiny with "
                f"model.tiny.pretrain): the oracle is that pretraining without the concepts' "
                f"items; {why}; {off}",
            )
        ]
    issues: list[Issue] = []
    for name, c in spec.concepts.items():
        if c.label is None:
            issues.append(
                smap.issue(
                    ("concepts", name),
                    f"concepts.{name}: controls.oracle removes the concept's items from the "
                    "pretraining data by their label, and this concept has no 'label'; set "
                    f"concepts.{name}.label to its class index (digits: the digit) {off}",
                    at_key=True,
                )
            )
    dp = ("model", "tiny", "pretrain", "dataset")
    labels = dataset_labels(pre.dataset, spec)
    if labels is None:
        kind = spec.datasets[pre.dataset].type
        issues.append(
            smap.issue(
                dp,
                f"model.tiny.pretrain.dataset: controls.oracle removes the concepts' items by "
                f"their label, but dataset '{pre.dataset}' (type '{kind}') carries no labels; "
                f"pretrain on a 'digits' dataset (or a 'mix' of them) {off}",
            )
        )
    else:
        for name, c in spec.concepts.items():
            absent = [lab for lab in c.labels if lab not in labels]
            if absent:
                issues.append(
                    smap.issue(
                        dp,
                        f"model.tiny.pretrain.dataset: dataset '{pre.dataset}' holds no item "
                        f"labelled {absent[0]} (concept '{name}'), so the oracle would be the "
                        f"original model itself; pretrain on data with the concept {off}",
                    )
                )
    if ORACLE_ROW in rows:
        where = ("baselines", ORACLE_ROW) if ORACLE_ROW in spec.baselines else ("unlearn", "label")
        issues.append(
            smap.issue(
                where,
                "the row name 'oracle' is the oracle control's (controls.oracle); rename this row",
                at_key=where[0] == "baselines",
            )
        )
    return issues


# --------------------------------------------------------------------------- entry


def _implied_harvests(spec: Spec) -> tuple[Spec, dict[str, str]]:
    implied: dict[str, str] = {}
    ds = dict(spec.datasets)

    def harvested(name: str) -> str:
        d = ds.get(name)
        if d is None or d.type not in PROMPT_TYPES:
            return name
        target = name + HARVEST_SUFFIX
        if target not in ds:
            ds[target] = HarvestData(type="harvest", prompts=name)
        implied[target] = name
        return target

    concepts = {
        n: c.model_copy(update={"harmful": [harvested(h) for h in c.harmful]})
        for n, c in spec.concepts.items()
    }
    threats = {}
    for n, t in spec.threats.items():
        if t.poison is not None:
            t = t.model_copy(
                update={"poison": t.poison.model_copy(update={"data": harvested(t.poison.data)})}
            )
        if t.stages and any(s.poison is not None for s in t.stages):
            stages = [
                s
                if s.poison is None
                else s.model_copy(
                    update={
                        "poison": s.poison.model_copy(update={"data": harvested(s.poison.data)})
                    }
                )
                for s in t.stages
            ]
            t = t.model_copy(update={"stages": stages})
        threats[n] = t
    for n, d in list(ds.items()):
        if d.type == "mix":
            ds[n] = d.model_copy(update={"poison": harvested(d.poison)})
    spec = spec.model_copy(update={"datasets": ds, "concepts": concepts, "threats": threats})
    return spec, implied


def resolve(
    spec: Spec | None,
    data: Mapping[str, Any],
    smap: SourceMap,
    base_dir: Path,
    *,
    check_files: bool = False,
) -> tuple[ResolvedSpec | None, list[Issue]]:
    """Cross-reference checks on the raw data (always, so they are reported alongside schema
    errors) and, when ``spec`` validated, the resolved spec. Returns (resolved or None, issues).
    """
    issues = check_references(data, smap)
    rows, row_issues = build_rows(data, smap)
    issues += row_issues
    if spec is None or issues:
        return None, issues
    issues += check_controls(spec, rows, smap)
    issues += check_report(spec, rows, smap)
    spec = _absolutize(spec, base_dir)
    issues += check_search_metrics(spec, smap)
    if check_files:
        issues += missing_files(spec, smap)
    spec, implied = _implied_harvests(spec)
    main = [n for n in rows if n != ORIGINAL_ROW and n not in spec.baselines]
    if main:
        spec = spec.model_copy(update={"unlearn": rows[main[0]]})
    if issues:
        return None, issues
    return ResolvedSpec(spec, rows, smap.file, base_dir, implied, smap), []
