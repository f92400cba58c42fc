"""One chart model, two renderers: bqplot (Jupyter, Colab) and the dashboard's own SVG (marimo) show the same points.

A short real run on the shipped model writes its ``metrics.jsonl``; replaying it into a bqplot dashboard and
into an SVG one must give every bqplot mark and the SVG charts' series (as decoded from the bytes the widget
sends) the same arrays. Also: marimo is detected without the user asking, the run's state is published for
reactive readers, and the SVG path keeps the traffic budget.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import types
from pathlib import Path
from typing import Any

import ipywidgets
import numpy as np
import pytest

from lora_widgets import LoRAConfig, LoRADashboard, TrainConfig
from lora_widgets.events import EvalMetrics, RunFinished, RunStarted, StepMetrics
from lora_widgets.widget.charts import Charts
from lora_widgets.widget.web_charts import WebCharts, WebDashboardPanel, compose_esm
from tests.helpers import FakeLoop, ScriptedRun, patterned_batch, scripted_adapter_stats, tiny_llama

LINES = ("raw_loss", "smooth_loss", "val_loss", "memory", "tokens_per_s", "lr_marker")


def _decoded(wire: dict[str, Any], sent: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A series as the browser reads it (its steps from another series when it names one in ``x_ref``)."""
    x = sent[wire["x_ref"]]["x"] if "x_ref" in wire and sent is not None else wire["x"]
    return np.frombuffer(x, dtype=np.int32), np.frombuffer(wire["y"], dtype=np.float32)


@pytest.fixture(scope="module")
def metrics(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 12-step run of the shipped model (LoRA r=4, an evaluation every 3 steps): its metrics.jsonl."""
    out = tmp_path_factory.mktemp("run")
    config = TrainConfig(max_steps=12, batch_size=4, warmup_steps=2, eval_every=3, learning_rate=1e-2,
                         block_size=32, output_dir=str(out))  # fmt: skip
    live = LoRADashboard(train_data=patterned_batch(8, 32).repeat(4, 1), lora=LoRAConfig(r=4), train=config)
    assert isinstance(asyncio.run(live.run()), RunFinished)
    assert live.history is not None and live.history.started is not None
    return Path(live.history.started.run_dir) / "metrics.jsonl"


def _replayed(metrics: Path, renderer: str, times: int = 1) -> LoRADashboard:
    dash = LoRADashboard(model=tiny_llama(), tokenizer=object(), train_data=patterned_batch(8, 32),
                         train=TrainConfig(), renderer=renderer)  # fmt: skip

    async def replay() -> None:
        for _ in range(times):
            dash.replay(metrics)
            await dash.wait()

    asyncio.run(replay())
    return dash


@pytest.mark.parametrize("max_points", [5, LoRADashboard.max_points])
def test_a_replay_gives_bqplot_and_the_svg_charts_the_same_points(
    metrics: Path, max_points: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """5 points per line makes the decimation choose (12 steps); 362 keeps every step."""
    monkeypatch.setattr(LoRADashboard, "max_points", max_points)
    monkeypatch.setattr(LoRADashboard, "max_markers", 4)
    jupyter, marimo = _replayed(metrics, "bqplot", times=2), _replayed(metrics, "svg", times=2)
    assert isinstance(jupyter.charts, Charts) and isinstance(marimo.charts, WebCharts)
    sent = {**marimo.panel.chart_live["series"], **marimo.panel.chart_evals}
    assert sent["smooth_loss"]["x_ref"] == "raw_loss"  # the same steps are sent once
    for name in LINES:
        mark, series = getattr(jupyter.charts, name), marimo.charts.series[name]
        x, y = _decoded(sent[name], sent)
        assert len(mark.x) > 0, name
        np.testing.assert_array_equal(series.x, mark.x, err_msg=name)
        np.testing.assert_array_equal(series.y, mark.y, err_msg=name)
        np.testing.assert_array_equal(x, mark.x, err_msg=name)  # what reaches the browser
        np.testing.assert_array_equal(y, mark.y, err_msg=name)
    n = len(jupyter.charts.raw_loss.x)
    assert n == 12 if max_points >= 12 else 2 < n <= max_points  # every step, or a decimated few
    assert len(jupyter.charts.val_loss.x) <= 4
    lr_x, lr_y = _decoded(marimo.panel.chart_fixed["lr"])
    np.testing.assert_array_equal(lr_x, jupyter.charts.lr_line.x)
    np.testing.assert_array_equal(lr_y, jupyter.charts.lr_line.y)
    (overlay,) = marimo.panel.chart_fixed["overlays"]  # the first replay, overlaid when the second began
    (previous,) = jupyter.charts.previous_runs
    np.testing.assert_array_equal(_decoded(overlay)[1], previous.y)
    assert overlay["label"] == previous.labels[0]
    lo, hi = marimo.panel.chart_axes["loss_domain"]
    scale = jupyter.charts.raw_loss.scales["y"]
    assert (lo, hi) == pytest.approx((scale.min, scale.max), rel=0.03)


def test_log_scale_gives_both_the_same_loss_range(metrics: Path) -> None:
    jupyter, marimo = _replayed(metrics, "bqplot"), _replayed(metrics, "svg")
    jupyter.panel.log_scale = marimo.panel.log_scale = True
    scale = jupyter.charts.raw_loss.scales["y"]
    assert marimo.panel.chart_axes["log"] is True
    assert tuple(marimo.panel.chart_axes["loss_domain"]) == pytest.approx((scale.min, scale.max), rel=1e-6)


def test_the_run_state_says_when_the_run_ended_and_where_its_adapter_is(metrics: Path) -> None:
    dash = _replayed(metrics, "svg")
    state = dash.panel.run_state
    ended = dash.runs[-1].result
    assert ended is not None and ended.adapter_path
    assert state["state"] == "finished" and state["ended"] is True
    assert state["adapter_path"] == ended.adapter_path and state["step"] == 12
    assert state["serial"] >= 2  # running, then finished
    json.dumps(state)  # plain JSON for the browser and a marimo cell


def test_marimo_is_detected_and_the_dashboard_shows_as_one_anywidget(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Any] = []

    def anywidget(widget: Any) -> tuple[str, Any]:  # mo.ui.anywidget
        made.append(widget)
        return ("ui", widget)

    fake = types.SimpleNamespace(
        running_in_notebook=lambda: True, ui=types.SimpleNamespace(anywidget=anywidget)
    )
    monkeypatch.setitem(sys.modules, "marimo", fake)
    dash = LoRADashboard(model=tiny_llama(), tokenizer=object(), train_data=patterned_batch(8, 32))
    assert isinstance(dash.panel, WebDashboardPanel) and list(dash.children) == [dash.panel]
    assert dash._display_() == ("ui", dash.panel) and dash.ui is dash._display_() and made == [dash.panel]
    fake.running_in_notebook = lambda: False  # JupyterLab, Notebook 7, Colab: bqplot as before
    jupyter = LoRADashboard(model=tiny_llama(), tokenizer=object(), train_data=patterned_batch(8, 32))
    assert not isinstance(jupyter.panel, WebDashboardPanel) and isinstance(jupyter.charts, Charts)
    with pytest.raises(RuntimeError, match="marimo"):
        _ = jupyter.ui


def test_a_wrong_renderer_is_named() -> None:
    with pytest.raises(ValueError, match=r"renderer must be one of 'auto', 'bqplot', 'svg', got 'canvas'"):
        LoRADashboard(
            model=tiny_llama(), tokenizer=object(), train_data=patterned_batch(8, 32), renderer="canvas"
        )


def test_compose_esm_refuses_a_module_it_cannot_wrap(tmp_path: Path) -> None:
    bad = tmp_path / "bad.js"
    bad.write_text('import x from "y";\nexport default { render() {} };\n')
    with pytest.raises(ValueError, match=r"bad\.js"):
        compose_esm(bad)
    assert WebDashboardPanel._esm.count("export default") == 1


def test_a_click_on_a_heatmap_cell_shows_that_adapter() -> None:
    dash = LoRADashboard(
        model=tiny_llama(), tokenizer=object(), train_data=patterned_batch(8, 32), renderer="svg"
    )
    charts = dash.adapter_charts
    charts.update(scripted_adapter_stats(10))
    shown = dash.panel.adapter_map
    assert len(shown["rows"]) == 4 and np.frombuffer(shown["values"], np.float32).size == 4 * len(
        shown["columns"]
    )
    largest = charts.selected_layer()
    charts._on_msg(dash.panel, {"type": "adapter_cell", "row": 3, "column": 0}, [])
    assert dash.panel.adapter_map["selected"] == [3, 0]
    assert charts.selected_layer() is charts.map.cells[(3, 0)] and charts.map.cells[(3, 0)] is not largest
    charts._on_msg(dash.panel, {"type": "adapter_cell", "row": 99, "column": 0}, [])  # not a cell: ignored
    charts._on_msg(dash.panel, {"type": "adapter_cell", "row": "x", "column": None}, [])  # malformed: ignored
    assert dash.panel.adapter_map["selected"] == [3, 0]


def test_the_svg_charts_cost_at_most_10_messages_and_20_kb_per_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Counted on a fake clock at 50 steps/s for 5,000 steps, an evaluation every 100 (as the bqplot test)."""
    if int(ipywidgets.__version__.split(".")[0]) < 8:  # the lowest-versions job (Colab's 7.7.1)
        pytest.skip("ipywidgets 7 sends nothing from a widget whose comm has no kernel: nothing to count")
    dash = LoRADashboard(
        model=tiny_llama(), tokenizer=object(), train_data=patterned_batch(8, 32), renderer="svg"
    )
    loop = FakeLoop()
    dash._flusher.clock, dash._flusher.call_later = loop.time, loop.call_later
    sizes: list[int] = []

    def _send(_widget: Any, msg: Any, buffers: Any = None) -> None:
        sizes.append(len(json.dumps(msg, default=str)) + sum(memoryview(b).nbytes for b in buffers or []))

    monkeypatch.setattr(ipywidgets.Widget, "_send", _send)
    n = 5_000

    def events() -> Any:
        yield RunStarted("r", "/tmp/r", {}, None, "cpu", "CPU", 10, 100, n, 128, 0.0)
        for i in range(1, n + 1):
            yield StepMetrics(i, n, i / n, 3.0 + math.sin(i) + (20.0 if i == n // 3 else 0.0), 1e-3, 1.0, 5e4,
                              i / 50, 1.0, 300 * 2**20)  # fmt: skip
            if i % 100 == 0:
                yield scripted_adapter_stats(i)
                yield EvalMetrics(i, 2.5, math.exp(2.5), 2.5)

    async def watch() -> Any:
        dash.watch(ScriptedRun(events(), loop, 1 / 50))
        return await dash.wait()

    asyncio.run(watch())
    seconds = n / 50
    assert sizes and len(sizes) / seconds <= 10
    assert sum(sizes) / 1e3 / seconds <= 20
    raw = dash.charts.series["raw_loss"]
    assert len(raw.x) <= dash.max_points and float(raw.y.max()) >= 20.0  # the spike survives decimation
