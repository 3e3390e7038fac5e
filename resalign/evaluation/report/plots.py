"""Figures of the report, drawn from a built table (:mod:`.table`) into its folder.

``<metric>_vs_steps.png`` (:func:`plot_curves`: one panel per safety metric and threat, a
line per row with its 95 % band), ``grids.png`` (:func:`image_grids`: the evaluations' own
sample grids, a row per report row, pre-FT then each threat's last step) and
``search_best_so_far.png`` (:func:`plot_best_so_far`). The resurgence and predictor figures
are their modules' own (:func:`resalign.evaluation.resurgence.plot_areas`,
:func:`resalign.evaluation.predictors.predictor_section`). Matplotlib is imported in the
functions that draw (Agg backend), so reading this module costs nothing.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..figure import save_png
from ..stats import RATE_METRICS
from .results import EvalResult
from .table import bound_text, radius_map


def band_limits(metric: str, pts: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[float]]:
    """The 95% CI band (lower, upper) of a curve's points; clipped to [0, 1] for rate metrics
    (as the table's ``lo``/``hi``)."""
    lo = [p["mean"] - (p["ci95"] or 0.0) for p in pts]
    hi = [p["mean"] + (p["ci95"] or 0.0) for p in pts]
    if metric in RATE_METRICS:
        lo = [min(max(v, 0.0), 1.0) for v in lo]
        hi = [min(max(v, 0.0), 1.0) for v in hi]
    return lo, hi


def curve_file(metric: str) -> str:
    """The file :func:`write_report` plots ``metric`` against the attack steps into."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", metric) + "_vs_steps.png"


def plot_curves(table: Mapping[str, Any], path: Path, metric: str | None = None) -> bool:
    """Metric vs fine-tuning steps: one panel per (safety metric, threat), one line per row
    with a 95% CI band where there are several seeds; ``metric``: that metric's panels only.
    Returns False when there is nothing to plot (no threats)."""
    curves = {k: c for k, c in table["curves"].items() if metric in (None, c["metric"])}
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(curves)
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        cur = curves[key]
        for row, pts in cur["rows"].items():
            if not pts:
                continue
            xs = [p.get("radius", p["step"]) for p in pts]
            ys = [p["mean"] for p in pts]
            (line,) = ax.plot(xs, ys, marker="o", label=row)
            lo, hi = band_limits(cur["metric"], pts)
            if any(p["ci95"] for p in pts):
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
        by_radius = cur.get("x") == "radius"
        ax.set_title(
            f"{cur['metric']} after {'perturbation' if by_radius else 'fine-tuning'}: "
            f"{cur['threat']}"
        )
        ax.set_xlabel("radius r (‖θ'−θ‖ = r·‖θ‖)" if by_radius else "fine-tuning steps")
        ax.set_ylabel(cur["metric"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    save_png(fig, path)
    return True


# The evaluate step's grid.png: the first GRID_IMAGES images of its first prompt group, in
# generation order (resalign.evaluation.generate.generate_images, grid_size).
GRID_IMAGES = 16


def _tile_prompts(folder: Path) -> list[str]:
    """The prompts of the images an evaluation's ``grid.png`` shows (from its first group's
    ``index.jsonl``; empty when it is not there)."""
    groups = sorted(p for p in (folder / "images").glob("g*") if p.is_dir())
    index = groups[0] / "images" / "index.jsonl" if groups else None
    if index is None or not index.is_file():
        return []
    lines = [ln for ln in index.read_text("utf-8").splitlines() if ln.strip()]
    return [json.loads(ln).get("prompt", "") for ln in lines[:GRID_IMAGES]]


def _prompts_text(prompts: Sequence[str]) -> str:
    counts = dict.fromkeys(prompts, 0)
    for p in prompts:
        counts[p] += 1
    if len(counts) <= 3:
        return ", ".join(f"'{p}' ×{k}" for p, k in counts.items())
    first, last = list(counts)[0], list(counts)[-1]
    return f"{len(counts)} prompts, '{first}' … '{last}'"


def image_grids(results: Sequence[EvalResult], table: Mapping[str, Any], path: Path) -> str | None:
    """Before/after sample grids: one line per row, columns pre-FT then each threat's last
    step, each tile an evaluation's ``grid.png`` (the row's first unlearning seed and first
    attack seed). Returns the caption (what each row, column and tile is: the row and its
    seeds, the step, the number of images and their prompts), or None when no grid images
    exist."""
    from PIL import Image, ImageDraw

    threats = list(table["threats"])
    cols = [(None, 0)] + [(t, table["threats"][t]["last_step"]) for t in threats]
    cell, label_h, label_w = 192, 18, 150
    grid_of: dict[tuple[str, str | None], EvalResult] = {}

    def first_unit(r: EvalResult) -> tuple:
        return (r.unlearn_seed is None, r.unlearn_seed or 0, r.seed is None, r.seed or 0)

    for r in sorted(results, key=first_unit):
        g = r.folder / "grid.png"
        if g.is_file() and any(r.threat == t and r.step == s for t, s in cols):
            grid_of.setdefault((r.row, r.threat), r)
    if not grid_of:
        return None
    rows = table["rows"]
    canvas = Image.new("RGB", (label_w + cell * len(cols), label_h + cell * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, (t, s) in enumerate(cols):
        rad = radius_map(table["threats"][t]).get(s) if t is not None else None
        at = f"radius {rad:g}" if rad is not None else f"step {s}"
        head = "pre-FT (step 0)" if t is None else f"{t} {at}"
        draw.text((label_w + j * cell + 4, 3), head, fill="black")
    seeds_of: dict[str, str] = {}
    shown: list[EvalResult] = []
    for i, row in enumerate(rows):
        for j, (t, _) in enumerate(cols):
            r = grid_of.get((row, t))
            if r is None:
                continue
            shown.append(r)
            if r.threat is not None or row not in seeds_of:
                useed = "" if r.unlearn_seed is None else f"unlearning seed {r.unlearn_seed}"
                aseed = "" if r.seed is None else f"attack seed {r.seed}"
                seeds_of[row] = ", ".join(x for x in (useed, aseed) if x)
            tile = Image.open(r.folder / "grid.png").convert("RGB")
            tile = tile.resize((cell - 4, cell - 4), Image.NEAREST)
            canvas.paste(tile, (label_w + j * cell + 2, label_h + i * cell + 2))
        label = row if not seeds_of.get(row) else f"{row}\n{seeds_of[row]}".replace(", ", "\n")
        draw.multiline_text((4, label_h + i * cell + cell // 2 - 12), label, fill="black")
    canvas.save(path)
    prompts = next((p for p in (_tile_prompts(r.folder) for r in shown) if p), [])
    when = ", ".join(
        "pre-FT (step 0)" if t is None else f"after {t} (attack step {s})" for t, s in cols
    )
    seeds = "; ".join(f"{row}: {s}" for row, s in seeds_of.items() if s)
    tiles = (
        f"each tile shows {len(prompts)} generated images ({_prompts_text(prompts)})"
        if prompts
        else f"each tile shows up to {GRID_IMAGES} generated images"
    )
    return (
        f"Samples: rows {', '.join(rows)}; columns {when}; {tiles}, the first of that "
        f"evaluation's images in generation order; one unit per row ({seeds or 'no seeds'})."
    )


def plot_best_so_far(searches: Sequence[Mapping[str, Any]], path: Path) -> bool:
    """Best-so-far (within the bound) against trials: one panel per searched threat, one
    line per study, every trial's value as a dot (hollow outside the bound). Returns False
    when no study has a trial."""
    threats = list(dict.fromkeys(s["threat"] for s in searches if s["trials"]))
    if not threats:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(threats), figsize=(5.5 * len(threats), 3.8), squeeze=False)
    for ax, t in zip(axes.flat, threats):
        budget = 1
        for s in (s for s in searches if s["threat"] == t and s["trials"]):
            label = s["row"] if s["unlearn_seed"] is None else f"{s['row']} seed{s['unlearn_seed']}"
            xs = [tr["number"] + 1 for tr in s["trials"]]
            best = s["best_so_far"]
            (line,) = ax.step(
                xs, [float("nan") if v is None else v for v in best], where="post", label=label
            )
            for tr, x in zip(s["trials"], xs):
                if tr["objective"] is None:  # diverged: a cross on the axis
                    ax.plot(x, 0, "x", ms=5, color=line.get_color(), clip_on=False)
                    continue
                if tr.get("pruned_at") is not None:  # its value where the pruner stopped it
                    ax.plot(x, tr["objective"], "v", ms=4, color=line.get_color(),
                            mfc="none", alpha=0.5)  # fmt: skip
                    continue
                ax.plot(x, tr["objective"], "o", ms=4, color=line.get_color(),
                        mfc=line.get_color() if tr["feasible"] else "none", alpha=0.7)  # fmt: skip
            budget = max(budget, s["budget"])
        c = next(s["constraint"] for s in searches if s["threat"] == t)
        obj = next(s["objective"] for s in searches if s["threat"] == t)
        ax.set_xlim(0.5, budget + 0.5)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if obj in RATE_METRICS:
            ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"best {obj} so far, {t} ({bound_text(c)})", fontsize=9)
        ax.set_xlabel("trials")
        ax.set_ylabel(obj)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_png(fig, path)
    return True


__all__ = [
    "GRID_IMAGES",
    "band_limits",
    "curve_file",
    "image_grids",
    "plot_best_so_far",
    "plot_curves",
]
