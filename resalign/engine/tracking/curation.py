"""What the parent run records about a spec: curated params (flattened, cleaned keys), the git commit, the graph as Mermaid."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MAX_PARAM_LEN = 6000


_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /:]")


def git_commit() -> str | None:
    """The commit of the checkout the package runs from, when it is a git checkout."""
    try:
        r = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings to dotted keys; lists become JSON strings."""
    out: dict[str, str] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif prefix:
        out[prefix] = obj if isinstance(obj, str) else json.dumps(obj, sort_keys=True)
    return out


def _clean_key(k: str) -> str:
    return _KEY_BAD.sub("_", k)[:250]


# The key parameters of a resolved spec that a researcher compares runs by.
CURATED = [
    "name",
    "seed",
    "model.family",
    "model.pretrained",
    "model.dtype",
    "model.trainable.kind",
    "model.trainable.rank",
    "unlearn.method",
    "unlearn.steps",
    "unlearn.optimizer.name",
    "unlearn.optimizer.lr",
    "unlearn.harmful_loss.kind",
    "unlearn.regularizers",
    "unlearn.resilience.beta",
    "unlearn.resilience.hypergradient.kind",
    "unlearn.resilience.hypergradient.gamma",
    "unlearn.resilience.hypergradient.iterations",
    "unlearn.resilience.hypergradient.damping",
    "unlearn.resilience.hypergradient.max_norm",
    "unlearn.resilience.hypergradient.retries",
    "unlearn.resilience.hypergradient.fallback",
    "unlearn.resilience.hypergradient.hvp_backend",
    "unlearn.resilience.meta.samples_per_step",
    "unlearn.resilience.meta.meta_rate",
    "unlearn.resilience.meta.over",
    "unlearn.resilience.meta.data",
    "unlearn.resilience.meta.distribution",
    "evaluate.metrics",
]


_THREAT_KEYS = ["algorithm", "data", "optimizer", "lr", "steps", "batch_size", "seeds", "eval_at"]
_PERTURB_KEYS = ["algorithm", "data", "perturb", "seeds"]


def _spec_dict(spec: Any) -> dict[str, Any]:
    """The spec as plain data; accepts a ResolvedSpec (its ``.spec``), a Spec or a mapping."""
    if not hasattr(spec, "model_dump") and hasattr(spec, "spec"):
        spec = spec.spec
    if hasattr(spec, "model_dump"):
        return spec.model_dump(mode="json")
    if isinstance(spec, Mapping):
        return dict(spec)
    return {}


def _get(d: Any, path: str) -> Any:
    for part in path.split("."):
        d = d.get(part) if isinstance(d, Mapping) else None
    return d


def _unlearn_params(u: Mapping[str, Any], prefix: str) -> dict[str, str]:
    """The curated ``unlearn.*`` values of one unlearn block under ``prefix``, by the content
    key's rule: a method without a resilience term has no ``resilience`` values."""
    from ...graph.keys import key_params

    kept = key_params("unlearn", {"unlearn": dict(u)})["unlearn"]
    out: dict[str, str] = {}
    for path in CURATED:
        if not path.startswith("unlearn."):
            continue
        cur = _get(kept, path[len("unlearn.") :])
        if cur is not None:
            out[prefix + path[len("unlearn.") :]] = (
                cur if isinstance(cur, str) else json.dumps(cur, sort_keys=True)
            )
    configs = _get(kept, "resilience.meta.configs")
    if configs:
        out[prefix + "resilience.meta.configs"] = json.dumps(sorted(configs))
        for name, cfg in configs.items():
            for k in ("algorithm", "optimizer", "lr", "steps"):
                if k in cfg:
                    out[f"{prefix}meta.{name}.{k}"] = json.dumps(cfg[k])
    return out


def curated_params(spec: Any) -> dict[str, str]:
    """A flat view of the parameters that matter when comparing runs (parent run params).

    With the resolved rows (a ResolvedSpec), every row is listed: ``row.<label>.method`` and,
    for rows that unlearn, the curated unlearn values as ``row.<label>.<path>`` (the
    ``unlearn`` block alone would say ``unlearn.method=resalign`` of an invocation that also
    ran ``plain``); without them, the ``unlearn`` block as ``unlearn.<path>``."""
    d = _spec_dict(spec)
    out: dict[str, str] = {}
    for path in CURATED:
        if path.startswith("unlearn."):
            continue
        if path == "model.trainable.rank" and _get(d, "model.trainable.kind") != "lora":
            continue  # a LoRA field; the selection is not LoRA
        cur = _get(d, path)
        if cur is None:
            continue
        out[path] = cur if isinstance(cur, str) else json.dumps(cur, sort_keys=True)
    rows = getattr(spec, "rows", None)
    if isinstance(rows, Mapping) and rows:
        for label, u in rows.items():
            ud = u.model_dump(mode="json") if hasattr(u, "model_dump") else dict(u)
            out[f"row.{label}.method"] = str(ud.get("method"))
            if ud.get("method") not in (None, "none"):
                out.update(_unlearn_params(ud, f"row.{label}."))
    elif isinstance(d.get("unlearn"), Mapping):
        out.update(_unlearn_params(d["unlearn"], "unlearn."))
    for tname, t in (d.get("threats") or {}).items():
        # a perturb threat reads no optimizer, lr or steps: its block instead
        keys = _PERTURB_KEYS if t.get("algorithm") == "perturb" else _THREAT_KEYS
        for k in keys:
            if k in t:
                v = t[k]
                out[f"threat.{tname}.{k}"] = v if isinstance(v, str) else json.dumps(v)
    if d.get("baselines"):
        out["baselines"] = json.dumps(sorted(d["baselines"]))
    # `--set PATH=VALUE` items the spec was loaded with (ResolvedSpec.overrides), as written.
    for path, value in (getattr(spec, "overrides", None) or {}).items():
        out[f"set.{path}"] = value
    return out


def mermaid(graph: Any) -> str:
    """The graph as a Mermaid flowchart (the plan's rendering)."""
    from ...graph.plan import render_mermaid

    return render_mermaid(graph) + "\n"
