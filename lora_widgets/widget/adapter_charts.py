"""Is LoRA learning? A layers-by-module heatmap of ``||dW||/||W||`` and the detail of one adapter.

Both figures draw one :class:`~lora_widgets.events.types.AdapterStats` event: the last of the run, at the dashboard's
next flush, so they change only when the trainer measures (the first update, every evaluation, the last
update), and at most once per :data:`REDRAW_S` seconds however often it evaluates (the run's last statistics
are always drawn when it ends): four messages per redraw, nothing in between. Rows are block indices (layer 0 on top), columns the adapted
module kinds in the usual order (q, k, v, o, gate, up, down, then the others); a cell that is not adapted stays
grey; up to 64 cells have their value written in them. Clicking a cell (before any click: the adapter that
moved most) shows its detail beside the heatmap: the singular values of ``dW = scaling * B A`` (Hu et al. 2021, "LoRA",
arXiv:2106.09685, sec. 7.2: one or two large values mean the update's intrinsic rank is small, so a smaller r
would do; a flat spectrum that r may be limiting), the gradient norms of A and B and the size of the last
update. The figures own their marks and update them in place under ``hold_sync``, re-sending only what changed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from bqplot import Bars, ColorScale, Figure, GridHeatMap, LinearScale, OrdinalScale
from bqplot.traits import array_from_json, array_to_json
from ipywidgets import GridBox, Layout
from traittypes import Array

from lora_widgets.events.types import AdapterLayerStats, AdapterStats
from lora_widgets.widget.axes import category_axis, value_axis
from lora_widgets.widget.charts import CHART_WIDTH_PX, SMOOTH_COLOR

__all__ = ["HEATMAP_COLORS", "AdapterCharts", "Heatmap", "heatmap_of"]

HEATMAP_COLORS = ("#f7fbff", "#9ecae1", "#2171b5")
"""White (no change) to blue (the largest ``||dW||/||W||`` drawn), from ColorBrewer's Blues; dark enough for the
values written in the cells to stay readable."""
NULL_COLOR = "#e5e7eb"
_MODULE_ORDER = ("q", "k", "v", "qkv", "o", "out", "gate", "up", "down", "fc1", "fc2", "wi", "wo")
_MARGIN = {"top": 36, "bottom": 46, "left": 56, "right": 16}
_CELL_TEXT_MAX = 64  # cells with their value written in them: more would be unreadable
REDRAW_S = 10.0
"""Seconds between two redraws while a run trains (fast runs evaluate every second or two: issue 11's budget
of 10 messages per second leaves the heatmap no more than this)."""
# A cell that is not adapted is NaN: bqplot's colour scale gives it no fill, and dashboard.css paints it grey.


def _module_key(kind: str) -> int:
    short = kind.rsplit(".", 1)[-1].removesuffix("_proj")
    return _MODULE_ORDER.index(short) if short in _MODULE_ORDER else len(_MODULE_ORDER)


class Heatmap:
    """One AdapterStats as a matrix: ``rows`` (block indices as text; ``"other"`` for a layer outside the
    blocks), ``columns`` (module kinds), ``values`` ``[rows, columns]`` of ``||dW||/||W||`` (NaN: not adapted),
    and the layer behind each ``(row, column)`` cell."""

    def __init__(self, stats: AdapterStats) -> None:
        blocks = sorted({x.layer for x in stats.layers}, key=lambda v: (v is None, v if v is not None else 0))
        kinds = sorted(dict.fromkeys(x.module for x in stats.layers), key=_module_key)  # stable: first seen
        self.rows = [str(b) if b is not None else "other" for b in blocks]
        self.columns = list(kinds)
        self.values = np.full((len(blocks), len(kinds)), np.nan, dtype=np.float32)  # [rows, columns]
        self.cells: dict[tuple[int, int], AdapterLayerStats] = {}
        for x in stats.layers:
            cell = (blocks.index(x.layer), kinds.index(x.module))
            self.values[cell] = x.relative_update
            self.cells[cell] = x

    def largest(self) -> tuple[int, int] | None:
        """The cell of the adapter that moved most (finite values only)."""
        finite = {c: x.relative_update for c, x in self.cells.items() if math.isfinite(x.relative_update)}
        return max(finite, key=lambda c: finite[c]) if finite else None


def heatmap_of(stats: AdapterStats) -> Heatmap:
    """The heatmap matrix of ``stats`` (what the dashboard and the static summary draw)."""
    return Heatmap(stats)


def _mark_data(values: np.ndarray, rows: list[str], columns: list[str]) -> tuple[np.ndarray, ...]:
    """(color, row, column) for the GridHeatMap: bqplot squeezes its colour array, so a matrix with a single row
    or column (or the empty placeholder) gets a blank, grey one added to stay two-dimensional."""
    if values.shape[0] < 2:
        values, rows = np.vstack([values, np.full((1, values.shape[1]), np.nan, np.float32)]), [*rows, " "]
    if values.shape[1] < 2:
        values, columns = (
            np.hstack([values, np.full((values.shape[0], 1), np.nan, np.float32)]),
            [*columns, " "],
        )
    return values, np.array(rows), np.array(columns)


_EMPTY = _mark_data(np.full((1, 1), np.nan, dtype=np.float32), [""], [""])


def _cells_from_json(value: Any, widget: Any = None) -> np.ndarray | None:
    """``[[row, column], ...]`` as the browser sends a click, as an int array (bqplot makes it an object array)."""
    if isinstance(value, list):
        return np.asarray(value, dtype=np.int32).reshape(-1, 2)  # [cells, 2]
    return array_from_json(value, widget)


class _GridHeatMap(GridHeatMap):
    """bqplot's GridHeatMap with a ``selected`` that survives a click: bqplot 0.13 reads the browser's
    ``[[row, column]]`` into an object array that its own serializer then refuses (``ValueError: Unsupported
    dtype object`` in the kernel, and no change event), so the selection is read as integers here."""

    selected = Array(None, allow_none=True).tag(sync=True, to_json=array_to_json, from_json=_cells_from_json)


def _fmt(x: float | None) -> str:
    """``1.8e-1``: short enough for the detail's one-line title."""
    if x is None:
        return "–"
    return f"{x:.1e}".replace("e-0", "e-").replace("e+0", "e+") if math.isfinite(x) else str(x)


def _figure(title: str, marks: list[Any], axes: list[Any], font: str = "13px") -> Figure:
    return Figure(
        title=title, marks=marks, axes=axes, fig_margin=dict(_MARGIN), animation_duration=0,
        title_style={"font-size": font}, layout=Layout(width="100%", height="300px", min_width="280px"),
    )  # fmt: skip


class AdapterCharts:
    """The heatmap and the detail figure (see the module docstring); :meth:`update` draws an AdapterStats."""

    def __init__(self) -> None:
        rows, columns = OrdinalScale(reverse=True), OrdinalScale()
        self._color = ColorScale(min=0.0, colors=list(HEATMAP_COLORS))
        self.heatmap = _GridHeatMap(
            color=_EMPTY[0], row=_EMPTY[1], column=_EMPTY[2],
            scales={"row": rows, "column": columns, "color": self._color}, null_color=NULL_COLOR,
            stroke="white", interactions={"click": "select"}, selected_style={"stroke": "#d62728", "stroke-width": 3},
            font_style={"font-size": "10px"}, visible=False,
        )  # fmt: skip
        # visible=False until the first statistics: the empty placeholder's cells are NaN, drawn grey
        self.heatmap_figure = _figure(
            "||ΔW|| / ||W|| per adapter: appears at the first update",
            [self.heatmap],
            [value_axis(rows, label="layer"), category_axis(columns, label="module")],
        )  # fmt: skip
        sv_x, sv_y = OrdinalScale(), LinearScale(min=0.0)
        self.spectrum = Bars(x=np.zeros(0, dtype=np.int32), y=np.zeros(0, dtype=np.float32),
                             scales={"x": sv_x, "y": sv_y}, colors=[SMOOTH_COLOR], padding=0.15)  # fmt: skip
        self._detail_axis = category_axis(sv_x, label="singular values σ_i of ΔW = (alpha/r) B A")
        self.detail_figure = _figure(
            "One adapter: click a cell of the heatmap",
            [self.spectrum],
            [self._detail_axis, value_axis(sv_y, tick_format=".1e")],
            font="12px",
        )
        self.stats: AdapterStats | None = None
        self.map: Heatmap | None = None
        self._drawn_at = -math.inf
        self.heatmap.observe(lambda _change: self._show_detail(), names=["selected"])

    def grid(self) -> GridBox:
        """The two figures side by side (stacked when narrow), as the dashboard's other charts."""
        columns = f"repeat(auto-fit, minmax({CHART_WIDTH_PX}px, 1fr))"
        return GridBox(children=self.figures, layout=Layout(grid_template_columns=columns, width="100%"))

    @property
    def figures(self) -> list[Figure]:
        """The heatmap, then the detail."""
        return [self.heatmap_figure, self.detail_figure]

    def update(self, stats: AdapterStats | None, now: float | None = None) -> None:
        """Draw ``stats`` (a run's last AdapterStats; nothing is sent when it is the one already drawn). With
        ``now`` (the flush clock's time, while a run trains), not sooner than :data:`REDRAW_S` after the last
        redraw: a later flush draws it."""
        if stats is self.stats or (now is not None and now - self._drawn_at < REDRAW_S):
            return
        self.stats, self._drawn_at = stats, -math.inf if now is None else now
        if stats is None or not stats.layers:
            self.clear()
            return
        new = heatmap_of(stats)
        reshaped = self.map is None or (new.rows, new.columns) != (self.map.rows, self.map.columns)
        self.map = new
        with self.heatmap.hold_sync():
            if reshaped:  # the colour first: the row and column validators check their length against it
                self.heatmap.selected = None
                color, row, column = _mark_data(new.values, new.rows, new.columns)
                self.heatmap.color = color
                self.heatmap.row, self.heatmap.column = row, column
                written = color.size <= _CELL_TEXT_MAX and not np.isnan(color).any()  # d3 writes NaN as "NaN"
                self.heatmap.display_format = ".1e" if written else None
                self.heatmap.visible = True
                self.heatmap_figure.layout.height = f"{min(600, max(300, 90 + 22 * len(new.rows)))}px"
            else:
                self.heatmap.color = _mark_data(new.values, new.rows, new.columns)[0]
        finite = new.values[np.isfinite(new.values)]
        top = f"{float(finite.max()):.1e}" if finite.size else "–"
        # bqplot draws a vertical colour bar 200 px shorter than the plot: the title states the scale instead
        self.heatmap_figure.title = f"||ΔW|| / ||W|| per adapter, step {stats.step}: white 0, darkest {top}"
        self._show_detail()

    def clear(self) -> None:
        """Back to the empty figures (a new run starts)."""
        self.stats, self.map = None, None
        with self.heatmap.hold_sync():
            self.heatmap.selected = None
            self.heatmap.color = _EMPTY[0]
            self.heatmap.row, self.heatmap.column = _EMPTY[1], _EMPTY[2]
            self.heatmap.visible = False
        self.heatmap_figure.title = "||ΔW|| / ||W|| per adapter: appears at the first update"
        self._show_detail()

    def selected_layer(self) -> AdapterLayerStats | None:
        """The adapter the detail shows: the clicked cell, else the one that moved most."""
        if self.map is None:
            return None
        chosen = self.heatmap.selected
        if chosen is not None and len(chosen):
            cell = (int(chosen[0][0]), int(chosen[0][1]))
            if cell in self.map.cells:
                return self.map.cells[cell]
        largest = self.map.largest()
        return self.map.cells[largest] if largest is not None else None

    def _show_detail(self) -> None:
        layer = self.selected_layer()
        if layer is None:
            x, y = np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float32)
            title = "One adapter: click a cell of the heatmap"
        else:
            y = np.asarray(layer.singular_values, dtype=np.float32)  # [r]
            x = np.arange(1, y.size + 1, dtype=np.int32)
            where = f"layer {layer.layer}" if layer.layer is not None else layer.name
            title = (f"{where} {layer.module}: ΔW/W {_fmt(layer.relative_update)} · grad A {_fmt(layer.a_grad_norm)}"
                     f" B {_fmt(layer.b_grad_norm)} · last update {_fmt(layer.update_ratio)}")  # fmt: skip
        if not (np.array_equal(x, self.spectrum.x) and np.array_equal(y, self.spectrum.y)):
            with self.spectrum.hold_sync():
                self.spectrum.x, self.spectrum.y = x, y
        self.detail_figure.title = title  # one message for the words; the axis label stays
