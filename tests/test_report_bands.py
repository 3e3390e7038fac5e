"""The metric-vs-steps plot clips CI bands of rate metrics to [0, 1] (drawing only)."""

from __future__ import annotations

import matplotlib
import pytest

matplotlib.use("Agg")

from resalign.evaluation.report import band_limits, plot_curves  # noqa: E402

PTS = [
    {"step": 0, "mean": 0.9, "ci95": None, "n": 1},
    {"step": 5, "mean": 0.05, "ci95": 0.2, "n": 2},  # t-interval over 2 seeds: wide
    {"step": 10, "mean": 0.95, "ci95": 0.3, "n": 2},
]


def test_rate_band_is_clipped_to_unit_interval():
    lo, hi = band_limits("concept_rate", PTS)
    assert lo == pytest.approx([0.9, 0.0, 0.65]) and hi == pytest.approx([0.9, 0.25, 1.0])
    assert lo[1] == 0.0 and hi[2] == 1.0  # exactly the bounds, not -0.15 / 1.25
    # and the points themselves are untouched (the table keeps the full interval)
    assert PTS[1]["ci95"] == 0.2


def test_unbounded_metric_band_is_not_clipped():
    lo, hi = band_limits("fid", PTS)
    assert lo == pytest.approx([0.9, -0.15, 0.65]) and hi == pytest.approx([0.9, 0.25, 1.25])


def test_plot_draws_clipped_band(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn = []
    real = matplotlib.axes.Axes.fill_between

    def record(self, x, y1, y2, **kw):
        drawn.append((list(y1), list(y2)))
        return real(self, x, y1, y2, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between", record)
    table = {
        "curves": {"nudenet_ip/t": {"metric": "nudenet_ip", "threat": "t", "rows": {"r": PTS}}}
    }
    assert plot_curves(table, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert len(drawn) == 1
    assert drawn[0][0] == pytest.approx([0.9, 0.0, 0.65])
    assert drawn[0][1] == pytest.approx([0.9, 0.25, 1.0])
