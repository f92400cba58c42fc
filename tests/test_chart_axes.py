"""Every axis the package draws says in its synced state where it is drawn (issue 20).

Under bqplot 0.12 (Colab's 0.12.47, and the floor the lowest-versions job installs) ``orientation`` is a synced
trait of its own beside ``side``; an axis built with ``side="left"`` alone tells the browser *horizontal*, and a
browser that applies the kernel's state to an existing model then draws the value axis along the bottom
(lora_widgets/widget/axes.py). Under bqplot 0.13 orientation follows side in Python, and this test checks the
same agreement through the property.
"""

from __future__ import annotations

from typing import Any

import pytest
from bqplot import Axis, Figure

from lora_widgets.widget.adapter_charts import AdapterCharts
from lora_widgets.widget.axes import category_axis, value_axis
from lora_widgets.widget.charts import Charts
from lora_widgets.widget.planner import MemoryPlanner


def _figures() -> list[tuple[str, Figure]]:
    charts, gpu_charts, adapters = Charts(), Charts(gpu=True), AdapterCharts()
    figures = [*charts.figures, *gpu_charts.figures, *adapters.figures, MemoryPlanner().figure]
    return [(f"{i}: {fig.title!r}", fig) for i, fig in enumerate(figures)]


def _synced(axis: Axis, name: str) -> Any:
    """What the kernel sends the browser for ``name`` (bqplot 0.13 syncs no orientation: read the property)."""
    state = axis.get_state()
    return state[name] if name in state else getattr(axis, name)


@pytest.mark.parametrize(("name", "figure"), _figures())
def test_each_axis_sends_a_side_and_an_orientation_that_agree(name: str, figure: Figure) -> None:
    sides = [_synced(axis, "side") for axis in figure.axes]
    orientations = [_synced(axis, "orientation") for axis in figure.axes]
    expected = ["vertical" if side in ("left", "right") else "horizontal" for side in sides]
    assert orientations == expected, f"figure {name}: sides {sides}, orientations {orientations}"
    assert sides.count("bottom") == 1, f"figure {name}: one axis along the bottom, got sides {sides}"


def test_the_axis_builders_set_both_traits() -> None:
    from bqplot import LinearScale

    down, up = category_axis(LinearScale()), value_axis(LinearScale(), side="right", label="util %")
    assert (_synced(down, "side"), _synced(down, "orientation")) == ("bottom", "horizontal")
    assert (_synced(up, "side"), _synced(up, "orientation"), up.label) == ("right", "vertical", "util %")
