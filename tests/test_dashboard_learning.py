"""Is LoRA learning, in the dashboard: the heatmap, one adapter's detail, sample answers and alerts (issue 14).

The dashboard is a view of events, so most of this is driven by a scripted :class:`RunSource` on a fake clock
(``ScriptedRun``); one test records a real run of the seed notebook's bug and replays its ``metrics.jsonl``.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from transformers import AutoTokenizer

from lora_widgets import LoRADashboard, TrainConfig
from lora_widgets import models as demo
from lora_widgets.events.replay import read_events
from lora_widgets.events.types import (
    AdapterStats,
    AlertRaised,
    EvalMetrics,
    RunStarted,
    SampleGenerations,
    StepMetrics,
)
from lora_widgets.training.trainer import LoRATrainer
from lora_widgets.widget.adapter_charts import heatmap_of
from lora_widgets.widget.static_summary import adapter_heatmap_svg
from tests.helpers import (
    LLAMA_MODULES,
    FakeLoop,
    ScriptedRun,
    patterned_batch,
    scripted_adapter_stats,
    scripted_samples,
    tiny_llama,
)
from tests.test_alerts import _seed_bug_model
from tests.test_dashboard_events import _Sent

ALERT = AlertRaised("no_gradient", "No adapter receives a gradient", "After the backward pass of step 1, ...",
                    "Check that the LoRA layers are in the forward pass.", 1, "danger")  # fmt: skip


def _dash() -> LoRADashboard:
    return LoRADashboard(model=tiny_llama(), tokenizer=object(), train_data=patterned_batch(8, 32).repeat(4, 1),
                         train=TrainConfig())  # fmt: skip


def _step(i: int, total: int) -> StepMetrics:
    return StepMetrics(i, total, i / total, 3.0 - i / total, 1e-3, 1.0, 5e4, i / 50, 1.0, 300 * 2**20)


def _script(total: int = 20, alert_at: int | None = 1) -> list[Any]:
    """A run that measures on the first update and every 10 (as the trainer does with eval_every=10)."""
    out: list[Any] = [RunStarted("r", "/tmp/r", {"learning_rate": 1e-3}, None, "cpu", "CPU", 10, 100, total, 128, 0.0),
                      EvalMetrics(0, 3.0, math.exp(3.0), 3.0), scripted_samples(0)]  # fmt: skip
    for i in range(1, total + 1):
        out.append(_step(i, total))
        if i == 1 or i % 10 == 0:
            out.append(scripted_adapter_stats(i))
        if i == alert_at:
            out.append(ALERT)
        if i % 10 == 0:
            out += [EvalMetrics(i, 2.5, math.exp(2.5), 2.5), scripted_samples(i)]
    return out


def _watch(dash: LoRADashboard, events: list[Any]) -> None:
    loop = FakeLoop()
    dash._flusher.clock, dash._flusher.call_later = loop.time, loop.call_later

    async def watch() -> Any:
        dash.watch(ScriptedRun(events, loop, 1 / 50))
        return await dash.wait()

    asyncio.run(watch())


def test_the_heatmap_shows_the_last_statistics_by_layer_and_module() -> None:
    dash = _dash()
    _watch(dash, _script())
    last = scripted_adapter_stats(20)
    mark = dash.adapter_charts.heatmap
    assert list(mark.row) == ["0", "1", "2", "3"] and list(mark.column) == list(LLAMA_MODULES)
    expected = np.array(
        [[x.relative_update for x in last.layers if x.layer == i] for i in range(4)], np.float32
    )
    np.testing.assert_allclose(
        mark.color, expected
    )  # [layers, modules] in the q, k, v, o, gate, up, down order
    assert "step 20" in dash.adapter_charts.heatmap_figure.title
    # the detail: the adapter that moved most until a cell is clicked, then the clicked one
    largest = max(last.layers, key=lambda x: x.relative_update)
    np.testing.assert_allclose(dash.adapter_charts.spectrum.y, largest.singular_values, rtol=1e-6)
    assert dash.adapter_charts.detail_figure.title.startswith("layer 3 down_proj")
    mark.set_state({"selected": [[1, 0]]})  # what a click in the browser sends: [[row, column]] as JSON
    assert dash.adapter_charts.detail_figure.title.startswith("layer 1 q_proj")
    assert "grad A 1.0e-2 B 2.0e-2 · last update 1.0e-3" in dash.adapter_charts.detail_figure.title
    assert len(dash.adapter_charts.spectrum.x) == 8  # r singular values
    mark.set_state({"selected": None})  # a click on the background clears the selection
    assert dash.adapter_charts.detail_figure.title.startswith("layer 3 down_proj")


def test_sample_answers_and_alerts_reach_the_panel() -> None:
    dash = _dash()
    _watch(dash, _script())
    samples = dash.panel.samples
    assert [s["step"] for s in samples] == [20, 20] and samples[0]["prompt"] == "def function_0(x):"
    assert "after 20 steps" in samples[0]["current"] and samples[0]["current_ended"] is None
    assert (
        "2 prompts, up to 32 new tokens" in dash.panel.samples_note and "step 20" in dash.panel.samples_note
    )
    alert = next(c for c in dash.panel.callouts if c["title"].startswith("No adapter receives a gradient"))
    assert alert["kind"] == "danger" and alert["title"].endswith("(step 1)")
    assert alert["message"] == ALERT.evidence and alert["suggestions"] == [ALERT.fix]
    # a new run starts clean: no heatmap, samples or alerts of the previous one
    dash2_events = _script(alert_at=None)[:2]
    _watch(dash, dash2_events)
    assert dash.panel.samples == [] and dash.adapter_charts.stats is None
    assert not any(c["title"].startswith("No adapter") for c in dash.panel.callouts)


def test_the_heatmap_is_sent_only_when_new_statistics_arrive(monkeypatch: pytest.MonkeyPatch) -> None:
    dash = _dash()
    sent = _Sent(monkeypatch)
    _watch(dash, _script(total=200, alert_at=None))
    heatmap_messages = [size for widget, size in sent.messages if widget is dash.adapter_charts.heatmap]
    # 200 steps at 50 steps/s: drawn at step 1 (which also sends the rows and columns), then at most every
    # REDRAW_S = 10 s of the 4 s run, and at the end (the last statistics): 2 colour messages, nothing more
    assert len(heatmap_messages) == 2, heatmap_messages
    assert dash.adapter_charts.stats is not None and dash.adapter_charts.stats.step == 200


@pytest.mark.parametrize("n_steps", [1_000, 20_000])
def test_the_network_budget_holds_with_statistics_and_samples(
    monkeypatch: pytest.MonkeyPatch, n_steps: int
) -> None:
    """The issue-11 budget (10 messages and 20 KB per second) with an AdapterStats of the shipped model's 28
    adapters and two sample answers at every evaluation (every 100 steps at 50 steps/s)."""
    dash = _dash()
    sent = _Sent(monkeypatch)
    events: list[Any] = [RunStarted("r", "/tmp/r", {}, None, "cpu", "CPU", 10, 100, n_steps, 128, 0.0)]
    for i in range(1, n_steps + 1):
        events.append(_step(i, n_steps))
        if i % 100 == 0:
            events += [
                scripted_adapter_stats(i),
                EvalMetrics(i, 2.5, math.exp(2.5), 2.5),
                scripted_samples(i),
            ]
    _watch(dash, events)
    seconds = n_steps / 50
    assert len(sent.messages) / seconds <= 10
    assert sum(size for _, size in sent.messages) / 1e3 / seconds <= 20
    assert dash.adapter_charts.stats is not None and dash.adapter_charts.stats.step == n_steps


def test_static_summary_keeps_the_heatmap_samples_and_alerts() -> None:
    dash = _dash()
    _watch(dash, _script())
    svg = dash.static_summary_heatmap_svg()
    assert svg.startswith("<svg") and svg.endswith("</svg>") and "step 20" in svg
    assert svg.count("<rect") == 1 + 4 * 7  # the background, then one cell per adapter
    assert all(f"layer {i}" in svg for i in range(4)) and all(m in svg for m in LLAMA_MODULES)
    largest = max(x.relative_update for x in scripted_adapter_stats(20).layers)
    assert f"{largest:.1e}" in svg
    html = dash.static_summary_html()
    assert "No adapter receives a gradient" in html and ALERT.fix in html
    assert "def function_1(x):" in html and "current adapter @ step 20" in html
    assert adapter_heatmap_svg(None) == ""


def test_a_gpt2_heatmap_tells_its_two_c_proj_apart_and_pads_one_block() -> None:
    stats = scripted_adapter_stats(5, n_layers=1)
    renamed = AdapterStats(5, tuple(
        type(x)(**{**x.__dict__, "module": "attn.c_proj" if x.module == "o_proj" else x.module})
        for x in stats.layers
    ))  # fmt: skip
    hm = heatmap_of(renamed)
    assert hm.rows == ["0"] and hm.values.shape == (1, 7) and "attn.c_proj" in hm.columns
    dash = _dash()
    dash.adapter_charts.update(renamed)
    assert dash.adapter_charts.heatmap.color.shape == (2, 7)  # a grey blank row keeps bqplot's matrix 2-D
    assert list(dash.adapter_charts.heatmap.row) == ["0", " "]


def test_replaying_a_recorded_run_shows_its_heatmap_samples_and_alerts(tmp_path: Path) -> None:
    """The seed notebook's bug, recorded by the real LoRATrainer, then replayed from metrics.jsonl only."""
    tokenizer = AutoTokenizer.from_pretrained(demo.BASE_MODEL_PATH)  # decodes the tiny model's ids < 128
    config = TrainConfig(max_steps=4, batch_size=4, warmup_steps=1, eval_every=2, eval_batches=1,
                         output_dir=str(tmp_path), device="cpu", sample_max_new_tokens=4)  # fmt: skip
    trainer = LoRATrainer(
        _seed_bug_model(), tokenizer, patterned_batch(8, 32).repeat(4, 1), lora=None, config=config
    )
    trainer.run_sync()
    assert trainer.run_dir is not None
    recorded = read_events(trainer.run_dir / "metrics.jsonl")
    last_stats = [e for e in recorded if isinstance(e, AdapterStats)][-1]
    last_samples = [e for e in recorded if isinstance(e, SampleGenerations)][-1]
    assert [e.key for e in recorded if isinstance(e, AlertRaised)] == ["no_gradient"]

    dash = _dash()

    async def replay() -> Any:
        dash.replay(trainer.run_dir / "metrics.jsonl")  # type: ignore[operator]
        return await dash.wait()

    asyncio.run(replay())
    mark, expected = dash.adapter_charts.heatmap, heatmap_of(last_stats)
    # the seed's adapters hang outside the blocks (unused_adapters.model_layers_0_...): one row, six columns
    assert expected.rows == ["other"] and len(expected.columns) == 6
    np.testing.assert_array_equal(mark.color[:1], expected.values)  # B never moved: all zero
    assert list(mark.column) == expected.columns and list(mark.row) == ["other", " "]
    assert [s["current"] for s in dash.panel.samples] == [p.current for p in last_samples.samples]
    titles = [c["title"] for c in dash.panel.callouts]
    assert "12 of 27 trainable tensors receive no gradient (step 1)" in titles
    assert "12 of 27 trainable tensors receive no gradient" in dash.static_summary_html()
