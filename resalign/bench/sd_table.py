"""The benchmark's markdown table (``resalign bench sd``, :mod:`.sd`)."""

from __future__ import annotations

import math
from typing import Any

from ..algorithms.callbacks import PHASES


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def _delta(r: dict[str, Any]) -> float:
    """The step's own peak: peak minus what the process held when the step started."""
    base = r.get("step_base_bytes")
    return math.nan if base is None else float(r["step_peak_bytes"] - base)


def table(results: list[dict[str, Any]]) -> str:
    """A markdown table of the combinations (peak of the outer step, ratio to fp32; the
    step's own peak above its starting memory, ratio to fp32)."""
    base = next((r for r in results if r["combo"] == "fp32" and "error" not in r), None)
    cols = [
        "levers",
        "step peak GiB",
        "× fp32",
        "step Δ MiB",
        "Δ × fp32",
        "setup peak GiB",
        "step s",
        "direct s",
        "inner s",
        "∇L_harm(θ*) s",
        "HVP/Richardson s",
        "update s",
        "hypergrad rel diff",
        "cosine",
        "outer rel diff",
        "safeguard flips",
    ]
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['combo']} | {r['error']} |" + " |" * (len(cols) - 2))
            continue
        ratio = r["step_peak_bytes"] / base["step_peak_bytes"] if base else math.nan
        d, d0 = _delta(r), _delta(base) if base else math.nan
        d_ratio = d / d0 if d0 and not math.isnan(d0) else math.nan
        acc = r.get("accuracy", {})
        hyp = acc.get("hyper", {})
        out = acc.get("outer", {})
        rows.append(
            f"| {r['combo']} | {_gib(r['step_peak_bytes'])} | {ratio:.2f} | "
            f"{_mib(d)} | {d_ratio:.2f} | "
            f"{_gib(r['setup_peak_bytes'])} | {r['step_seconds']:.1f} | "
            + " | ".join(f"{r['phase_seconds'][p]:.1f}" for p in PHASES)
            + " | "
            f"{hyp.get('rel_diff', math.nan):.2e} | {hyp.get('cosine', math.nan):.6f} | "
            f"{out.get('rel_diff', math.nan):.2e} | {acc.get('safeguard_flips', '')} |"
        )
    return "\n".join(rows)
