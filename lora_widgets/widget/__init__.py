"""Jupyter widgets: the live training dashboard and the memory planner (anywidget + bqplot)."""

from __future__ import annotations

from lora_widgets.widget.dashboard import LoRADashboard
from lora_widgets.widget.planner import MemoryPlanner

__all__ = ["LoRADashboard", "MemoryPlanner"]
