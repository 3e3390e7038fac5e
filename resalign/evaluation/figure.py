"""The one way a report figure reaches disk: laid out, written atomically as PNG, closed.

Every plot of the report, the frontier, the resurgence strip and the predictor scatter ends here,
so the resolution and the atomic write are decided once (a reader of the report folder never
sees half a PNG, and figures are closed so a long grid report does not accumulate them).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_open

DPI = 110


def save_png(fig: Any, path: Path, *, rect: Sequence[float] | None = None) -> None:
    """Lay out ``fig`` (within ``rect`` when given), write it to ``path`` atomically, close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout(rect=rect)  # None: matplotlib's default, the whole figure
    with atomic_open(path) as f:
        fig.savefig(f, dpi=DPI, format="png")
    plt.close(fig)
