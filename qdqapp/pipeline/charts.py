"""Charts of ``qdq run``'s report that need more than a bar call.

The calibrator comparison puts close metrics side by side (91.79, 91.83, 91.86 against an
FP32 of 91.78), often with one calibrator far below the rest (entropy at 80.37). Drawn
from zero, or on an axis that takes in the outlier, the close bars look identical; so
the axis is zoomed to the close ones, a value far below them is drawn clipped at the
left edge and marked "off scale", and every value is printed at its bar. Nothing is
drawn over the bars: the FP32 reference is a dashed line named in the title, not in a
legend.
"""

from __future__ import annotations

from matplotlib.figure import Figure

__all__ = ["calibrator_figure", "zoomed_range"]

#: a value is off scale when the rest sit this many times closer together than it is
_OUTLIER = 4.0


def zoomed_range(values: list[float], unit: float) -> tuple[float, float, list[float]]:
    """``(low, high, off_scale)``: an axis range that separates the close values, and the
    values left below it. The lowest value is dropped while the range with it is more than
    ``_OUTLIER`` times the range without it (``unit``, the smallest difference that
    matters, bounds the latter from below); two values always stay."""
    kept = sorted(values)
    off: list[float] = []
    while len(kept) > 2 and (kept[-1] - kept[0]) > _OUTLIER * max(kept[-1] - kept[1], unit):
        off.append(kept.pop(0))
    low, high = kept[0], kept[-1]
    pad = max(0.15 * (high - low), 2 * unit)
    return low - pad, high + pad, off


def calibrator_figure(rows: list[dict], best: str, fp32: float | None, digits: int,
                      metric_name: str | None) -> Figure:
    """Horizontal bars of each calibrator's metric (``rows``: ``method``, ``metric``; the
    failed ones left out), the best in green, FP32 as a dashed line."""
    rows = [r for r in rows if r["metric"] is not None]
    names = [r["method"] for r in rows]
    values = [float(r["metric"]) for r in rows]
    unit = 10.0 ** -digits
    low, high, _ = zoomed_range(values + ([fp32] if fp32 is not None else []), unit)
    room = 0.12 * (high - low)  # for the value printed after the longest bar
    fig = Figure(figsize=(7.5, 0.45 * len(rows) + 1.5))
    ax = fig.subplots()
    colors = ["tab:green" if n == best else "tab:blue" for n in names]
    ax.barh(names, values, color=colors)
    ax.set_xlim(low, high + room)
    box = {"facecolor": "white", "edgecolor": "none", "pad": 1}  # over the FP32 line
    for y, v in enumerate(values):
        off = v < low
        ax.annotate(f"< {v:.{digits}f} (off scale)" if off else f"{v:.{digits}f}",
                    (low if off else v, y), xytext=(3, 0), textcoords="offset points",
                    va="center", ha="left", fontsize=9, color="tab:red" if off else "black",
                    bbox=box, zorder=5)
    title = f"Calibrators (best: {best})"
    if fp32 is not None:
        ax.axvline(fp32, color="black", linestyle="--", linewidth=1)
        title += f"; dashed line: FP32 {fp32:.{digits}f}"
    ax.invert_yaxis()
    ax.set_xlabel(f"{metric_name or 'metric'} (higher is better; axis zoomed to the values)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
