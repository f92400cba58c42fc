"""What the dashboard tells a student (issue 21, item 5): what the samples' ✓ means, said in the table; empty charts
without nonsense ticks or grey NaN cells; examples called examples; one numbering in the data view; the static
summary only where widgets do not render; a rerun with the same settings visibly distinct from the first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lora_widgets.events.history import History
from lora_widgets.events.types import (
    AdapterLayerStats,
    AdapterStats,
    SampleGenerations,
    SamplePair,
    StepMetrics,
)
from lora_widgets.lora.layers import LoRAConfig
from lora_widgets.widget import readouts
from lora_widgets.widget.adapter_charts import AdapterCharts
from lora_widgets.widget.charts import EMPTY_STEPS, Charts
from lora_widgets.widget.data_view import facts_rows
from lora_widgets.widget.record import RunRecord
from lora_widgets.widget.session import new_trainer_run
from lora_widgets.widget.static_summary import StaticSummary, learning_html
from tests.test_dashboard import FakeTrainConfig, FakeTrainer, make_dash, run

JS = Path(readouts.__file__).parent / "static" / "dashboard.js"


def test_the_samples_table_says_what_its_marks_mean() -> None:
    """The static summary writes the legend in the table's caption; the live widget carries the same sentence."""
    pair = SamplePair(prompt="p", base="b", current="c", base_ended=False, current_ended=True)
    record = RunRecord(1, "run 1")
    record.samples = SampleGenerations(
        step=5, samples=(pair,), max_new_tokens=8, base_seconds=0.1, current_seconds=0.1
    )
    html = learning_html(record)
    assert "<caption" in html and "ended its turn" in readouts.ENDED_LEGEND
    assert readouts.ENDED_LEGEND.replace("'", "&#x27;") in html and "right" in readouts.ENDED_LEGEND
    assert json.dumps(readouts.ENDED_LEGEND, ensure_ascii=False) in JS.read_text()  # word for word in the JS


def test_empty_memory_and_throughput_charts_span_whole_steps_until_data_arrives() -> None:
    charts = Charts()
    scales = [charts.memory.scales["x"], charts.memory.scales["y"], charts.tokens_per_s.scales["x"],
              charts.tokens_per_s.scales["y"]]  # fmt: skip
    assert [(s.min, s.max) for s in scales] == [
        (0.0, EMPTY_STEPS),
        (0.0, 1024.0),
        (0.0, EMPTY_STEPS),
        (0.0, 1000.0),
    ]
    h = History()
    for step in (1, 2, 3):
        h.record(StepMetrics(step, 3, step / 3, 2.0, 1e-3, 1.0, 500.0, 0.1 * step, 0.1, 2**27))
    charts.update(h)
    assert all(s.max is None for s in scales) and all(s.min == 0.0 for s in scales)  # fitted to the data
    charts.clear_current()  # a new run starts: empty again, fixed again
    assert [s.max for s in scales] == [EMPTY_STEPS, 1024.0, EMPTY_STEPS, 1000.0]


def _stats(step: int) -> AdapterStats:
    layer = AdapterLayerStats(
        name="model.layers.0.self_attn.q_proj", layer=0, module="q_proj", rank=2, scaling=1.0, weight_norm=1.0,
        delta_norm=0.1, relative_update=0.1, a_norm=1.0, b_norm=0.1, a_grad_norm=1.0, b_grad_norm=1.0,
        singular_values=(0.2, 0.1), update_ratio=1e-3,
    )  # fmt: skip
    return AdapterStats(step=step, layers=(layer,))


def test_the_heatmap_draws_no_cells_before_the_first_statistics() -> None:
    charts = AdapterCharts()
    assert not charts.heatmap.visible and np.isnan(charts.heatmap.color).all()  # NaN placeholder: not drawn
    charts.update(_stats(5))
    assert charts.heatmap.visible and np.isfinite(charts.heatmap.color).any()
    charts.clear()
    assert not charts.heatmap.visible


def test_a_rerun_with_the_same_settings_says_so_and_its_predecessor_is_dashed() -> None:
    lora, train = LoRAConfig(r=4), FakeTrainConfig()
    first = new_trainer_run(None, None, None, lora, lora, train, 1, FakeTrainer)
    second = new_trainer_run(None, None, None, lora, lora, train, 2, FakeTrainer, [first])
    other = new_trainer_run(
        None, None, None, LoRAConfig(r=8), LoRAConfig(r=8), train, 3, FakeTrainer, [first]
    )
    assert second.label.endswith("(same settings as run 1)") and "same settings" not in other.label
    dash = make_dash(max_steps=4)
    run(dash.run())
    run(dash.run())
    (previous,) = dash.charts.previous_runs
    assert previous.line_style == "dashed" and dash.runs[1].label.endswith("(same settings as run 1)")
    assert dash.charts.smooth_loss.labels == [dash.runs[1].label]


def test_the_static_summary_is_the_widgets_fallback_not_a_second_output(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One output: the widget's view, and the summary as its text/html, which a front end that renders widgets
    does not show; a run's end updates that same output in place."""
    import lora_widgets.widget.static_summary as static

    shown: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(static, "display", lambda data, **kw: shown.append(("display", data)))
    monkeypatch.setattr(static, "update_display", lambda data, **kw: shown.append(("update", data)))
    dash = make_dash(max_steps=3)
    dash._ipython_display_()
    run(dash.run())
    kinds = [kind for kind, _ in shown]
    assert kinds[0] == "display" and len(kinds) > 1 and set(kinds[1:]) == {"update"}  # one output, updated
    for _, data in shown:
        assert "application/vnd.jupyter.widget-view+json" in data and "static summary" in data["text/html"]
    assert "finished" in shown[-1][1]["text/html"] and "<polyline" in shown[-1][1]["text/html"]
    assert StaticSummary(lambda: [], dict).fallback_html().count("<svg") == 0  # no empty curve before a run


def test_the_browser_says_examples_one_numbering_and_the_legend(tmp_path: Path) -> None:
    """dashboard.js in headless Chromium: chat data is counted in examples, the data view numbers from 1
    throughout, and the samples table has the legend as its caption."""
    pytest.importorskip("playwright.sync_api")
    from tests.e2e.conftest import CHROMIUM_FLAGS, chromium_path
    from tests.e2e.test_controls_e2e import HARNESS, _traits

    path = chromium_path()
    if path is None:
        pytest.skip("needs Chromium (/usr/bin/chromium)")
    from playwright.sync_api import sync_playwright

    traits = _traits()
    traits["summary"] = {"train_blocks": 12}
    facts = {"kind": "sft", "train": 12, "val": 2, "seq_len": 9, "tokens": 90, "trained_pct": 40.0,
             "padding_pct": 5.0, "rows": 14, "truncated": 0, "dropped": 0, "formats": {"messages": 14},
             "train_on": "answers", "max_length": 64, "split": "by example: 12 train / 2 validation examples, seed 0"}  # fmt: skip
    traits["data_view"] = {"facts": facts, "index": 2, "count": 12, "row": 2, "length": 3, "trained": 1,
                           "tokens": [["a", False], ["b", True], ["c", False]]}  # fmt: skip
    traits["samples"] = [{"prompt": "p", "base": "b", "current": "c", "base_ended": False, "current_ended": True,
                          "step": 3}]  # fmt: skip
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page()
            page.set_content("<html><body></body></html>")
            page.evaluate(HARNESS, [JS.read_text(), traits])
            summary = page.locator(".lw-summary").inner_text()
            assert "Training examples\t12" in summary and "Training blocks" not in summary
            assert page.input_value(".lw-data-index") == "3"
            assert "(row 3 of the data)" in page.locator(".lw-data-caption").inner_text()
            assert page.locator(".lw-samples-legend").inner_text() == readouts.ENDED_LEGEND
            facts_text = page.locator(".lw-data-facts").inner_text()
            assert "by example: 12 train / 2 validation examples" in facts_text
            assert "12 / 2 (validation 14.3%)" in facts_text  # the same line as data_view.facts_rows
            assert dict(facts_rows(facts))["examples (train / validation)"] == "12 / 2 (validation 14.3%)"
        finally:
            browser.close()


def test_blocks_stay_blocks(tmp_path: Path) -> None:
    dash = make_dash(max_steps=2)
    assert dash.panel.data_view["facts"]["kind"] == "packed" and isinstance(dash._data.train, torch.Tensor)
