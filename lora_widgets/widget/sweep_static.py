"""What a saved notebook shows of a sweep where widgets do not render: the table and a scatter, as HTML + SVG.

Reads the rows of :class:`~lora_widgets.widget.sweep_state.SweepBoard` (plain dicts), never the widget.
The scatter puts one setting on the x axis (log scale for a learning rate, or any positive setting spanning
a factor of 20 or more) against each run's best validation loss; the best run is drawn larger.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

__all__ = ["log_axis", "scatter_svg", "table_html"]

W, H, PAD = 420, 260, 46


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)


def table_html(rows: Sequence[dict[str, Any]], best_index: int | None, message: str = "") -> str:
    """The runs as an HTML table (settings, seed, best validation loss, mean ± spread over seeds, steps,
    time, adapter size, outcome), the best run in bold."""
    head = "<tr><th>#</th><th>settings</th><th>seed</th><th>best val</th><th>mean ± sd</th><th>steps</th>"
    head += "<th>time s</th><th>adapter KB</th><th>outcome</th></tr>"
    body = []
    for r in rows:
        settings = ", ".join(f"{k}={_fmt(v)}" for k, v in r["settings"].items())
        mean = "" if r["mean_val"] is None else f"{r['mean_val']:.4f}"
        if r["std_val"] is not None:
            mean += f" ± {r['std_val']:.4f}"
        cells = [r["index"], settings, r["seed"], "" if r["best_val"] is None else f"{r['best_val']:.4f}", mean,
                 "" if r["step"] is None else r["step"], "" if r["elapsed_s"] is None else f"{r['elapsed_s']:.1f}",
                 "" if r["adapter_bytes"] is None else f"{r['adapter_bytes'] / 1024:.0f}",
                 r["outcome"] + (f" ({r['reason']})" if r["reason"] else "")]  # fmt: skip
        style = ' style="font-weight:bold;background:#e8f5e9"' if r["index"] == best_index else ""
        title = f' title="{html.escape(r["message"])}"' if r["message"] else ""
        body.append(
            f"<tr{style}{title}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>"
        )
    caption = f"<caption>{html.escape(message)}</caption>" if message else ""
    return (
        f'<table class="lw-sweep-table">{caption}<thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'
    )


def log_axis(setting: str, values: Sequence[float]) -> bool:
    """A log x axis for a learning rate, or for positive values spanning a factor of 20 or more."""
    if not values or min(values) <= 0:
        return False
    return setting.endswith("learning_rate") or max(values) / min(values) >= 20


def scatter_svg(rows: Sequence[dict[str, Any]], setting: str, best_index: int | None) -> str:
    """Best validation loss of each run against ``setting`` (numeric settings only); empty without points."""
    pts = [(float(r["settings"][setting]), r["best_val"], r["index"]) for r in rows
           if isinstance(r["settings"].get(setting), int | float) and r["best_val"] is not None]  # fmt: skip
    if not pts:
        return ""
    log = log_axis(setting, [p[0] for p in pts])
    xs = [math.log10(p[0]) if log else p[0] for p in pts]
    ys = [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x0, x1 = (x0 - 0.5, x1 + 0.5) if x0 == x1 else (x0, x1)
    y0, y1 = (y0 - 0.05, y1 + 0.05) if y0 == y1 else (y0, y1)

    def sx(x: float) -> float:
        return PAD + (x - x0) / (x1 - x0) * (W - 2 * PAD)

    def sy(y: float) -> float:
        return H - PAD - (y - y0) / (y1 - y0) * (H - 2 * PAD)

    dots = "".join(
        f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{7 if i == best_index else 4}" '
        f'fill="{"#2e7d32" if i == best_index else "#1565c0"}" fill-opacity="0.8"><title>run {i}: {y:.4f}</title></circle>'
        for x, y, i in zip(xs, ys, (p[2] for p in pts), strict=True)
    )
    xl = [x0, x1]
    ticks = "".join(
        f'<text x="{sx(x):.1f}" y="{H - PAD + 16}" text-anchor="middle" font-size="11">'
        f"{_fmt(10**x if log else x)}</text>"
        for x in xl
    )
    ticks += "".join(
        f'<text x="{PAD - 6}" y="{sy(y) + 4:.1f}" text-anchor="end" font-size="11">{y:.3f}</text>'
        for y in (y0, y1)
    )
    axis = f"{setting} (log scale)" if log else setting
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}">'
        f'<rect width="{W}" height="{H}" fill="white"/>'
        f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="#888"/>'
        f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="#888"/>'
        f"{ticks}{dots}"
        f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle" font-size="12">{html.escape(axis)}</text>'
        f'<text x="12" y="{H / 2}" text-anchor="middle" font-size="12" transform="rotate(-90 12 {H / 2})">'
        "best validation loss</text></svg>"
    )
