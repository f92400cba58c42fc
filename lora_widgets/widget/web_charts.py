"""The dashboard's charts for hosts where bqplot does not render (marimo): the chart model, sent to its own SVG.

marimo renders anywidget widgets but not classic ipywidgets (marimo-team/marimo#5099), so there the dashboard
is one anywidget, :class:`WebDashboardPanel`: the panel's traits plus the charts' data, drawn as SVG by
``static/charts.js`` (shipped in the package, nothing fetched at run time). :class:`WebCharts` and
:class:`WebAdapterCharts` offer the methods the dashboard calls on the bqplot ones
(:class:`~lora_widgets.widget.charts.Charts`, :class:`~lora_widgets.widget.adapter_charts.AdapterCharts`) and take
their points from the same functions (:mod:`lora_widgets.widget.chart_model`), so both hosts show the same
points for a run.

Traffic, per flush: one message (``chart_live``: the current run's lines as int32/float32 binary buffers),
plus ``chart_evals`` (validation dots), ``chart_fixed`` (the schedule and earlier runs) and ``chart_axes`` (log
scale, loss range) only when they change; the heatmap as bqplot's, at most once per :data:`~lora_widgets.widget.adapter_charts.REDRAW_S`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import traitlets as t

from lora_widgets.events import AdapterLayerStats, AdapterStats
from lora_widgets.events.history import History
from lora_widgets.widget.adapter_charts import HEATMAP_COLORS, NULL_COLOR, REDRAW_S, Heatmap, heatmap_of
from lora_widgets.widget.chart_model import (
    Series,
    eval_series,
    loss_domain,
    lr_marker_series,
    overlay_series,
    schedule_series,
    step_series,
)
from lora_widgets.widget.charts import MAX_MARKERS, MAX_OVERLAID_RUNS, PALETTE, POINTS_PER_LINE
from lora_widgets.widget.panel import DashboardPanel

__all__ = ["WebAdapterCharts", "WebCharts", "WebDashboardPanel", "compose_esm", "wire"]

_STATIC = Path(__file__).parent / "static"


def compose_esm(*paths: Path) -> str:
    """One ES module from several anywidget modules, each rendered into its own ``<div>`` of the view.

    Each file is a module whose only export is ``export default { render }`` and that imports nothing (the
    dashboard's own files); its text is wrapped in a function scope, so their top-level names cannot clash.
    anywidget loads one module per widget: this lets the chart renderer stay a file of its own.
    """
    parts, names = [], []
    for i, path in enumerate(paths):
        text = path.read_text(encoding="utf-8")
        if text.count("export default") != 1 or re.search(r"^\s*import\b", text, re.MULTILINE):
            raise ValueError(f"{path.name}: expected one 'export default {{ render }}' and no imports")
        parts.append(f"const m{i} = (() => {{\n{text.replace('export default', 'return')}\n}})();")
        names.append(f"m{i}")
    calls = "\n".join(
        f"  {{ const d = document.createElement('div'); el.appendChild(d); "
        f"const c = {n}.render({{ model, el: d }}); if (typeof c === 'function') cleanups.push(c); }}"
        for n in names
    )
    return "\n".join(parts) + (
        "\nfunction render({ model, el }) {\n  const cleanups = [];\n"
        f"{calls}\n  return () => cleanups.forEach((c) => c());\n}}\nexport default {{ render }};\n"
    )


def wire(series: Series) -> dict[str, memoryview]:
    """A series as the browser gets it: binary buffers (ipywidgets sends bytes in a trait as buffers)."""
    return {"x": np.ascontiguousarray(series.x).data, "y": np.ascontiguousarray(series.y).data}


class WebDashboardPanel(DashboardPanel):
    """The dashboard as one anywidget: the panel (``dashboard.js``) with the charts under it (``charts.js``)."""

    _esm = compose_esm(_STATIC / "dashboard.js", _STATIC / "charts.js")
    _css = (_STATIC / "dashboard.css").read_text(encoding="utf-8") + (_STATIC / "charts.css").read_text(
        encoding="utf-8"
    )

    chart_live = t.Dict(
        help="The current run's series by name ({x: int32 bytes, y: float32 bytes}), label, gpu."
    ).tag(sync=True)
    chart_evals = t.Dict(
        help="The validation dots ({val_loss: {x, y}}), sent when an evaluation adds one."
    ).tag(sync=True)
    chart_fixed = t.Dict(help="The learning-rate schedule and the earlier runs' smoothed losses.").tag(
        sync=True
    )
    chart_axes = t.Dict(help="log: the loss axis is logarithmic; loss_domain: [lo, hi] or null.").tag(
        sync=True
    )
    adapter_map = t.Dict(
        help="The ||dW||/||W|| heatmap (rows, columns, values float32 bytes row-major, colors, title) and the "
        "detail of the selected adapter (title, singular values float32 bytes)."
    ).tag(sync=True)


class WebCharts:
    """The line charts' data for :class:`WebDashboardPanel`: the bqplot :class:`Charts`' methods, other renderer.

    :attr:`series` (the current run's lines), :attr:`schedule` and :attr:`overlays` hold what was last sent,
    as :class:`~lora_widgets.widget.chart_model.Series`.
    """

    def __init__(
        self,
        panel: WebDashboardPanel,
        gpu: bool = False,
        points_per_line: int = POINTS_PER_LINE,
        max_markers: int = MAX_MARKERS,
    ) -> None:
        self.panel, self.gpu = panel, gpu
        self.points_per_line, self.max_markers = points_per_line, max_markers
        self.series: dict[str, Series] = {}
        self.schedule = Series.empty()
        self.overlays: list[tuple[str, str, Series]] = []
        self.log_scale = False
        self.label = ""
        self.domain: tuple[float, float] | None = None
        self._sent: tuple[int, int] = (0, 0)

    def update(self, history: History) -> None:
        """Send what ``history`` holds that was not sent yet (one message; none when nothing changed)."""
        n, n_evals = len(history), len(history.eval_step)
        if (n, n_evals) == self._sent:
            return
        if n_evals != self._sent[1]:  # apart: the dots change at evaluations only
            self.series["val_loss"] = eval_series(history, self.max_markers)
            self.panel.chart_evals = {"val_loss": wire(self.series["val_loss"])}
        if n != self._sent[0] and n:
            self._send_live({**self.series, **step_series(history, self.points_per_line, self.gpu)})
        self._sent = (n, n_evals)
        self._fit()

    def set_schedule(self, schedule: tuple[Any, Any] | None) -> None:
        """Draw a whole learning-rate schedule (``None``: leave it); sent only when it changed."""
        if schedule is None:
            return
        line = schedule_series(schedule, self.points_per_line)
        if not line.same_as(self.schedule):
            self.schedule = line
            self._send_fixed()

    def set_lr_marker(self, step: int | None, lr: float | None) -> None:
        """Move the live marker on the schedule (or hide it)."""
        marker = lr_marker_series(step, lr)
        if not marker.same_as(self.series.get("lr_marker", Series.empty())):
            self._send_live({**self.series, "lr_marker": marker})

    def clear_current(self) -> None:
        """Empty the current run's lines (a new run starts)."""
        self._sent = (0, 0)
        if self.series:
            self._send_live({})
            self.panel.chart_evals = {}

    def label_current(self, label: str) -> None:
        """Name the current run's smoothed line in the legend."""
        self.label = label
        self._send_live(self.series)

    def overlay_run(self, label: str, history: History) -> None:
        """Keep a finished run's smoothed loss on the loss chart, labelled (at most 12 are kept)."""
        if len(history) == 0:
            return
        color = PALETTE[len(self.overlays) % len(PALETTE)]
        self.overlays.append((label, color, overlay_series(history, self.points_per_line)))
        del self.overlays[:-MAX_OVERLAID_RUNS]
        self._send_fixed()
        self._fit()

    def set_log_scale(self, log: bool) -> None:
        """Show the loss on a logarithmic axis (or back to linear)."""
        if log != self.log_scale:
            self.log_scale = log
            self._fit(force=True)

    def _fit(self, force: bool = False) -> None:
        """The loss range from the chart model's rule; sent when it moved by more than 2% of its span."""
        arrays = [s.y for _, _, s in self.overlays]
        arrays += [self.series[k].y for k in ("raw_loss", "val_loss") if k in self.series]
        new = loss_domain(arrays, len(self.overlays), self.log_scale)
        if new is None and not force:
            return
        old = self.domain
        moved = (
            old is None
            or new is None
            or max(abs(a - b) for a, b in zip(old, new, strict=True)) > 0.02 * (new[1] - new[0])
        )
        if moved or force:
            self.domain = new
            self.panel.chart_axes = {"log": self.log_scale, "loss_domain": None if new is None else list(new)}

    def _send_live(self, series: dict[str, Series]) -> None:
        """One message; a line whose steps equal an earlier line's (smoothed and raw loss, the memory lines)
        names that line (``x_ref``) instead of sending its steps again."""
        self.series = series
        sent: dict[str, Any] = {}
        for name, line in series.items():
            if name == "val_loss":
                continue
            same = next((k for k in sent if "x" in sent[k] and np.array_equal(series[k].x, line.x)), None)
            sent[name] = wire(line) if same is None else {"x_ref": same, "y": wire(line)["y"]}
        self.panel.chart_live = {"series": sent, "label": self.label, "gpu": self.gpu}

    def _send_fixed(self) -> None:
        self.panel.chart_fixed = {
            "lr": wire(self.schedule),
            "overlays": [{"label": lab, "color": c, **wire(s)} for lab, c, s in self.overlays],
        }


def _fmt(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.1e}".replace("e-0", "e-").replace("e+0", "e+") if math.isfinite(x) else str(x)


class WebAdapterCharts:
    """The "is LoRA learning?" heatmap and one adapter's singular values, for :class:`WebDashboardPanel`.

    Same rules as :class:`~lora_widgets.widget.adapter_charts.AdapterCharts` (the same :class:`Heatmap`, redrawn
    at most every ``REDRAW_S`` seconds while a run trains); a click on a cell arrives as the panel message
    ``{"type": "adapter_cell", "row": i, "column": j}``.
    """

    def __init__(self, panel: WebDashboardPanel) -> None:
        self.panel = panel
        self.stats: AdapterStats | None = None
        self.map: Heatmap | None = None
        self.selected: tuple[int, int] | None = None
        self._drawn_at = -math.inf
        panel.on_msg(self._on_msg)

    def update(self, stats: AdapterStats | None, now: float | None = None) -> None:
        """Draw ``stats`` (not sooner than ``REDRAW_S`` after the last redraw when ``now`` is given)."""
        if stats is self.stats or (now is not None and now - self._drawn_at < REDRAW_S):
            return
        self.stats, self._drawn_at = stats, -math.inf if now is None else now
        new = heatmap_of(stats) if stats is not None and stats.layers else None
        if new is None or self.map is None or (new.rows, new.columns) != (self.map.rows, self.map.columns):
            self.selected = None
        self.map = new
        self._send()

    def selected_layer(self) -> AdapterLayerStats | None:
        """The adapter the detail shows: the clicked cell, else the one that moved most."""
        if self.map is None:
            return None
        cell = self.selected if self.selected in self.map.cells else self.map.largest()
        return self.map.cells[cell] if cell is not None else None

    def _on_msg(self, _widget: Any, content: Any, _buffers: Any) -> None:
        if isinstance(content, dict) and content.get("type") == "adapter_cell" and self.map is not None:
            try:
                cell = (int(content.get("row", -1)), int(content.get("column", -1)))
            except (
                TypeError,
                ValueError,
            ):  # not a cell the front end sends: ignored, as a click off the cells
                return
            if cell in self.map.cells:
                self.selected = cell
                self._send()

    def _send(self) -> None:
        if self.map is None or self.stats is None:
            self.panel.adapter_map = {}
            return
        layer = self.selected_layer()
        detail: dict[str, Any] = {}
        if layer is not None:
            where = f"layer {layer.layer}" if layer.layer is not None else layer.name
            detail = {
                "title": f"{where} {layer.module}: ΔW/W {_fmt(layer.relative_update)} · grad A "
                f"{_fmt(layer.a_grad_norm)} B {_fmt(layer.b_grad_norm)} · last update {_fmt(layer.update_ratio)}",
                "y": np.ascontiguousarray(layer.singular_values, dtype=np.float32).data,  # [r]
            }
        finite = self.map.values[np.isfinite(self.map.values)]
        self.panel.adapter_map = {
            "rows": self.map.rows,
            "columns": self.map.columns,
            "values": np.ascontiguousarray(self.map.values, dtype=np.float32).data,  # [rows * columns]
            "max": float(finite.max()) if finite.size else None,
            "colors": list(HEATMAP_COLORS),
            "null_color": NULL_COLOR,
            "step": self.stats.step,
            "selected": list(self.selected) if self.selected is not None else None,
            "detail": detail,
        }
