"""The dashboard's bqplot charts: they own their marks, and are updated in place from a run's history.

Which points each line holds is decided by :mod:`lora_widgets.widget.chart_model` (shared with the SVG charts
drawn in marimo); this module only puts them on bqplot marks.

The dashboard calls :meth:`Charts.update` with a :class:`~lora_widgets.events.history.History`; only the charts
touch their marks. Every update sets a mark's ``x`` and ``y`` together inside ``mark.hold_sync()``, so the
browser gets one message per mark and never sees an x of one length with a y of another, and a mark is
re-sent only when its data changed (the learning-rate schedule, drawn from the settings, is sent once).
Figures are never rebuilt: a finished run is overlaid by *adding* one labelled line to the loss figure.

What one update costs the network is bounded, whatever the run's length: a line holds at most
:data:`POINTS_PER_LINE` points, one per pixel column of a chart's plot area (min-max buckets of
:func:`~lora_widgets.events.history.decimate_indices` keep every spike), and arrays are sent as float32 (y) and
int32 (x), half the bytes of float64; a chart a few hundred pixels high needs no more than 7 digits.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from bqplot import Axis, Figure, LinearScale, Lines, LogScale, Scatter
from ipywidgets import GridBox, Layout

from lora_widgets.events.history import History
from lora_widgets.widget.axes import category_axis, value_axis
from lora_widgets.widget.chart_model import (
    Series,
    as_x,
    as_y,
    eval_series,
    loss_domain,
    lr_marker_series,
    overlay_series,
    schedule_series,
    step_series,
)

__all__ = ["CHART_WIDTH_PX", "MAX_MARKERS", "PALETTE", "POINTS_PER_LINE", "Charts", "set_xy"]

PALETTE = ("#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
"""Colours of overlaid previous runs (matplotlib's tab10 without the current run's blue and red)."""

RAW_COLOR = "#9ecae1"
SMOOTH_COLOR = "#1f77b4"
VAL_COLOR = "#d62728"
MAX_OVERLAID_RUNS = 12
EMPTY_STEPS = 10.0
"""The step axis of an empty memory or throughput chart spans 0 to this."""

_EMPTY_X = np.zeros(0, dtype=np.int32)
_EMPTY_Y = np.zeros(0, dtype=np.float32)
_MARGIN = {"top": 36, "bottom": 40, "left": 62, "right": 16}

CHART_WIDTH_PX = 440
"""Narrowest width of a chart (the dashboard's grid gives each figure at least this many pixels)."""
POINTS_PER_LINE = CHART_WIDTH_PX - _MARGIN["left"] - _MARGIN["right"]
"""Points per line: one per pixel column of the narrowest plot area (362)."""
MAX_MARKERS = 200
"""Validation dots: each is an SVG element in the page (a line's points are not), so they are capped lower;
the best validation loss always survives the min-max decimation."""


_xs, _ys = as_x, as_y


def _figure(title: str, marks: list[Any], axes: list[Axis], legend: bool = False) -> Figure:
    return Figure(
        title=title,
        marks=marks,
        axes=axes,
        fig_margin=dict(_MARGIN),
        animation_duration=0,
        # bqplot sizes the legend box in em of its text length and, at "top-right", shifts it left by that
        # width in 16-px ems, so a long run label pushed it past the plot's left edge (clipped in JupyterLab).
        # Anchored top-left it starts inside the plot; the box's font size makes its em match the text.
        legend_location="top-left",
        legend_style={"fill": "white", "fill-opacity": 0.85, "stroke": "#ccc", "font-size": "11px"}
        if legend
        else {},
        legend_text={"font-size": "11px"} if legend else {},
        layout=Layout(width="100%", height="270px", min_width="280px"),
    )


def set_xy(mark: Any, x: Any, y: Any) -> None:
    """Set a mark's data in one message (``hold_sync``), as int32 x and float32 y."""
    with mark.hold_sync():
        mark.x = _xs(x)
        mark.y = _ys(y)


class Charts:
    """Four figures: loss (raw, smoothed, validation, previous runs), LR schedule, memory, tokens/s.

    ``points_per_line`` and ``max_markers`` bound what one update sends (see the module docstring).
    """

    def __init__(
        self, gpu: bool = False, points_per_line: int = POINTS_PER_LINE, max_markers: int = MAX_MARKERS
    ) -> None:
        self.points_per_line = points_per_line
        self.max_markers = max_markers
        self._sent: tuple[int, int] = (0, 0)  # (steps, evaluations) of the history last drawn
        self.gpu = gpu
        self._placeholders: list[tuple[LinearScale, float]] = []  # (scale, its empty-chart maximum)
        self._build_loss()
        self._build_lr()
        self._build_memory(gpu)
        self._build_throughput()
        self._hold_empty_domains()

    def _build_loss(self) -> None:
        """The loss figure: raw and smoothed training loss, validation dots, earlier runs overlaid."""
        self._loss_x = LinearScale()
        self._loss_y_linear = LinearScale()
        self._loss_y_log = LogScale()
        self.log_scale = False
        ys = self._loss_y_linear
        self.raw_loss = Lines(
            x=_EMPTY_X, y=_EMPTY_Y, scales={"x": self._loss_x, "y": ys}, colors=[RAW_COLOR],
            stroke_width=1, labels=["train loss"], display_legend=True,
        )  # fmt: skip
        self.smooth_loss = Lines(
            x=_EMPTY_X, y=_EMPTY_Y, scales={"x": self._loss_x, "y": ys}, colors=[SMOOTH_COLOR],
            stroke_width=2.5, labels=["smoothed"], display_legend=True,
        )  # fmt: skip
        self.val_loss = Scatter(
            x=_EMPTY_X, y=_EMPTY_Y, scales={"x": self._loss_x, "y": ys}, colors=[VAL_COLOR],
            default_size=36, stroke="white", labels=["validation"], display_legend=True,
        )  # fmt: skip
        self.previous_runs: list[Lines] = []
        self._data_range: tuple[float, float] | None = None  # finite min/max of everything on the loss chart
        self._loss_y_axis = value_axis(ys, label="loss (nats)", tick_format=".3g")
        self.loss_figure = _figure(
            "Loss",
            [self.raw_loss, self.smooth_loss, self.val_loss],
            [category_axis(self._loss_x, tick_format="~s"), self._loss_y_axis],
            legend=True,
        )

    def _build_lr(self) -> None:
        """The learning-rate figure: the whole schedule (previewed, or logged) and a marker at the step."""
        lr_x, lr_y = LinearScale(), LinearScale(min=0.0)
        self.lr_line = Lines(x=_EMPTY_X, y=_EMPTY_Y, scales={"x": lr_x, "y": lr_y}, colors=["#555"])
        self.lr_marker = Scatter(
            x=_EMPTY_X, y=_EMPTY_Y, scales={"x": lr_x, "y": lr_y}, colors=[SMOOTH_COLOR], default_size=64
        )
        self.lr_figure = _figure(
            "Learning rate",
            [self.lr_line, self.lr_marker],
            [
                category_axis(lr_x, tick_format="~s"),
                value_axis(lr_y, tick_format=".1e"),
            ],
        )

    def _build_memory(self, gpu: bool) -> None:
        """The memory figure: process RSS on a CPU; allocated, reserved and utilisation on a GPU."""
        mem_x, mem_y = LinearScale(), LinearScale(min=0.0)
        self._placeholders += [(mem_x, EMPTY_STEPS), (mem_y, 1024.0)]  # steps, MiB
        self.memory = Lines(
            x=_EMPTY_X, y=_EMPTY_Y, scales={"x": mem_x, "y": mem_y}, colors=["#2ca02c"],
            labels=["GPU allocated" if gpu else "process RSS"], display_legend=gpu,
        )  # fmt: skip
        self.memory_reserved = Lines(
            x=_EMPTY_X, y=_EMPTY_Y, scales={"x": mem_x, "y": mem_y}, colors=["#98df8a"],
            line_style="dashed", labels=["GPU reserved"], display_legend=gpu,
        )  # fmt: skip
        mem_marks: list[Any] = [self.memory, self.memory_reserved]
        mem_axes = [
            category_axis(mem_x, tick_format="~s"),
            value_axis(mem_y, label="MiB" if gpu else "process RSS (MiB)", tick_format="~s"),
        ]
        util_y = LinearScale(min=0.0, max=100.0)
        self.gpu_util = Lines(
            x=_EMPTY_X, y=_EMPTY_Y, scales={"x": mem_x, "y": util_y}, colors=["#bcbd22"],
            stroke_width=1, labels=["GPU util %"], display_legend=gpu,
        )  # fmt: skip
        if gpu:
            mem_marks.append(self.gpu_util)
            mem_axes.append(value_axis(util_y, side="right", label="util %"))
        self.memory_figure = _figure(
            "GPU memory" if gpu else "Memory (CPU)", mem_marks, mem_axes, legend=True
        )

    def _build_throughput(self) -> None:
        """The throughput figure: smoothed tokens per second."""
        tps_x, tps_y = LinearScale(), LinearScale(min=0.0)
        self._placeholders += [(tps_x, EMPTY_STEPS), (tps_y, 1000.0)]  # steps, tokens/s
        self.tokens_per_s = Lines(x=_EMPTY_X, y=_EMPTY_Y, scales={"x": tps_x, "y": tps_y}, colors=["#9467bd"])
        self.tokens_figure = _figure(
            "Throughput",
            [self.tokens_per_s],
            [
                category_axis(tps_x, tick_format="~s"),
                value_axis(tps_y, label="tokens/s (smoothed)", tick_format="~s"),
            ],
        )

    def grid(self) -> GridBox:
        """The figures in a grid, each at least :data:`CHART_WIDTH_PX` wide (so lines match their pixels)."""
        columns = f"repeat(auto-fit, minmax({CHART_WIDTH_PX}px, 1fr))"
        return GridBox(children=self.figures, layout=Layout(grid_template_columns=columns, width="100%"))

    @property
    def figures(self) -> list[Figure]:
        """The four figures, in display order."""
        return [self.loss_figure, self.lr_figure, self.memory_figure, self.tokens_figure]

    @property
    def marks(self) -> list[Any]:
        """Every mark that a flush may update (for counting and tests)."""
        return [
            self.raw_loss,
            self.smooth_loss,
            self.val_loss,
            self.lr_line,
            self.lr_marker,
            self.memory,
            self.memory_reserved,
            self.gpu_util,
            self.tokens_per_s,
            *self.previous_runs,
        ]

    def _hold_empty_domains(self) -> None:
        """Give the memory and throughput charts a fixed domain (steps 0 to 10, 0 to 1 GiB, 0 to 1,000 tokens/s)
        while they have no data: an empty bqplot scale spans [0, 1], which ``~s`` ticks read "100m ... 900m, 1"
        on the step axis."""
        for scale, top in self._placeholders:
            with scale.hold_sync():
                scale.min, scale.max = 0.0, top

    def _release_empty_domains(self) -> None:
        """Let the memory and throughput charts fit their data (the first steps arrived)."""
        for scale, _top in self._placeholders:
            if scale.max is not None:
                scale.max = None

    # --- updates ------------------------------------------------------------------------------------
    def update(self, history: History) -> None:
        """Draw what ``history`` holds that was not drawn yet: the current run's lines, dots and LR marker.

        Nothing is sent when nothing changed; each changed mark gets one message (x and y together).
        """
        n, n_evals = len(history), len(history.eval_step)
        if (n, n_evals) == self._sent:
            return
        if n != self._sent[0]:
            self._draw_steps(history)
        if n_evals != self._sent[1]:
            dots = eval_series(history, self.max_markers)
            set_xy(self.val_loss, dots.x, dots.y)
        self._sent = (n, n_evals)
        self.fit_loss_range(self.raw_loss.y, self.val_loss.y)

    def _draw_steps(self, h: History) -> None:
        self._release_empty_domains()
        lines = step_series(h, self.points_per_line, self.gpu)
        for name in ("raw_loss", "smooth_loss", "memory", "memory_reserved", "gpu_util", "tokens_per_s"):
            if name in lines:
                set_xy(getattr(self, name), lines[name].x, lines[name].y)
        marker = lines["lr_marker"]
        self._set_marker(marker)

    def set_schedule(self, schedule: tuple[Any, Any] | None) -> None:
        """Draw the whole learning-rate schedule ``(steps, rates)`` (decimated to the chart's width); sent
        only when it changed. ``None`` (settings that make no schedule) leaves the chart as it is."""
        if schedule is None:
            return
        line = schedule_series(schedule, self.points_per_line)
        if np.array_equal(line.x, self.lr_line.x) and np.array_equal(line.y, self.lr_line.y):
            return
        set_xy(self.lr_line, line.x, line.y)

    def set_lr_marker(self, step: int | None, lr: float | None) -> None:
        """Move the live marker to the current step (or hide it with ``None``)."""
        self._set_marker(lr_marker_series(step, lr))

    def _set_marker(self, marker: Series) -> None:
        if not (np.array_equal(marker.x, self.lr_marker.x) and np.array_equal(marker.y, self.lr_marker.y)):
            set_xy(self.lr_marker, marker.x, marker.y)

    def clear_current(self) -> None:
        """Empty the current run's marks (a new run starts)."""
        for mark in (self.raw_loss, self.smooth_loss, self.val_loss, self.memory, self.memory_reserved,
                     self.gpu_util, self.tokens_per_s):  # fmt: skip
            if len(mark.x):
                set_xy(mark, _EMPTY_X, _EMPTY_Y)
        self.set_lr_marker(None, None)
        self._hold_empty_domains()
        self._sent = (0, 0)

    def label_current(self, label: str) -> None:
        """Label the current run's smoothed line with its configuration (shown in the legend)."""
        self.smooth_loss.labels = [label]

    def overlay_run(self, label: str, history: History) -> None:
        """Keep a finished run on the loss chart as one labelled, dashed line of its smoothed loss (a sweep
        compares these). Dashed and drawn over the current run's solid line, so a rerun with the same settings,
        whose curve coincides, still shows both."""
        if len(history) == 0:
            return
        line = overlay_series(history, self.points_per_line)
        color = PALETTE[len(self.previous_runs) % len(PALETTE)]
        scale = self._loss_y_log if self.log_scale else self._loss_y_linear
        line = Lines(
            x=line.x, y=line.y, scales={"x": self._loss_x, "y": scale}, colors=[color],
            stroke_width=2, opacities=[0.9], line_style="dashed", labels=[label], display_legend=True,
        )  # fmt: skip
        self.previous_runs.append(line)
        if len(self.previous_runs) > MAX_OVERLAID_RUNS:
            self.previous_runs.pop(0)
        self.loss_figure.marks = [*self.previous_runs, self.raw_loss, self.smooth_loss, self.val_loss]

    def fit_loss_range(self, *arrays: Any) -> None:
        """Set the loss y range to the data plus headroom at the top, so the legend covers no line.

        The headroom grows with the number of legend entries. Scales are only touched when the range moves
        by more than 2% of its span, so a steady run sends no extra messages.
        """
        lo, hi = math.inf, -math.inf
        for a in [*(line.y for line in self.previous_runs), *arrays]:
            y = np.asarray(a, dtype=np.float64)
            y = y[np.isfinite(y)]
            if y.size:
                lo, hi = min(lo, float(y.min())), max(hi, float(y.max()))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return
        self._data_range = (lo, hi)
        self._apply_loss_range()

    def _apply_loss_range(self) -> None:
        if self._data_range is None:
            return
        new = loss_domain([self._data_range], len(self.previous_runs), self.log_scale)
        if new is None:
            return
        scale = self._loss_y_log if self.log_scale else self._loss_y_linear
        lo, hi = self._data_range
        tol = 0.02 * ((new[1] - new[0]) if self.log_scale else max(hi - lo, 1e-6))
        old = (scale.min, scale.max)
        if old[0] is None or old[1] is None or abs(old[0] - new[0]) > tol or abs(old[1] - new[1]) > tol:
            with scale.hold_sync():
                scale.min, scale.max = float(new[0]), float(new[1])

    def set_log_scale(self, log: bool) -> None:
        """Swap the loss chart's y scale between linear and logarithmic (marks and axis together)."""
        if log == self.log_scale:
            return
        self.log_scale = log
        scale = self._loss_y_log if log else self._loss_y_linear
        with self.loss_figure.hold_sync():
            for mark in [*self.previous_runs, self.raw_loss, self.smooth_loss, self.val_loss]:
                mark.scales = {"x": self._loss_x, "y": scale}
            self._loss_y_axis.scale = scale
        self._apply_loss_range()
