"""Which front end the dashboard builds: bqplot figures in Jupyter and Colab, one anywidget in marimo.

marimo renders anywidget widgets but not classic ipywidgets (marimo-team/marimo#5099: bqplot figures and a
``VBox`` show "Jupyter widgets are not supported"), so under marimo the dashboard is a single
:class:`~lora_widgets.widget.web_charts.WebDashboardPanel` whose charts are SVG drawn by the package's own
``static/charts.js``; everywhere else it keeps bqplot (JupyterLab, Notebook 7, Colab). Both are fed by
:mod:`lora_widgets.widget.chart_model`. The choice is made once, when the dashboard is built: ``"auto"`` asks
:func:`in_marimo`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from lora_widgets.widget.adapter_charts import AdapterCharts
from lora_widgets.widget.charts import Charts
from lora_widgets.widget.panel import DashboardPanel

__all__ = ["RENDERERS", "FrontEnd", "MarimoDisplay", "build_front_end", "in_marimo", "resolve_renderer"]

RENDERERS = ("auto", "bqplot", "svg")
"""``renderer=`` values: ``"auto"`` (svg under marimo, else bqplot), ``"bqplot"``, ``"svg"``."""


def in_marimo() -> bool:
    """True inside a running marimo notebook or app (``marimo.running_in_notebook()``).

    marimo is not imported for this: a kernel that runs marimo cells has imported it already, so a process
    without it in ``sys.modules`` is not marimo (and Jupyter never pays for the import).
    """
    marimo = sys.modules.get("marimo")
    check = getattr(marimo, "running_in_notebook", None)
    return bool(check()) if callable(check) else False


def resolve_renderer(renderer: str) -> str:
    """``"bqplot"`` or ``"svg"`` for a ``renderer=`` argument; a clear error for anything else."""
    if renderer not in RENDERERS:
        raise ValueError(f"renderer must be one of {', '.join(map(repr, RENDERERS))}, got {renderer!r}")
    if renderer == "auto":
        return "svg" if in_marimo() else "bqplot"
    return renderer


@dataclass
class FrontEnd:
    """The widgets a dashboard shows: its panel, line charts, adapter charts, and its VBox's children."""

    panel: DashboardPanel
    charts: Any
    adapter_charts: Any
    children: list[Any]


def build_front_end(
    renderer: str, panel_traits: dict[str, Any], gpu: bool, points_per_line: int, max_markers: int
) -> FrontEnd:
    """Build the front end ``renderer`` names (``resolve_renderer``'s answer) with the panel's first traits."""
    if renderer == "svg":
        from lora_widgets.widget.web_charts import WebAdapterCharts, WebCharts, WebDashboardPanel

        web = WebDashboardPanel(**panel_traits)
        return FrontEnd(web, WebCharts(web, gpu, points_per_line, max_markers), WebAdapterCharts(web), [web])
    panel = DashboardPanel(**panel_traits)
    charts = Charts(gpu=gpu, points_per_line=points_per_line, max_markers=max_markers)
    adapter_charts = AdapterCharts()
    return FrontEnd(panel, charts, adapter_charts, [panel, charts.grid(), adapter_charts.grid()])


class MarimoDisplay:
    """marimo's display protocol for the dashboard: it shows as one anywidget, whose value is reactive."""

    panel: DashboardPanel
    _marimo_ui: Any = None

    @property
    def ui(self) -> Any:
        """The dashboard as a marimo UI element (``mo.ui.anywidget(dash.panel)``, made once).

        Assign it to a global (``board = dash.ui``) and show it; a cell that reads ``board.value["run_state"]``
        runs again when the run's state changes (its ``adapter_path`` is set once the run has ended). Only in
        marimo: raises ``RuntimeError`` elsewhere (display ``dash`` itself in Jupyter).
        """
        if self._marimo_ui is None:
            if not in_marimo():
                raise RuntimeError("dash.ui is for marimo notebooks; in Jupyter display the dashboard itself")
            import marimo as mo

            self._marimo_ui = mo.ui.anywidget(self.panel)
        return self._marimo_ui

    def _display_(self) -> Any:
        """What marimo shows for ``dash`` as a cell's last expression: :attr:`ui` (never the ipywidgets box)."""
        return self.ui
