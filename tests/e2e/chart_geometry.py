"""Do the dashboard's charts read right in the page? Axis orientation and heatmap labels, read from the DOM.

A bqplot figure draws each axis as an SVG ``g.axis`` (its ``path.domain`` is the axis line, each ``g.tick`` a
tick with its text) and its plot area as ``rect.plotarea_background``; a GridHeatMap draws one ``g.heatmaprow``
per row of its colour matrix, in the matrix's order, each holding that row's ``rect.heatmapcell``s. From their
on-screen boxes (``getBoundingClientRect``, so every transform counts) :func:`axis_problems` says what a person
would see wrong:

- the step axis (the horizontal one) must lie along the bottom edge of the plot area, its tick labels in a row
  below it, values growing left to right;
- every value axis must stand on the left (or right) edge, its tick labels in a column beside it, values growing
  upwards; a value axis drawn along the bottom (ipywidgets 7 + bqplot 0.12, issue 20) is reported;
- the heatmap's row labels must each sit inside the band of their row, and its column labels under their
  column.

Used by the browser tests of every front end (JupyterLab, and the classic Notebook 6 with Colab's widgets).
"""

from __future__ import annotations

import itertools
import re
import time
from typing import Any

# Everything measured in one evaluate: per figure, the plot area, each axis (its line's box, its label, its ticks'
# text boxes and texts) and, for a heatmap, each row's and each column's band of cells.
_READ_FIGURES = """() => [...document.querySelectorAll('.lw-dashboard .bqplot')].map(fig => {
  const box = (el) => { const r = el.getBoundingClientRect();
                        return {x: r.x, y: r.y, w: r.width, h: r.height, cx: r.x + r.width / 2, cy: r.y + r.height / 2}; };
  const title = fig.querySelector('.mainheading');
  const bg = fig.querySelector('rect.plotarea_background');
  const axes = [...fig.querySelectorAll('g.axis')].filter(a => a.querySelector('path.domain')).map(a => {
    const label = a.querySelector('text.axislabel');
    return {
      line: box(a.querySelector('path.domain')),
      label: label ? label.textContent : '',
      ticks: [...a.querySelectorAll('g.tick')].map(t => t.querySelector('text'))
               .filter(t => t && t.textContent !== '').map(t => ({text: t.textContent, ...box(t)})),
    };
  });
  const rows = [...fig.querySelectorAll('g.heatmaprow')].map(r =>
    [...r.querySelectorAll('rect.heatmapcell')].map(box));
  return {title: title ? title.textContent : '', plot: bg ? box(bg) : null, axes, rows};
})"""

_SI = {"µ": 1e-6, "u": 1e-6, "m": 1e-3, "": 1.0, "k": 1e3, "M": 1e6, "G": 1e9}
_NUMBER = re.compile(r"^([-+−]?\d*\.?\d+(?:e[-+]?\d+)?)([µumkMG]?)$")


def tick_value(text: str) -> float | None:
    """The number a tick label shows (``"1.5k"``, ``"5.0e-4"``, ``"−2"``), or None for a name."""
    m = _NUMBER.match(text.strip())
    if m is None:
        return None
    return float(m.group(1).replace("−", "-")) * _SI[m.group(2)]


def read_figures(page: Any) -> list[dict[str, Any]]:
    """Every figure of the dashboard(s) on the page, as measured in the DOM (see the module docstring)."""
    return list(page.evaluate(_READ_FIGURES))


def _increasing(values: list[float]) -> bool:
    return all(b > a for a, b in itertools.pairwise(values))


def _axis_problems(name: str, axis: dict[str, Any], plot: dict[str, Any], numeric: bool = True) -> list[str]:
    """What is wrong with one axis of a figure whose plot area is ``plot``; ``numeric``: its tick labels are
    values that must grow along it (a heatmap's are names, checked against its rows and columns instead)."""
    line, ticks, tol = axis["line"], axis["ticks"], 3.0
    what = f"{name}: axis {axis['label']!r}"
    horizontal = line["w"] > line["h"]
    if horizontal:
        problems = [] if abs(line["y"] + line["h"] - plot["y"] - plot["h"]) <= 8 + tol else [
            f"{what} is horizontal but not along the plot's bottom edge (y {line['y']:.0f}, plot bottom "
            f"{plot['y'] + plot['h']:.0f})"]  # fmt: skip
        if ticks and max(t["cy"] for t in ticks) - min(t["cy"] for t in ticks) > tol:
            problems.append(f"{what}: tick labels not in one row")
        if ticks and min(t["y"] for t in ticks) < plot["y"] + plot["h"] - tol:
            problems.append(f"{what}: tick labels inside the plot, not below it")
        values = [v for t in sorted(ticks, key=lambda t: t["cx"]) if (v := tick_value(t["text"])) is not None]
        if numeric and len(values) >= 2 and not _increasing(values):
            problems.append(f"{what}: values do not grow left to right: {values}")
        return problems
    left = abs(line["x"] + line["w"] - plot["x"]) <= 8 + tol
    right = abs(line["x"] - plot["x"] - plot["w"]) <= 8 + tol
    problems = [] if left or right else [f"{what} is vertical but on neither side of the plot"]
    if line["h"] < 0.9 * plot["h"]:
        problems.append(f"{what}: spans {line['h']:.0f} px of the plot's {plot['h']:.0f}")
    if ticks and max(t["x"] + t["w"] for t in ticks) - min(t["x"] + t["w"] for t in ticks) > tol and left:
        problems.append(f"{what}: tick labels not right-aligned in one column")
    values = [v for t in sorted(ticks, key=lambda t: -t["cy"]) if (v := tick_value(t["text"])) is not None]
    if numeric and len(values) >= 2 and not _increasing(values):
        problems.append(f"{what}: values do not grow upwards: {values}")
    return problems


def _heatmap_problems(
    name: str, fig: dict[str, Any], row_names: list[str], x_axis: dict[str, Any]
) -> list[str]:
    """Each row's label inside its row's band, in the matrix's order; each column's label under its column."""
    rows = [r for r in fig["rows"] if r]
    y_axes = [a for a in fig["axes"] if a["line"]["h"] >= a["line"]["w"]]
    if not rows or not y_axes:
        return [f"{name}: no heatmap rows or no row axis drawn"]
    labels = {t["text"]: t for t in y_axes[0]["ticks"]}
    problems = []
    for i, cells in enumerate(rows[: len(row_names)]):
        top, bottom = min(c["y"] for c in cells), max(c["y"] + c["h"] for c in cells)
        tick = labels.get(row_names[i])
        if tick is None:
            problems.append(f"{name}: row {i} ({row_names[i]!r}) has no label; labels: {sorted(labels)}")
        elif not top <= tick["cy"] <= bottom:
            problems.append(
                f"{name}: label {row_names[i]!r} at y {tick['cy']:.0f}, its row spans {top:.0f}-{bottom:.0f}"
            )
    for tick, cell in zip(sorted(x_axis["ticks"], key=lambda t: t["cx"]), rows[0], strict=False):
        left, right = cell["x"], cell["x"] + cell["w"]
        if not left <= tick["cx"] <= right:
            problems.append(
                f"{name}: column label {tick['text']!r} at x {tick['cx']:.0f}, its column {left:.0f}-{right:.0f}"
            )
    return problems


def axis_problems(
    page: Any, x_labels: dict[str, str], heatmap_rows: list[str] | None = None, figures: int = 6
) -> list[str]:
    """What reads wrong in the dashboard's charts; an empty list when every axis is where a reader looks.

    Every figure (``figures`` of them) must have exactly one horizontal axis, labelled as ``x_labels`` says for
    its title's prefix (``{"Loss": "step"}``), and every other axis vertical. ``heatmap_rows``: the row names
    the heatmap must show, top to bottom, once it has been drawn.
    """
    found = read_figures(page)
    problems = [] if len(found) == figures else [f"{len(found)} figures in the page, expected {figures}"]
    for fig in found:
        name = fig["title"][:40]
        x_label = next((label for prefix, label in x_labels.items() if fig["title"].startswith(prefix)), None)
        if x_label is None:
            problems.append(f"a figure titled {name!r} is not one of {sorted(x_labels)}")
            continue
        if fig["plot"] is None or fig["plot"]["h"] <= 0:
            problems.append(f"{name}: no plot area")
            continue
        horizontal = [a for a in fig["axes"] if a["line"]["w"] > a["line"]["h"]]
        if [a["label"] for a in horizontal] != [x_label]:
            problems.append(
                f"{name}: horizontal axes {[a['label'] for a in horizontal]}, expected [{x_label!r}]"
            )
        for axis in fig["axes"]:
            problems += _axis_problems(name, axis, fig["plot"], numeric=not fig["rows"])
        if heatmap_rows is not None and fig["rows"] and len(horizontal) == 1:
            problems += _heatmap_problems(name, fig, heatmap_rows, horizontal[0])
    return problems


def settled_axis_problems(
    page: Any, x_labels: dict[str, str], heatmap_rows: list[str] | None = None, timeout_s: float = 10.0
) -> list[str]:
    """:func:`axis_problems` once the charts have settled: read again every 250 ms until nothing reads wrong or
    ``timeout_s`` has passed; the last reading's problems. bqplot lays its axes out after the plot areas exist
    (under Notebook 6 with Colab's widgets, once, an axis line still had no width when first read), so one early
    reading can catch a chart half drawn; a chart that stays wrong is still reported."""
    deadline = time.monotonic() + timeout_s
    while True:
        problems = axis_problems(page, x_labels, heatmap_rows)
        if not problems or time.monotonic() > deadline:
            return problems
        page.wait_for_timeout(250)


_SPECTRUM = "singular values σ_i of ΔW = (alpha/r) B A"
DASHBOARD_X_LABELS = {
    "Loss": "step",
    "Learning rate": "step",
    "Memory": "step",
    "GPU memory": "step",
    "Throughput": "step",
    "||ΔW||": "module",
    "One adapter": _SPECTRUM,
    "layer ": _SPECTRUM,
}
"""The dashboard's figures (by the start of their title) and the label of the axis along their bottom."""
