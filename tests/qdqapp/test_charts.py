"""The calibrator chart of ``qdq run``: close values told apart, nothing over a bar.

The numbers are the reference model's demo run (BENCHMARKS.md): five calibrators within
0.07 points of each other and FP32, entropy 11 points below. The old chart drew the axis
around all of them, so the five bars looked the same, and its legend sat over the last
bar's value.
"""

from __future__ import annotations

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.patches import Rectangle

from qdqapp.pipeline.charts import calibrator_figure, zoomed_range

DEMO = [("max", 91.79), ("entropy", 80.37), ("percentile-99.9", 91.80),
        ("percentile-99.99", 91.83), ("percentile-99.999", 91.82), ("mse", 91.86)]


def _figure():
    rows = [{"method": m, "metric": v} for m, v in DEMO] + [{"method": "bad", "metric": None}]
    fig = calibrator_figure(rows, "mse", 91.78, 2, "top-1 accuracy (%)")
    FigureCanvasAgg(fig).draw()
    return fig, fig.axes[0]


def test_close_values_get_distinct_bars_and_the_outlier_is_marked():
    fig, ax = _figure()
    low, high = ax.get_xlim()
    assert low > 80.37 and high - low < 0.3                       # zoomed to the five
    bars = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_height() < 1]
    assert len(bars) == 6                                          # the failed row left out
    # what is seen of each bar: from the axis' left edge to its value, in pixels
    seen = {name: ax.transData.transform((max(v, low), 0))[0]
            - ax.transData.transform((low, 0))[0] for name, v in DEMO}
    close = sorted(v for k, v in seen.items() if k != "entropy")
    assert min(b - a for a, b in zip(close, close[1:], strict=False)) > 10  # 0.01: > 10 px
    assert seen["entropy"] == 0
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["91.79", "< 80.37 (off scale)", "91.80", "91.83", "91.82", "91.86"]
    assert "FP32 91.78" in ax.get_title()


def test_nothing_covers_a_bar_or_a_value():
    fig, ax = _figure()
    assert ax.get_legend() is None and not fig.legends
    renderer = fig.canvas.get_renderer()
    labels = [t.get_window_extent(renderer) for t in ax.texts]
    bars = [p.get_window_extent(renderer) for p in ax.patches if p.get_height() < 1]
    for i, label in enumerate(labels):
        assert not any(label.overlaps(bar) for bar in bars), ax.texts[i].get_text()
        assert not any(label.overlaps(other) for other in labels[i + 1:])
        assert ax.get_window_extent(renderer).contains(label.x1 - 1, label.y0 + 1)


@pytest.mark.parametrize("values, off", [([1.0, 2.0, 3.0], []), ([0.5, 91.8, 91.9], [0.5]),
                                         ([10.0, 91.7, 91.8, 91.9], [10.0])])
def test_zoomed_range_drops_only_far_outliers(values, off):
    low, high, dropped = zoomed_range(values, 0.01)
    assert dropped == off
    kept = [v for v in values if v not in off]
    assert low < min(kept) and high > max(kept)
