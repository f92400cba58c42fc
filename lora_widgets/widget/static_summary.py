"""What a saved notebook shows where widgets do not render: a table of runs, the loss curve, is LoRA learning.

GitHub, nbconvert HTML and nbval keep a cell's outputs but not live widgets, so the dashboard's own output
carries this summary as its ``text/html`` fallback, beside the widget's view in one mimebundle (an HTML table,
then inline SVGs, no matplotlib needed): the runs' outcomes with the last run's alerts and sample answers, its
loss curve, and the heatmap of its last adapter statistics (``||dW||/||W||`` by layer and module). A front end
that renders widgets shows the widget instead, so the summary never repeats the live charts under them; when a
run ends the output is updated in place (by display id). It reads plain
:class:`~lora_widgets.widget.record.RunRecord` objects, never the dashboard.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from IPython.display import display, update_display

from lora_widgets.events.history import decimate_indices
from lora_widgets.events.types import AdapterStats
from lora_widgets.widget.adapter_charts import HEATMAP_COLORS, NULL_COLOR, heatmap_of
from lora_widgets.widget.charts import RAW_COLOR, SMOOTH_COLOR, VAL_COLOR
from lora_widgets.widget.data_view import facts_rows
from lora_widgets.widget.readouts import ENDED_LEGEND
from lora_widgets.widget.record import RunRecord
from lora_widgets.widget.view import view_bundle

__all__ = [
    "StaticSummary",
    "StaticSummaryViews",
    "adapter_heatmap_svg",
    "data_table_html",
    "learning_html",
    "loss_curve_svg",
    "run_curve_svg",
    "summary_table_html",
]

SVG_POINTS = 600
"""Points of the static loss curve (a 640-pixel-wide image)."""


def summary_table_html(
    runs: Iterable[RunRecord], summary: Mapping[str, Any], data: Mapping[str, Any] | None = None
) -> str:
    """One row per run (state, steps, time, final train loss, best validation loss, perplexity, adapter path),
    under a line naming the device and the trainable-parameter share from the panel's ``summary``; then the
    data's facts (:func:`lora_widgets.widget.data_view.data_facts`: examples, truncated and dropped rows,
    % tokens trained, % padding) when ``data`` has them."""
    rows = []
    for run in runs:
        res = run.result
        state = "running" if res is None else res.kind
        final = "–" if run.final_loss is None else f"{run.final_loss:.4f}"
        best = run.best_val_loss
        best_s = "–" if best is None else f"{best:.4f}"
        ppl = "–" if best is None else f"{math.exp(best):.2f}"
        steps = "–" if res is None else str(res.step)
        secs = "–" if res is None else f"{res.elapsed_s:.1f}"
        adapter = html.escape(res.adapter_path or "–") if res else "–"
        rows.append(
            f"<tr><td>{html.escape(run.label)}</td><td>{state}</td><td>{steps}</td><td>{secs}</td>"
            f"<td>{final}</td><td>{best_s}</td><td>{ppl}</td><td><code>{adapter}</code></td></tr>"
        )
    head = (
        "<tr><th>run</th><th>state</th><th>steps</th><th>time (s)</th><th>final train loss</th>"
        "<th>best val loss</th><th>perplexity</th><th>adapter</th></tr>"
    )
    device = html.escape(str(summary.get("device_name") or summary.get("device") or ""))
    params = ""
    if summary.get("total"):
        params = (
            f"; trainable parameters {summary.get('trainable', 0):,} of {summary['total']:,} "
            f"({summary.get('trainable_pct', 0.0):.2f}%)"
        )
    return (
        f"<div class='lora-dashboard-summary'><b>LoRA dashboard: static summary</b> "
        f"(device {device}{params})<table>{head}{''.join(rows)}</table>{data_table_html(data or {})}</div>"
    )


def data_table_html(facts: Mapping[str, Any]) -> str:
    """The data's facts as a two-column table (empty string without facts)."""
    lines = facts_rows(facts)
    if not lines:
        return ""
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in lines)
    return f"<table class='lora-dashboard-data'>{body}</table>"


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


def _blend(value: float, top: float) -> str:
    """The heatmap's colour of ``value`` on a linear scale from 0 to ``top`` (light to dark blue)."""
    if not math.isfinite(value):
        return NULL_COLOR
    t = min(max(value / top, 0.0), 1.0) * (len(HEATMAP_COLORS) - 1) if top > 0 else 0.0
    i = min(int(t), len(HEATMAP_COLORS) - 2)
    a = [int(HEATMAP_COLORS[i][j : j + 2], 16) for j in (1, 3, 5)]  # RGB of the stops around t
    b = [int(HEATMAP_COLORS[i + 1][j : j + 2], 16) for j in (1, 3, 5)]
    f = t - i
    return "#" + "".join(f"{round(x + (y - x) * f):02x}" for x, y in zip(a, b, strict=True))


def adapter_heatmap_svg(stats: AdapterStats | None, cell: int = 34) -> str:
    """``||dW||/||W||`` of every adapter as a small standalone SVG: rows are layers, columns module kinds (as
    the dashboard's heatmap; grey: not adapted), with each value written in its cell. Empty text without stats."""
    if stats is None or not stats.layers:
        return ""
    hm = heatmap_of(stats)
    left, top, cw = 48, 40, max(cell, 8 + 7 * max(len(c) for c in hm.columns))
    width, height = max(320, left + cw * len(hm.columns) + 12), top + cell * len(hm.rows) + 30
    finite = hm.values[np.isfinite(hm.values)]
    peak = float(finite.max()) if finite.size else 0.0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="10">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
        f'<text x="8" y="16" font-size="13" font-weight="bold">||ΔW|| / ||W|| per adapter, step {stats.step}</text>',
        f'<text x="8" y="30">white: unchanged; darkest: {_fmt(peak)}</text>',
    ]
    for j, name in enumerate(hm.columns):
        parts.append(
            f'<text x="{left + cw * j + cw / 2:.0f}" y="{height - 12}" text-anchor="middle">{html.escape(name)}</text>'
        )
    for i, row in enumerate(hm.rows):
        y = top + cell * i
        parts.append(
            f'<text x="{left - 6}" y="{y + cell / 2 + 4:.0f}" text-anchor="end">layer {html.escape(row)}</text>'
        )
        for j in range(len(hm.columns)):
            v = float(hm.values[i, j])
            fill = _blend(v, peak)
            ink = "white" if math.isfinite(v) and peak > 0 and v / peak > 0.55 else "#222"
            parts.append(
                f'<rect x="{left + cw * j}" y="{y}" width="{cw - 1}" height="{cell - 1}" fill="{fill}"/>'
            )
            if math.isfinite(v):
                parts.append(f'<text x="{left + cw * j + cw / 2:.0f}" y="{y + cell / 2 + 3:.0f}" '
                             f'text-anchor="middle" fill="{ink}">{v:.1e}</text>')  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)


def learning_html(run: RunRecord | None) -> str:
    """The run's alerts (title, evidence, fix) and its last sample answers (prompt, base, current) as HTML."""
    if run is None:
        return ""
    out = []
    for a in run.alerts:
        out.append(
            f"<p class='lora-alert lora-alert-{a.severity}'><b>{html.escape(a.title)}</b> (step {a.step}): "
            f"{html.escape(a.evidence)} <i>Fix:</i> {html.escape(a.fix)}</p>"
        )
    if run.samples is not None:
        mark = {True: " ✓", False: " ✗", None: ""}
        left = "style='text-align:left;vertical-align:top'"
        rows = "".join(
            f"<tr><td {left}><code>{html.escape(p.prompt)}</code></td><td {left}><code>{html.escape(p.base)}</code>"
            f"{mark[p.base_ended]}</td><td {left}><code>{html.escape(p.current)}</code>{mark[p.current_ended]}</td></tr>"
            for p in run.samples.samples
        )
        out.append(
            f"<table class='lora-samples'><caption {left}>{html.escape(ENDED_LEGEND)}</caption><tr><th {left}>prompt"
            f"</th><th {left}>base model</th><th {left}>current adapter @ step {run.samples.step}</th></tr>{rows}</table>"
        )
    return "".join(out)


def run_curve_svg(run: RunRecord | None) -> str:
    """The loss curve of one run (raw, smoothed, validation) as a standalone SVG."""
    if run is None:
        return loss_curve_svg([], [])
    h = run.history
    idx = decimate_indices(h.loss, SVG_POINTS)
    return loss_curve_svg(
        h.step[idx], h.loss[idx], h.smoothed_loss()[idx], h.eval_step, h.val_loss, title=run.label
    )


class StaticSummary:
    """The dashboard's output: its widget view with this summary as the ``text/html`` fallback.

    ``show()`` displays the bundle (called from the widget's ``_ipython_display_``); ``update()`` writes the
    current table, curve and heatmap into it, by display id, so the saved notebook keeps the result and a front
    end that renders widgets shows only the widget.
    """

    def __init__(
        self,
        runs: Callable[[], list[RunRecord]],
        summary: Callable[[], Mapping[str, Any]],
        data: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self._runs = runs
        self._summary = summary
        self._data = data
        self._shown: tuple[str, Any] | None = None  # (display id, the widget) once displayed

    def html(self) -> str:
        """The table of every run (and the data's facts), then the last run's alerts and sample answers."""
        runs = self._runs()
        table = summary_table_html(runs, self._summary(), self._data() if self._data else None)
        return table + learning_html(runs[-1] if runs else None)

    def heatmap_svg(self) -> str:
        """The heatmap of the last run's last adapter statistics (empty without them)."""
        runs = self._runs()
        return adapter_heatmap_svg(runs[-1].adapter_stats if runs else None)

    def svg(self) -> str:
        """The last run's loss curve."""
        runs = self._runs()
        return run_curve_svg(runs[-1] if runs else None)

    def fallback_html(self) -> str:
        """Everything a front end without widgets shows: the table, then (once a run exists) curve and heatmap."""
        if not self._runs():
            return self.html()
        return f"{self.html()}<div>{self.svg()}</div><div>{self.heatmap_svg()}</div>"

    def _bundle(self, owner: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
        bundle = view_bundle(owner)
        data, metadata = bundle if bundle is not None else ({"text/plain": repr(owner)}, None)
        return {**data, "text/html": self.fallback_html()}, metadata

    def show(self, owner: Any) -> None:
        """Display the widget's view with the summary as its fallback (once per display of the widget)."""
        display_id = f"lora-dash-{id(owner):x}-{time.time_ns():x}"
        data, metadata = self._bundle(owner)
        display(data, metadata=metadata, raw=True, display_id=display_id)
        if "application/vnd.jupyter.widget-view+json" in data and hasattr(owner, "_handle_displayed"):
            owner._handle_displayed()  # what ipywidgets' own display does after publishing the view
        self._shown = (display_id, owner)

    def update(self) -> None:
        """Write the current summary into the displayed output (nothing before the widget was displayed)."""
        if self._shown is None or not self._runs():
            return
        display_id, owner = self._shown
        data, metadata = self._bundle(owner)
        update_display(data, metadata=metadata, raw=True, display_id=display_id)


class StaticSummaryViews:
    """What a saved notebook shows of a dashboard without widgets, as methods of the dashboard (it mixes
    this in and sets ``_static``): displaying it writes the widget's view with :class:`StaticSummary`'s
    fallback, which a run's end updates."""

    _static: StaticSummary

    def _ipython_display_(self) -> None:
        """Show the widget, with the static summary as its ``text/html`` fallback (updated when a run ends)."""
        self._static.show(self)

    def static_summary_html(self) -> str:
        """An HTML table of every run's outcome (what the saved notebook shows without widgets)."""
        return self._static.html()

    def static_summary_svg(self) -> str:
        """The last run's loss curve as a standalone SVG."""
        return self._static.svg()

    def static_summary_heatmap_svg(self) -> str:
        """The last run's last ``||dW||/||W||`` heatmap as a standalone SVG (empty without adapter statistics)."""
        return self._static.heatmap_svg()
