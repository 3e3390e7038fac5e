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


def curated_params(spec: Any) -> dict[str, str]:
    """A flat view of the parameters that matter when comparing runs (parent run params)."""
    d = _spec_dict(spec)
    out: dict[str, str] = {}
    for path in CURATED:
        cur: Any = d
        for part in path.split("."):
            cur = cur.get(part) if isinstance(cur, Mapping) else None
        if cur is None:
            continue
        out[path] = cur if isinstance(cur, str) else json.dumps(cur, sort_keys=True)
    configs = (((d.get("unlearn") or {}).get("resilience") or {}).get("meta") or {}).get("configs")
    if configs:
        out["unlearn.resilience.meta.configs"] = json.dumps(sorted(configs))
        for name, cfg in configs.items():
            for k in ("algorithm", "optimizer", "lr", "steps"):
                if k in cfg:
                    out[f"meta.{name}.{k}"] = json.dumps(cfg[k])
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
