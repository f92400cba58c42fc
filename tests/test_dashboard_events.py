"""The dashboard as a view of an event stream: replay equals live, any RunSource drives it, budgets hold."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import ipywidgets
import numpy as np
import pytest
import torch

from lora_widgets import LoRAConfig, LoRADashboard, TrainConfig
from lora_widgets.events.history import History
from lora_widgets.events.replay import Replay, read_events
from lora_widgets.events.types import EvalMetrics, RunFinished, RunStarted, RunStopped, StepMetrics
from lora_widgets.lora.layers import apply_lora, count_parameters, has_lora
from tests.helpers import FakeLoop, ScriptedRun, patterned_batch, tiny_llama

MARKS = ("raw_loss", "smooth_loss", "val_loss", "memory", "memory_reserved", "gpu_util", "tokens_per_s",
         "lr_line", "lr_marker")  # fmt: skip


def _blocks() -> torch.Tensor:
    return patterned_batch(8, 32).repeat(4, 1)  # [32, 32] learnable token ids


def _step(i: int, total: int, loss: float) -> StepMetrics:
    return StepMetrics(i, total, i / total, loss, 1e-3, 1.0, 5e4, i / 50, 1.0, 300 * 2**20)


# --- replay: the proof that the dashboard needs nothing but events --------------------------------------
def test_replaying_metrics_jsonl_draws_the_charts_of_the_live_run(tmp_path: Path) -> None:
    config = TrainConfig(max_steps=8, batch_size=4, warmup_steps=2, eval_every=4, learning_rate=1e-2,
                         block_size=32, output_dir=str(tmp_path))  # fmt: skip
    live = LoRADashboard(train_data=_blocks(), lora=LoRAConfig(r=4), train=config)  # the shipped model
    result = asyncio.run(live.run())
    assert isinstance(result, RunFinished), result
    assert live.history is not None and live.history.started is not None
    metrics = Path(live.history.started.run_dir) / "metrics.jsonl"
    # the dashboard's record and the trainer's own history are the same arrays, built from the same events
    trainer_history = live.trainer.history  # type: ignore[union-attr]
    for name in ("step", "loss", "lr", "tokens_per_s", "memory_bytes", "eval_step", "val_loss"):
        np.testing.assert_array_equal(getattr(live.history, name), getattr(trainer_history, name))

    fresh = LoRADashboard(model=tiny_llama(), tokenizer=object(), train_data=_blocks(), train=TrainConfig())

    async def replay() -> Any:
        fresh.replay(metrics)
        return await fresh.wait()

    replayed = asyncio.run(replay())
    assert replayed == result
    for name in MARKS:
        live_mark, replay_mark = getattr(live.charts, name), getattr(fresh.charts, name)
        np.testing.assert_array_equal(replay_mark.x, live_mark.x, err_msg=name)
        np.testing.assert_array_equal(replay_mark.y, live_mark.y, err_msg=name)
    assert len(fresh.charts.raw_loss.x) == 8 and len(fresh.charts.val_loss.x) >= 2
    assert fresh.runs[0].label == live.runs[0].label  # named from the run's own settings
    assert fresh.panel.progress == live.panel.progress and fresh.state == "finished"
    for key in ("val_loss", "best_val_loss", "trainable", "total", "adapter_bytes", "run_dir"):
        assert fresh.panel.summary[key] == live.panel.summary[key], key
    assert "finished" in fresh.static_summary_html()


def test_read_events_skips_a_cut_last_line_and_names_a_bad_one(tmp_path: Path) -> None:
    events = [RunStarted("r", "/tmp/r", {"learning_rate": 1e-3}, None, "cpu", "CPU", 1, 2, 3, 4, 0.0),
              _step(1, 3, 2.0), EvalMetrics(1, 2.1, math.exp(2.1), 2.1)]  # fmt: skip
    lines = [json.dumps(e.to_dict()) for e in events]
    good = tmp_path / "metrics.jsonl"
    good.write_text("\n".join(lines) + '\n{"event": "step", "st')  # killed while writing a line
    assert read_events(good) == events
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\nnot json\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2"):
        read_events(
            bad, strict=True
        )  # refused on request; by default named and skipped (tests/test_replay_checks.py)
    assert read_events(bad) == events[:2]
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl"):
        read_events(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="interval"):
        Replay(events, interval=-1)


def test_a_replay_of_an_interrupted_run_ends_stopped_and_can_be_stopped() -> None:
    events = [_step(i, 100, 3.0 - i / 100) for i in range(1, 51)]  # no terminal event: the kernel died
    end = asyncio.run(Replay(events).run())
    assert isinstance(end, RunStopped) and end.step == 50 and "interrupted" in end.message

    dash = LoRADashboard(model=tiny_llama(), tokenizer=object(), train_data=_blocks(), train=TrainConfig())

    async def stop_midway() -> Any:
        dash.replay(events, interval=0.002)
        await asyncio.sleep(0.03)
        dash.pause()
        await asyncio.sleep(0.02)
        paused_at, state = len(dash.history or ()), dash.state
        await asyncio.sleep(0.02)
        assert len(dash.history or ()) == paused_at  # nothing moves while paused
        dash.resume()
        dash.stop()
        return await dash.wait(), state

    result, state = asyncio.run(stop_midway())
    assert state == "paused"
    assert isinstance(result, RunStopped) and 0 < result.step < 50 and dash.state == "stopped"
    with pytest.raises(ValueError, match="was not trained here"):
        dash.save_adapter("/tmp/nowhere")


def test_history_record_keeps_the_whole_run() -> None:
    started = RunStarted("r", "/tmp/r", {}, None, "cpu", "CPU", 1, 2, 2, 4, 0.0)
    end = RunFinished(2, 1.0, 1.5, 1.7, None, "done")
    h = History.from_events([started, _step(1, 2, 2.0), _step(2, 2, 1.0), EvalMetrics(2, 1.7, 5.5, 1.7), end])
    assert h.started == started and h.ended == end and h.state == "finished"
    assert h.step.tolist() == [1, 2] and h.best_val_loss() == 1.7 and h.last_step is not None
    assert h.tokens_per_s_smooth[0] == 5e4  # the debiased EMA starts at the first value


# --- any RunSource, and errors shown like the Train button's -----------------------------------------
def test_start_from_python_shows_why_it_did_not_start() -> None:
    dash = LoRADashboard(model=tiny_llama(), tokenizer=object(), train_data=_blocks(), train=TrainConfig())
    dash.panel.rank = 0
    with pytest.raises(RuntimeError, match="running asyncio loop"):
        dash.start()

    async def start() -> None:
        dash.start()

    with pytest.raises(ValueError, match="rank"):
        asyncio.run(start())
    danger = [c for c in dash.panel.callouts if c["kind"] == "danger"]
    assert (
        len(danger) == 1
        and danger[0]["title"] == "Could not start the run"
        and "rank" in danger[0]["message"]
    )
    with pytest.raises(TypeError, match="RunSource"):
        dash.watch(object())  # type: ignore[arg-type]


def test_a_peft_model_trains_from_the_dashboard_as_it_is(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # B starts at zero; make the adapters matter so training visibly moves them
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    config = TrainConfig(max_steps=3, warmup_steps=0, batch_size=4, eval_every=None, learning_rate=1e-2, block_size=32,
                         output_dir=str(tmp_path))  # fmt: skip
    dash = LoRADashboard(model=model, train_data=_blocks(), train=config)
    assert dash.panel.summary["trainable"] == count_parameters(model)[0]  # what will train: its adapters
    assert any(c["title"] == "Training the model's own adapters" for c in dash.panel.callouts)
    for _ in range(2):  # a second run trains the same adapters again (nothing removed, nothing refused)
        result = asyncio.run(dash.run())
        assert isinstance(result, RunFinished), result
    after = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    assert "model's adapters" in dash.runs[1].label


def test_the_summary_shows_what_the_settings_will_train_before_the_first_run() -> None:
    model = tiny_llama()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    dash = LoRADashboard(model=model, tokenizer=object(), train_data=_blocks(),
                         lora=LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), train=TrainConfig())  # fmt: skip

    def expected(r: int, targets: Any) -> tuple[int, int]:
        copy = tiny_llama()
        apply_lora(copy, LoRAConfig(r=r, target_modules=targets))
        return count_parameters(copy)

    s = dash.panel.summary
    assert (s["trainable"], s["total"]) == expected(4, ["q_proj", "v_proj"])
    assert s["trainable"] < s["total"] and s["trainable_pct"] < 100.0
    dash.panel.rank = 16
    dash.panel.target_modules = "all-linear"
    assert (dash.panel.summary["trainable"], dash.panel.summary["total"]) == expected(16, "all-linear")
    # the user's model is untouched: no adapters, every parameter as it was
    assert not has_lora(model) and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


# --- the network diet --------------------------------------------------------------------------------
class _Sent:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        if int(ipywidgets.__version__.split(".")[0]) < 8:  # the lowest-versions job (Colab's 7.7.1)
            pytest.skip("ipywidgets 7 sends nothing from a widget whose comm has no kernel, so there is nothing "
                        "to count here; the main job (ipywidgets 8) counts the messages")  # fmt: skip
        self.messages: list[tuple[Any, int]] = []
        sent = self

        def _send(widget: Any, msg: Any, buffers: Any = None) -> None:
            size = len(json.dumps(msg, default=str)) + sum(memoryview(b).nbytes for b in buffers or [])
            sent.messages.append((widget, size))

        monkeypatch.setattr(ipywidgets.Widget, "_send", _send)


@pytest.mark.parametrize("n_steps", [1_000, 20_000])
def test_training_costs_at_most_10_messages_and_20_kb_per_second(
    monkeypatch: pytest.MonkeyPatch, n_steps: int
) -> None:
    """Counted on a fake clock at 50 steps/s, an evaluation every 100 steps (deterministic, not timed)."""
    dash = LoRADashboard(model=tiny_llama(), tokenizer=object(), train_data=_blocks(), train=TrainConfig())
    loop = FakeLoop()
    dash._flusher.clock, dash._flusher.call_later = loop.time, loop.call_later
    sent = _Sent(monkeypatch)

    def events() -> Any:
        yield RunStarted("r", "/tmp/r", {}, None, "cpu", "CPU", 10, 100, n_steps, 128, 0.0)
        for i in range(1, n_steps + 1):
            yield _step(i, n_steps, 3.0 + math.sin(i) + (20.0 if i == n_steps // 3 else 0.0))
            if i % 100 == 0:
                yield EvalMetrics(i, 2.5, math.exp(2.5), 2.5)

    async def watch() -> Any:
        dash.watch(ScriptedRun(events(), loop, 1 / 50))
        return await dash.wait()

    asyncio.run(watch())
    seconds = n_steps / 50
    assert len(sent.messages) / seconds <= 10
    assert sum(size for _, size in sent.messages) / 1e3 / seconds <= 20
    assert not any(w is dash.charts.lr_line for w, _ in sent.messages)  # static: drawn before the run
    assert len(dash.charts.raw_loss.x) <= dash.max_points
    assert float(np.max(dash.charts.raw_loss.y)) >= 20.0  # the spike survives decimation
