"""bqplot axes whose synced state says where they are drawn: the side *and* the orientation.

bqplot 0.12 (what Colab ships: 0.12.47) syncs an axis's ``orientation`` as a trait of its own, defaulting to
``"horizontal"``, beside ``side``; only bqplot 0.13 derives one from the other in Python. So
``Axis(side="left")`` under 0.12 leaves the kernel's model saying *horizontal, left*. The browser's AxisModel
corrects its own copy when it is created (``validate_orientation``: left means vertical) and sends the
correction to the kernel, but until the kernel has read it, the kernel's state still says *horizontal*. When
that state is applied to a model the browser already has (the classic Notebook's ipywidgets-7 manager asks the
kernel for every widget's state as a notebook opens; a "Run All" right away creates the dashboard before the
answer comes, and the answer carries the uncorrected axes), *horizontal* wins, and the model's other validator
(``validate_side``: horizontal means bottom or top) moves the axis to the bottom and saves ``side="bottom"``
back to the kernel: the value axis is drawn along the bottom, over the step axis, for good (a heatmap's layer
labels then run along the bottom too). Logged in the browser: ``set_state({orientation: "horizontal", side:
"left"})`` then ``validate_side`` -> ``side="bottom"`` on the memory, throughput, layer and detail axes of one
run. With both traits set here, the two copies agree from the start and no state the kernel sends can flip an
axis (issue 20).
"""

from __future__ import annotations

from typing import Any, Literal

from bqplot import Axis

__all__ = ["category_axis", "value_axis"]


def category_axis(scale: Any, label: str = "step", **kwargs: Any) -> Axis:
    """The axis along the bottom of a chart (steps, modules, phases): horizontal, ``side="bottom"``."""
    return Axis(scale=scale, label=label, side="bottom", orientation="horizontal", **kwargs)


def value_axis(scale: Any, side: Literal["left", "right"] = "left", **kwargs: Any) -> Axis:
    """An axis up the side of a chart (loss, learning rate, MiB, layers): vertical, on ``side``."""
    return Axis(scale=scale, side=side, orientation="vertical", **kwargs)
