"""The dashboard's chart model: what each chart line shows, computed once, for whichever renderer draws it.

One source of chart data for two front ends: :class:`~lora_widgets.widget.charts.Charts` puts these series on
bqplot marks (JupyterLab, Notebook 7, Colab), :class:`~lora_widgets.widget.web_charts.WebCharts` sends them to
the dashboard's own anywidget front end, which draws them as SVG (marimo, where bqplot does not render). Both
call the functions here and nothing else decides which points a line holds, so the two show the same points
for the same run (``tests/test_chart_model.py`` replays one run into both and compares the arrays).

A line holds at most ``points_per_line`` points, one per pixel column of a chart's plot area (min-max buckets of
:func:`~lora_widgets.events.history.decimate_indices` keep every spike); x is sent as int32 steps and y as float32, half
the bytes of float64 (a chart a few hundred pixels high needs no more than 7 digits).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from lora_widgets.events.history import History, decimate_indices

__all__ = [
    "Series",
    "eval_series",
    "loss_domain",
    "lr_marker_series",
    "overlay_series",
    "schedule_series",
    "step_series",
]


def as_x(values: Any) -> np.ndarray:
    """Steps as int32 (through float64: a history stores every column as float64)."""
    return np.asarray(values, dtype=np.float64).astype(np.int32)


def as_y(values: Any) -> np.ndarray:
    """Values as float32."""
    return np.asarray(values, dtype=np.float32)


@dataclass(frozen=True)
class Series:
    """One line's (or dots') points: ``x`` int32 steps ``[n]``, ``y`` float32 values ``[n]``."""

    x: np.ndarray
    y: np.ndarray

    @classmethod
    def of(cls, x: Any, y: Any) -> Series:
        """Build one from any array-likes, converted to the wire types."""
        return cls(as_x(x), as_y(y))

    @classmethod
    def empty(cls) -> Series:
        """No points."""
        return cls(np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float32))

    def same_as(self, other: Series) -> bool:
        """Whether both hold the same points (NaN equal to NaN)."""
        return np.array_equal(self.x, other.x) and np.array_equal(self.y, other.y, equal_nan=True)


def step_series(h: History, points_per_line: int, gpu: bool) -> dict[str, Series]:
    """The per-step lines of ``h`` (a non-empty history), decimated to ``points_per_line`` points each.

    Keys: ``raw_loss`` and ``smooth_loss`` (the same steps: the raw loss's min-max buckets), ``memory`` (MiB),
    ``memory_reserved`` and ``gpu_util`` only when the history has them (a GPU run), ``tokens_per_s``
    (smoothed) and ``lr_marker`` (the last step's learning rate).
    """
    steps = h.step
    idx = decimate_indices(h.loss, points_per_line)
    x = as_x(steps[idx])
    out = {"raw_loss": Series(x, as_y(h.loss[idx])), "smooth_loss": Series(x, as_y(h.smoothed_loss()[idx]))}
    mem = h.memory_bytes / 2**20  # MiB
    idx = decimate_indices(mem, points_per_line)
    out["memory"] = Series.of(steps[idx], mem[idx])
    reserved = h.memory_reserved_bytes
    if np.isfinite(reserved).any():
        out["memory_reserved"] = Series.of(steps[idx], reserved[idx] / 2**20)
    if gpu and np.isfinite(h.gpu_utilization).any():
        out["gpu_util"] = Series.of(steps[idx], h.gpu_utilization[idx])
    tps = h.tokens_per_s_smooth
    idx = decimate_indices(tps, points_per_line)
    out["tokens_per_s"] = Series.of(steps[idx], tps[idx])
    out["lr_marker"] = lr_marker_series(int(steps[-1]), float(h.lr[-1]))
    return out


def eval_series(h: History, max_markers: int) -> Series:
    """The validation dots: at most ``max_markers`` (min-max buckets keep the best one)."""
    idx = decimate_indices(h.val_loss, max_markers)
    return Series.of(h.eval_step[idx], h.val_loss[idx])


def schedule_series(schedule: tuple[Any, Any], points_per_line: int) -> Series:
    """A whole learning-rate schedule ``(steps, rates)`` decimated to the chart's width."""
    steps, lrs = schedule[0], np.asarray(schedule[1], dtype=np.float64)
    idx = decimate_indices(lrs, points_per_line)
    return Series.of(np.asarray(steps)[idx], lrs[idx])


def lr_marker_series(step: int | None, lr: float | None) -> Series:
    """The live marker on the schedule: one point, or none (no step yet, or a rate that is not finite)."""
    if step is None or lr is None or not math.isfinite(lr):
        return Series.empty()
    return Series.of([step], [lr])


def overlay_series(h: History, points_per_line: int) -> Series:
    """A finished run's smoothed loss, as it stays on the loss chart beside later runs."""
    smoothed = h.smoothed_loss()
    idx = decimate_indices(smoothed, points_per_line)
    return Series.of(h.step[idx], smoothed[idx])


def loss_domain(arrays: Iterable[Any], n_overlays: int, log: bool) -> tuple[float, float] | None:
    """The loss chart's y range: the finite data plus headroom on top, so the legend covers no line.

    The headroom grows with the legend's entries (about 20% of the span per row); on a log axis the span is
    taken in decades. ``None`` when there is nothing finite to show (or, on a log axis, a value <= 0).
    """
    lo, hi = math.inf, -math.inf
    for a in arrays:
        y = np.asarray(a, dtype=np.float64)
        y = y[np.isfinite(y)]
        if y.size:
            lo, hi = min(lo, float(y.min())), max(hi, float(y.max()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    headroom = min(2.0, 0.2 * (3 + n_overlays) + 0.1)
    if log:
        if lo <= 0:
            return None
        a, b = math.log10(lo), math.log10(hi)
        span = max(b - a, 1e-3)
        return 10 ** (a - 0.03 * span), 10 ** (b + headroom * span)
    span = max(hi - lo, 1e-6)
    return lo - 0.03 * span, hi + headroom * span
