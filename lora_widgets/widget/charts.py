"""The dashboard's bqplot charts, built once and updated in place, plus a static SVG of the loss curve.

Every update sets a mark's ``x`` and ``y`` together inside ``mark.hold_sync()``, so the browser gets one
message per mark per flush and never sees an x of one length with a y of another. Figures are never
rebuilt: a finished run is overlaid by *adding* one labelled line to the loss figure.

Arrays are sent as float32 (y) and int32 (x), halving the bytes of bqplot's binary buffers compared with
float64; a chart is a few hundred pixels wide, so 7 significant digits are more than enough.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from bqplot import Axis, Figure, LinearScale, Lines, LogScale, Scatter
from ipywidgets import Layout

__all__ = ["PALETTE", "Charts", "loss_curve_svg"]

PALETTE = ("#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
"""Colours of overlaid previous runs (matplotlib's tab10 without the current run's blue and red)."""

RAW_COLOR = "#9ecae1"
SMOOTH_COLOR = "#1f77b4"
VAL_COLOR = "#d62728"
MAX_OVERLAID_RUNS = 12

_EMPTY_X = np.zeros(0, dtype=np.int32)
_EMPTY_Y = np.zeros(0, dtype=np.float32)
_MARGIN = {"top": 36, "bottom": 40, "left": 62, "right": 16}


def _xs(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).astype(np.int32)


def _ys(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def _figure(title: str, marks: list[Any], axes: list[Axis], legend: bool = False) -> Figure:
    return Figure(
        title=title,
        marks=marks,
        axes=axes,
        fig_margin=dict(_MARGIN),
        animation_duration=0,
        legend_location="top-right",
        legend_style={"fill": "white", "fill-opacity": 0.85, "stroke": "#ccc"} if legend else {},
        legend_text={"font-size": "11px"} if legend else {},
        layout=Layout(width="100%", height="270px", min_width="280px"),
    )


def set_xy(mark: Any, x: Any, y: Any) -> None:
    """Set a mark's data in one message (``hold_sync``), as int32 x and float32 y."""
    with mark.hold_sync():
        mark.x = _xs(x)
        mark.y = _ys(y)


class Charts:
    """Four figures: loss (raw, smoothed, validation, previous runs), LR schedule, memory, tokens/s."""

    def __init__(self, gpu: bool = False) -> None:
        # --- loss ---------------------------------------------------------------------------------
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
        self._loss_y_axis = Axis(scale=ys, side="left", label="loss (nats)", tick_format=".3g")
        self.loss_figure = _figure(
            "Loss",
            [self.raw_loss, self.smooth_loss, self.val_loss],
            [Axis(scale=self._loss_x, label="step", tick_format="~s"), self._loss_y_axis],
            legend=True,
        )
        # --- learning rate -------------------------------------------------------------------------
        lr_x, lr_y = LinearScale(), LinearScale(min=0.0)
        self.lr_line = Lines(x=_EMPTY_X, y=_EMPTY_Y, scales={"x": lr_x, "y": lr_y}, colors=["#555"])
        self.lr_marker = Scatter(
            x=_EMPTY_X, y=_EMPTY_Y, scales={"x": lr_x, "y": lr_y}, colors=[SMOOTH_COLOR], default_size=64
        )
        self.lr_figure = _figure(
            "Learning rate",
            [self.lr_line, self.lr_marker],
            [
                Axis(scale=lr_x, label="step", tick_format="~s"),
                Axis(scale=lr_y, side="left", tick_format=".1e"),
            ],
        )
        # --- memory --------------------------------------------------------------------------------
        mem_x, mem_y = LinearScale(), LinearScale(min=0.0)
        self.gpu = gpu
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
            Axis(scale=mem_x, label="step", tick_format="~s"),
            Axis(scale=mem_y, side="left", label="MiB" if gpu else "process RSS (MiB)", tick_format="~s"),
        ]
        util_y = LinearScale(min=0.0, max=100.0)
        self.gpu_util = Lines(
            x=_EMPTY_X, y=_EMPTY_Y, scales={"x": mem_x, "y": util_y}, colors=["#bcbd22"],
            stroke_width=1, labels=["GPU util %"], display_legend=gpu,
        )  # fmt: skip
        if gpu:
            mem_marks.append(self.gpu_util)
            mem_axes.append(Axis(scale=util_y, side="right", label="util %"))
        self.memory_figure = _figure(
            "GPU memory" if gpu else "Memory (CPU)", mem_marks, mem_axes, legend=True
        )
        # --- throughput ----------------------------------------------------------------------------
        tps_x, tps_y = LinearScale(), LinearScale(min=0.0)
        self.tokens_per_s = Lines(x=_EMPTY_X, y=_EMPTY_Y, scales={"x": tps_x, "y": tps_y}, colors=["#9467bd"])
        self.tokens_figure = _figure(
            "Throughput",
            [self.tokens_per_s],
            [
                Axis(scale=tps_x, label="step", tick_format="~s"),
                Axis(scale=tps_y, side="left", label="tokens/s (smoothed)", tick_format="~s"),
            ],
        )

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

    # --- updates ------------------------------------------------------------------------------------
    def set_schedule(self, steps: Any, lrs: Any) -> None:
        """Draw the whole learning-rate schedule (before training starts, and at each run start)."""
        set_xy(self.lr_line, steps, lrs)

    def set_lr_marker(self, step: int | None, lr: float | None) -> None:
        """Move the live marker to the current step (or hide it with ``None``)."""
        if step is None or lr is None or not math.isfinite(lr):
            set_xy(self.lr_marker, _EMPTY_X, _EMPTY_Y)
        else:
            set_xy(self.lr_marker, [step], [lr])

    def clear_current(self) -> None:
        """Empty the current run's marks (a new run starts)."""
        for mark in (self.raw_loss, self.smooth_loss, self.val_loss, self.memory, self.memory_reserved,
                     self.gpu_util, self.tokens_per_s):  # fmt: skip
            set_xy(mark, _EMPTY_X, _EMPTY_Y)
        self.set_lr_marker(None, None)

    def label_current(self, label: str) -> None:
        """Label the current run's smoothed line with its configuration (shown in the legend)."""
        self.smooth_loss.labels = [label]

    def overlay_run(self, label: str, steps: Any, smoothed: Any) -> None:
        """Keep a finished run on the loss chart as one labelled line (a rank sweep compares these)."""
        if len(steps) == 0:
            return
        color = PALETTE[len(self.previous_runs) % len(PALETTE)]
        scale = self._loss_y_log if self.log_scale else self._loss_y_linear
        line = Lines(
            x=_xs(steps), y=_ys(smoothed), scales={"x": self._loss_x, "y": scale}, colors=[color],
            stroke_width=1.5, opacities=[0.85], labels=[label], display_legend=True,
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
        lo, hi = self._data_range
        headroom = min(2.0, 0.2 * (3 + len(self.previous_runs)) + 0.1)  # legend rows ~ 20% of the span each
        if self.log_scale:
            if lo <= 0:
                return
            a, b = math.log10(lo), math.log10(hi)
            span = max(b - a, 1e-3)
            new = (10 ** (a - 0.03 * span), 10 ** (b + headroom * span))
            scale, tol = self._loss_y_log, 0.02 * (new[1] - new[0])
        else:
            span = max(hi - lo, 1e-6)
            new = (lo - 0.03 * span, hi + headroom * span)
            scale, tol = self._loss_y_linear, 0.02 * span
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


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def loss_curve_svg(
    steps: Sequence[float] | np.ndarray,
    loss: Sequence[float] | np.ndarray,
    smoothed: Sequence[float] | np.ndarray | None = None,
    val_steps: Sequence[float] | np.ndarray = (),
    val_loss: Sequence[float] | np.ndarray = (),
    title: str = "Training loss",
    width: int = 640,
    height: int = 260,
) -> str:
    """A self-contained SVG of the loss curve (no matplotlib): raw and smoothed polylines, validation dots.

    Used for the static summary that stays in a saved notebook where widgets do not render (GitHub,
    nbconvert HTML, nbval). Non-finite points are dropped.
    """
    left, right, top, bottom = 58, 14, 28, 36
    pw, ph = width - left - right, height - top - bottom
    s = np.asarray(steps, dtype=np.float64)
    y = np.asarray(loss, dtype=np.float64)
    sm = None if smoothed is None else np.asarray(smoothed, dtype=np.float64)
    vs = np.asarray(val_steps, dtype=np.float64)
    vl = np.asarray(val_loss, dtype=np.float64)
    pool = [y[np.isfinite(y)], vl[np.isfinite(vl)]]
    if sm is not None:
        pool.append(sm[np.isfinite(sm)])
    every = np.concatenate(pool) if pool else np.zeros(0)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="18" font-size="13" font-weight="bold">{html.escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>',
    ]
    if every.size == 0 or s.size == 0:
        parts.append(f'<text x="{left + 8}" y="{top + 20}">no data</text></svg>')
        return "".join(parts)
    x0, x1 = float(np.nanmin(s)), float(np.nanmax(s))
    if vs.size:
        x0, x1 = min(x0, float(vs.min())), max(x1, float(vs.max()))
    y0, y1 = float(every.min()), float(every.max())
    if x1 == x0:
        x1 = x0 + 1.0
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def px(a: np.ndarray) -> np.ndarray:
        return left + (a - x0) / (x1 - x0) * pw

    def py(a: np.ndarray) -> np.ndarray:
        return top + (1.0 - (a - y0) / (y1 - y0)) * ph

    def polyline(xs: np.ndarray, ys: np.ndarray, color: str, w: float) -> str:
        ok = np.isfinite(xs) & np.isfinite(ys)
        pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(px(xs[ok]), py(ys[ok]), strict=True))
        return f'<polyline fill="none" stroke="{color}" stroke-width="{w}" points="{pts}"/>'

    parts.append(polyline(s, y, RAW_COLOR, 1.0))
    if sm is not None:
        parts.append(polyline(s, sm, SMOOTH_COLOR, 2.0))
    ok = np.isfinite(vs) & np.isfinite(vl)
    for a, b in zip(px(vs[ok]), py(vl[ok]), strict=True):
        parts.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3.5" fill="{VAL_COLOR}"/>')
    for value in (y0, (y0 + y1) / 2, y1):
        yy = float(py(np.array([value]))[0])
        parts.append(f'<text x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end">{_fmt(value)}</text>')
    for value in (x0, x1):
        xx = float(px(np.array([value]))[0])
        parts.append(f'<text x="{xx:.1f}" y="{top + ph + 16}" text-anchor="middle">{int(value)}</text>')
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{height - 4}" text-anchor="middle">step</text>')
    lx = left + pw - 190
    legend = [
        (RAW_COLOR, "train loss"),
        (SMOOTH_COLOR, "smoothed"),
        (VAL_COLOR, "validation"),
    ]
    for i, (color, name) in enumerate(legend):
        parts.append(
            f'<rect x="{lx + i * 64}" y="{top + 6}" width="10" height="10" fill="{color}"/>'
            f'<text x="{lx + i * 64 + 13}" y="{top + 15}">{name}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
