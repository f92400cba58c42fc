"""A scripted stand-in for the LoRATrainer and a fake loop clock, to drive LoRADashboard without training.

The fake publishes the same typed events as the real trainer (``lora_widgets.events.types``), in the same
order, so the dashboard's handler, throttle and callouts are exercised exactly as in a real run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from lora_widgets.events.types import (
    EvalMetrics,
    RunFailed,
    RunFinished,
    RunStarted,
    RunStopped,
    StateChanged,
    StepMetrics,
)


@dataclass(frozen=True)
class FakeTrainConfig:
    """The TrainConfig fields the dashboard reads."""

    learning_rate: float = 3e-3
    schedule: str = "cosine"
    warmup_steps: int = 0
    batch_size: int = 4
    grad_accum_steps: int = 1
    epochs: int = 1
    max_steps: int | None = 20
    precision: str = "fp32"
    base: str | None = None
    seed: int = 0
    block_size: int = 32
    val_fraction: float = 0.1
    device: str = "cpu"
    eval_every: int = 5
    early_stopping: Any = None  # the early-stop patience control's field (None: off)


class FakeTrainer:
    """Publishes RunStarted, StepMetrics (+ EvalMetrics every ``eval_every``), then one RunEnded."""

    instances: list[FakeTrainer] = []  # noqa: RUF012 - test bookkeeping

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        train_data: Any,
        eval_data: Any = None,
        lora: Any = None,
        config: Any = None,
        fail_at: int | None = None,
        fail_reason: str = "oom",
        step_sleep: float = 0.0,
    ) -> None:
        self.model, self.lora, self.config = model, lora, config
        self.total_steps = int(config.max_steps or 10)
        self.fail_at, self.fail_reason, self.step_sleep = fail_at, fail_reason, step_sleep
        self._subscribers: list[Callable[[Any], None]] = []
        self._stop = False
        self._paused = asyncio.Event()
        self._paused.set()
        self.state = "idle"
        self.history = {"step": []}
        self.run_dir = "/tmp/fake-run"
        self.saved_to: list[str] = []
        self._running = False
        FakeTrainer.instances.append(self)

    @property
    def running(self) -> bool:
        return self._running

    def subscribe(self, callback: Callable[[Any], None]) -> Callable[[], None]:
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def _emit(self, event: Any) -> None:
        for cb in list(self._subscribers):
            cb(event)

    def lr_schedule(self) -> np.ndarray:
        return np.linspace(self.config.learning_rate, 0.0, self.total_steps)

    def stop(self) -> None:
        self._stop = True
        self._paused.set()

    def pause(self) -> None:
        self._paused.clear()
        self._emit(StateChanged(state="paused", step=0))

    def resume(self) -> None:
        self._paused.set()
        self._emit(StateChanged(state="running", step=0))

    def save_adapter(self, path: Any) -> Any:
        self.saved_to.append(str(path))
        return path

    async def run(self) -> Any:
        self._running = True
        try:
            return await self._run()
        finally:
            self._running = False

    async def _run(self) -> Any:
        self._emit(
            RunStarted("r1", self.run_dir, {}, {}, "cpu", "CPU", 1000, 100000, self.total_steps, 128, 0.0)
        )
        self._emit(StateChanged(state="running", step=0))
        loss = 5.0
        step = 0
        for step in range(1, self.total_steps + 1):
            await self._paused.wait()
            if self._stop:
                end: Any = RunStopped(
                    step - 1, 1.0, loss, None, "/tmp/fake-run/adapter", "stopped by the user"
                )
                self._emit(end)
                return end
            if self.fail_at == step:
                end = RunFailed(step, 1.0, loss, None, None, "CUDA out of memory", reason=self.fail_reason,
                                error_type="OutOfMemoryError", suggestions=("use batch_size=2",))  # fmt: skip
                self._emit(end)
                return end
            loss *= 0.97
            self._emit(StepMetrics(step, self.total_steps, step / self.total_steps, loss, 1e-3, 1.0, 1000.0,
                                   step * 0.01, 0.1, 2**20 * 100))  # fmt: skip
            if step % self.config.eval_every == 0:
                self._emit(EvalMetrics(step, loss + 0.1, float(np.exp(loss + 0.1)), loss + 0.1))
            await asyncio.sleep(self.step_sleep)
        end = RunFinished(step, 1.0, loss, loss + 0.1, None, "done")
        self._emit(end)
        return end


# ---------------------------------------------------------------------------------------------- tests
import math  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import ipywidgets  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from lora_widgets.events.history import EMA, Column, History, debiased_ema, decimate_indices  # noqa: E402
from lora_widgets.lora.layers import LoRAConfig, apply_lora, has_lora  # noqa: E402
from lora_widgets.widget.dashboard import DashboardPanel, LoRADashboard, validate_settings  # noqa: E402
from lora_widgets.widget.static_summary import loss_curve_svg  # noqa: E402
from lora_widgets.widget.throttle import Throttle  # noqa: E402
from tests.helpers import FakeLoop, ScriptedRun, tiny_llama  # noqa: E402


def make_dash(factory: Callable[..., Any] = FakeTrainer, **train: Any) -> LoRADashboard:
    dash = LoRADashboard(
        model=tiny_llama(),
        tokenizer=object(),
        train_data=torch.randint(0, 128, (64, 32)),
        lora=LoRAConfig(r=4),
        train=FakeTrainConfig(**train),
    )
    dash._trainer_factory = factory
    return dash


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def _step(i: int, total: int, loss: float = 2.0) -> StepMetrics:
    return StepMetrics(i, total, i / total, loss, 1e-3, 1.0, 1000.0, i * 0.01, 1.0, 2**20)


# --- pure policies -----------------------------------------------------------------------------------
def test_throttle_spaces_flushes_whatever_the_request_rate() -> None:
    th = Throttle(0.25)
    flush_times = []
    due: float | None = None
    now = 0.0
    for _ in range(10_000):  # a request every millisecond for 10 s
        delay = th.request(now)
        if delay is not None:
            due = now + delay
        if due is not None and now >= due - 1e-12:
            th.flushed(now)
            flush_times.append(now)
            due = None
        now += 0.001
    gaps = np.diff(flush_times)
    assert flush_times[0] == 0.0  # the first update shows at once
    assert gaps.min() >= 0.25 - 1e-6
    assert 35 <= len(flush_times) <= 41  # ~4 per second over 10 s


def test_throttle_rejects_a_bad_interval() -> None:
    with pytest.raises(ValueError, match="interval"):
        Throttle(0)


@pytest.mark.parametrize("n", [0, 5, 2000, 2001, 10_000, 100_000])
def test_decimation_is_bounded_sorted_and_keeps_the_ends(n: int) -> None:
    y = np.random.default_rng(0).normal(size=n)
    idx = decimate_indices(y, 2000)
    assert len(idx) <= 2000
    assert np.all(np.diff(idx) > 0)
    if n:
        assert idx[0] == 0 and idx[-1] == n - 1


def test_decimation_keeps_a_spike_that_striding_would_drop() -> None:
    y = np.ones(100_000)
    y[31_337] = 50.0
    y[77_777] = -3.0
    idx = decimate_indices(y, 1000)
    assert 31_337 in idx and 77_777 in idx


def test_decimation_survives_nan() -> None:
    y = np.arange(10_000, dtype=float)
    y[5000:5100] = np.nan
    idx = decimate_indices(y, 100)
    assert len(idx) <= 100 and idx[-1] == 9999


def test_ema_is_debiased_and_incremental_matches_batch() -> None:
    x = np.array([4.0, 3.0, math.nan, 2.0, 1.0])
    batch = debiased_ema(x, 0.9)
    assert batch[0] == pytest.approx(4.0)  # no pull towards zero
    ema = EMA(0.9)
    assert [ema.update(v) for v in x] == pytest.approx(list(batch))


def test_columns_grow_and_fill_missing_with_nan() -> None:
    """The growable column (one implementation, in history.py) and the history's unknown fields."""
    a, b = Column(capacity=2), Column(capacity=2)
    for i in range(5):
        a.append(i)
        b.append(None)
    assert list(a.view()) == [0, 1, 2, 3, 4] and np.isnan(b.view()).all() and a.view()[-1] == 4
    h = History()
    h.record(_step(1, 1))  # no reserved memory or GPU utilisation on a CPU
    assert np.isnan(h.memory_reserved_bytes).all() and np.isnan(h.gpu_utilization).all()
    with pytest.raises(AttributeError, match="arrays"):
        h.no_such_column  # noqa: B018


def test_static_svg_is_standalone_and_drops_non_finite_points() -> None:
    svg = loss_curve_svg([1, 2, 3], [3.0, math.nan, 2.0], [3.0, 2.9, 2.5], [2], [2.8], title="a<b")
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert "a&lt;b" in svg and svg.count("<circle") == 1
    assert "nan" not in svg.lower().replace("nats", "")
    assert "no data" in loss_curve_svg([], [])


# --- construction and validation ---------------------------------------------------------------------
def test_unknown_keyword_is_a_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match=r"rank.*lora=LoRAConfig"):
        LoRADashboard(rank=8)  # type: ignore[call-arg]


def test_model_object_without_tokenizer_is_refused() -> None:
    with pytest.raises(TypeError, match="tokenizer is required"):
        LoRADashboard(model=tiny_llama(), train=FakeTrainConfig())


@pytest.mark.parametrize("model", [3, {"model": "gpt2"}])
def test_a_model_that_is_no_model_is_named(model: Any) -> None:
    with pytest.raises(TypeError, match=r"model must be a transformers model .*, got (int|dict)"):
        LoRADashboard(model=model, tokenizer=object(), train=FakeTrainConfig())


def test_every_trait_is_documented_and_assets_exist() -> None:
    panel = DashboardPanel()
    for name in panel.trait_names(sync=True):
        if name.startswith("_") or name in ipywidgets.DOMWidget().trait_names():
            continue
        assert panel.traits()[name].help, f"trait {name} has no help"
    static = Path(__file__).resolve().parents[1] / "lora_widgets" / "widget" / "static"
    assert (static / "dashboard.js").is_file()
    # the front end renders every control from the spec trait (tests/test_controls.py checks the JS side)
    assert set(DashboardPanel.CONFIG_TRAITS) <= {s["name"] for s in panel.control_specs}


def test_controls_start_from_the_given_configs() -> None:
    dash = make_dash(max_steps=37, learning_rate=1e-2, warmup_steps=3)
    assert (dash.panel.rank, dash.panel.max_steps, dash.panel.learning_rate) == (4, 37, 1e-2)
    lora, train = dash.current_configs()
    assert lora == LoRAConfig(r=4) and train.max_steps == 37
    dash.panel.max_steps = 0
    assert dash.current_configs()[1].max_steps is None  # 0 = use epochs
    # the LR preview is drawn before any training
    assert len(dash.charts.lr_line.y) > 0


@pytest.mark.parametrize(
    ("changes", "flagged"),
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"rank": 0}, "rank"),
        ({"dropout": 1.0}, "dropout"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"precision": "fp16"}, "precision"),
        ({"grad_accum_steps": 0}, "grad_accum_steps"),
    ],
)
def test_invalid_combinations_are_flagged_before_train(changes: dict[str, Any], flagged: str) -> None:
    dash = make_dash()
    assert dash.panel.errors == {}
    for name, value in changes.items():
        setattr(dash.panel, name, value)
    assert flagged in dash.panel.errors
    with pytest.raises(ValueError, match=flagged.split("_")[0]):
        run(dash.run())
    assert not FakeTrainer.instances or FakeTrainer.instances[-1].model is not dash.model


def test_batch_larger_than_the_data_is_flagged() -> None:
    values = {"rank": 8, "alpha": 16.0, "dropout": 0.0, "learning_rate": 1e-3, "schedule": "cosine",
              "warmup_steps": 0, "batch_size": 8, "grad_accum_steps": 4, "epochs": 1, "max_steps": 10,
              "precision": "fp32", "seed": 0}  # fmt: skip
    assert validate_settings(values, "cpu", n_train_blocks=100) == {}
    errors = validate_settings(values, "cpu", n_train_blocks=20)
    assert "32 sequences per step" in errors["batch_size"] and "20 blocks" in errors["batch_size"]
    assert "precision" not in validate_settings({**values, "precision": "fp16"}, "cuda")


# --- runs, buttons, states -----------------------------------------------------------------------
def test_python_api_run_to_finished() -> None:
    dash = make_dash()
    assert dash.state == "idle" and dash.trainer is None
    result = run(dash.run())
    assert isinstance(result, RunFinished) and dash.state == "finished"
    assert dash.panel.progress["step"] == 20 and dash.panel.progress["total"] == 20
    assert dash.panel.callouts[0]["kind"] in ("success", "warning")
    assert any(c["kind"] == "success" for c in dash.panel.callouts)
    assert dash.panel.summary["best_val_loss"] == pytest.approx(result.best_val_loss)
    assert len(dash.charts.raw_loss.x) == 20 and len(dash.charts.val_loss.x) == 4
    assert len(dash.charts.lr_marker.x) == 1 and dash.charts.lr_marker.x[0] == 20


def test_buttons_start_pause_resume_stop_and_double_click_starts_one_run() -> None:
    FakeTrainer.instances.clear()

    def slow(*a: Any, **k: Any) -> FakeTrainer:
        return FakeTrainer(*a, **k, step_sleep=0.005)

    dash = make_dash(slow, max_steps=400)
    states = []

    async def scenario() -> None:
        dash._on_panel_msg(dash.panel, {"type": "train"}, [])
        dash._on_panel_msg(dash.panel, {"type": "train"}, [])  # double click
        states.append(dash.state)
        await asyncio.sleep(0.05)
        dash._on_panel_msg(dash.panel, {"type": "pause"}, [])
        await asyncio.sleep(0.02)
        states.append(dash.state)
        step_paused = len(dash.runs[-1].history)
        await asyncio.sleep(0.05)
        assert len(dash.runs[-1].history) == step_paused  # nothing moves while paused
        dash._on_panel_msg(dash.panel, {"type": "resume"}, [])
        await asyncio.sleep(0.02)
        states.append(dash.state)
        dash._on_panel_msg(dash.panel, {"type": "stop"}, [])
        await dash.wait()
        states.append(dash.state)

    run(scenario())
    assert len(FakeTrainer.instances) == 1
    assert states == ["running", "paused", "running", "stopped"]
    assert isinstance(dash.runs[-1].result, RunStopped)


def test_start_while_running_raises() -> None:
    dash = make_dash(lambda *a, **k: FakeTrainer(*a, **k, step_sleep=0.01), max_steps=100)

    async def scenario() -> None:
        dash.start()
        with pytest.raises(RuntimeError, match="already in progress"):
            dash.start()
        dash.stop()
        await dash.wait()

    run(scenario())
    assert len(dash.runs) == 1


def test_start_without_a_running_loop_says_how() -> None:
    with pytest.raises(RuntimeError, match="running asyncio loop"):
        make_dash().start()


@pytest.mark.parametrize(("reason", "title"), [("oom", "Out of memory"), ("nan", "NaN")])
def test_failure_shows_a_danger_callout_with_suggestions(reason: str, title: str) -> None:
    dash = make_dash(lambda *a, **k: FakeTrainer(*a, **k, fail_at=5, fail_reason=reason))
    result = run(dash.run())
    assert isinstance(result, RunFailed) and dash.state == "failed"
    danger = [c for c in dash.panel.callouts if c["kind"] == "danger"]
    assert len(danger) == 1 and title in danger[0]["title"]
    assert "out of memory" in danger[0]["message"] and danger[0]["suggestions"] == ["use batch_size=2"]
    assert dash.panel.callouts[0] is danger[0] or dash.panel.callouts[0] == danger[0]  # shown first


def test_an_exception_escaping_the_trainer_becomes_a_failed_run() -> None:
    class Exploding(FakeTrainer):
        async def run(self) -> Any:
            raise RuntimeError("boom")

    dash = make_dash(Exploding)
    result = run(dash.run())
    assert isinstance(result, RunFailed) and result.error_type == "RuntimeError"
    assert dash.state == "failed" and "boom" in dash.panel.callouts[0]["message"]


def test_a_trainer_that_cannot_be_built_fails_visibly() -> None:
    def bad(*a: Any, **k: Any) -> Any:
        raise ValueError("train_data is empty; pass at least one text")

    dash = make_dash(bad)

    async def click() -> None:
        dash._on_panel_msg(dash.panel, {"type": "train"}, [])  # from the browser: shown, not raised

    run(click())
    assert dash.state == "failed"
    assert "train_data is empty" in dash.panel.callouts[0]["message"]


def test_second_run_leaves_replacing_the_adapter_to_the_trainer_and_overlays_the_first() -> None:
    dash = make_dash()
    run(dash.run())
    apply_lora(dash.model, LoRAConfig(r=2))  # what the real trainer leaves on the model
    dash.panel.rank = 16
    run(dash.run())
    # The dashboard never strips the first run's adapter itself: the next LoRATrainer replaces it, and puts it
    # back if the new settings fail (tests/test_trainer_hardening.py), so a bad setting loses nothing.
    assert has_lora(dash.model)
    assert [r.lora.r for r in dash.runs] == [4, 16]
    assert len(dash.charts.previous_runs) == 1
    assert dash.charts.previous_runs[0].labels == [dash.runs[0].label] and "r=4" in dash.runs[0].label
    assert dash.charts.previous_runs[0] in dash.charts.loss_figure.marks


def test_log_scale_toggle_swaps_the_scale_of_every_loss_mark() -> None:
    dash = make_dash()
    run(dash.run())
    run(dash.run())
    dash.panel.log_scale = True
    from bqplot import LogScale

    marks = [*dash.charts.previous_runs, dash.charts.raw_loss, dash.charts.smooth_loss, dash.charts.val_loss]
    assert all(isinstance(m.scales["y"], LogScale) for m in marks)
    assert isinstance(dash.charts._loss_y_axis.scale, LogScale)
    dash.panel.log_scale = False
    assert not isinstance(dash.charts.raw_loss.scales["y"], LogScale)


def test_save_adapter_delegates_to_the_trainer(tmp_path: Path) -> None:
    dash = make_dash()
    with pytest.raises(ValueError, match="start a run first"):
        dash.save_adapter(tmp_path / "a")
    run(dash.run())
    dash.save_adapter(tmp_path / "a")
    assert dash.trainer.saved_to == [str(tmp_path / "a")]  # type: ignore[union-attr]


# --- streaming discipline ----------------------------------------------------------------------------
class SendCounter:
    """Counts messages and bytes that widgets send (patches ``Widget._send``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        if int(ipywidgets.__version__.split(".")[0]) < 8:  # the lowest-versions job (Colab's 7.7.1)
            pytest.skip("ipywidgets 7 sends nothing from a widget whose comm has no kernel, so there is nothing "
                        "to count here; the main job (ipywidgets 8) counts the messages")  # fmt: skip
        self.messages = 0
        self.bytes = 0
        counter = self

        def _send(widget: Any, msg: Any, buffers: Any = None) -> None:
            import json

            counter.messages += 1
            counter.bytes += len(json.dumps(msg, default=str)) + sum(
                memoryview(b).nbytes for b in buffers or []
            )

        monkeypatch.setattr(ipywidgets.Widget, "_send", _send)


def feed(dash: LoRADashboard, loop: FakeLoop, n_steps: int, steps_per_s: float) -> None:
    """Run a scripted run of n_steps through the dashboard (as any RunSource) on a fake clock."""
    dash._flusher.clock, dash._flusher.call_later = loop.time, loop.call_later

    def events() -> Any:
        yield RunStarted("r", "/tmp/r", {}, {}, "cpu", "CPU", 10, 100, n_steps, 128, 0.0)
        for i in range(1, n_steps + 1):
            yield _step(i, n_steps, 3.0 + math.sin(i))
            if i % 100 == 0:
                yield EvalMetrics(i, 2.5, math.exp(2.5), 2.5)

    run(watched(dash, ScriptedRun(events(), loop, 1.0 / steps_per_s)))


async def watched(dash: LoRADashboard, source: Any) -> Any:
    dash.watch(source)
    return await dash.wait()


def test_handler_only_records_and_flushes_are_throttled(monkeypatch: pytest.MonkeyPatch) -> None:
    dash = make_dash()
    dash.flush_interval = 0.25  # the throttle's policy at 4 per second (the default is 1 per second)
    counter = SendCounter(monkeypatch)
    loop = FakeLoop()
    feed(dash, loop, 5000, steps_per_s=500)  # 10 s of fake time
    flushes = dash._flusher.flushes - 1  # the run's final flush bypasses the throttle
    assert 35 <= flushes <= 42  # ~4 per second, not 5000
    assert len(dash.charts.raw_loss.x) <= dash.max_points
    assert dash.charts.raw_loss.x[-1] == 5000  # the latest step is always shown
    assert counter.messages <= 12 * flushes  # a handful of messages per flush


def test_a_long_run_sends_no_more_per_flush_than_a_short_one(monkeypatch: pytest.MonkeyPatch) -> None:
    largest = []
    for n in (2_000, 50_000):
        dash = make_dash()
        counter = SendCounter(monkeypatch)
        sizes: list[int] = []
        flush = dash._flush

        def measured(
            flush: Callable[[], None] = flush, counter: SendCounter = counter, sizes: list[int] = sizes
        ) -> None:
            before = counter.bytes
            flush()
            sizes.append(counter.bytes - before)

        dash._flush = measured  # type: ignore[method-assign]
        feed(dash, FakeLoop(), n, steps_per_s=n / 10)  # both last 10 s of fake time
        largest.append(max(sizes))
    # the 2,000-step run ends with 2,000 points per line; 50,000 steps are decimated to at most that
    assert largest[1] <= largest[0] * 1.05


def test_static_summary_lists_runs_with_an_svg_curve() -> None:
    dash = make_dash()
    run(dash.run())
    table = dash.static_summary_html()
    assert "<table>" in table and dash.runs[0].label in table and "finished" in table
    svg = dash.static_summary_svg()
    assert svg.startswith("<svg") and len(re.findall("<polyline", svg)) == 2


# --- the real trainer ----------------------------------------------------------------------------------
def test_a_short_real_run_on_a_tiny_model_finishes(tmp_path: Path) -> None:
    trainer_mod = pytest.importorskip("lora_widgets.training.config")
    from tests.helpers import patterned_batch

    blocks = patterned_batch(8, 32).repeat(4, 1)  # [32, 32] learnable token ids
    config = trainer_mod.TrainConfig(
        max_steps=12, batch_size=4, warmup_steps=2, eval_every=4, learning_rate=1e-2, output_dir=str(tmp_path)
    )
    dash = LoRADashboard(model=tiny_llama(), train_data=blocks, lora=LoRAConfig(r=4), train=config)
    dash.panel.target_modules = "q_proj,v_proj"
    result = run(dash.run())
    assert isinstance(result, RunFinished), result
    assert dash.state == "finished" and dash.panel.progress["step"] == 12
    assert dash.panel.summary["adapter_estimated"] is False and dash.panel.summary["adapter_bytes"] > 0
    assert len(dash.history.step) == 12 and list(dash.runs[0].lora.target_modules) == ["q_proj", "v_proj"]
    assert len(dash.charts.val_loss.x) >= 3  # evaluations at steps 4, 8, 12
    out = dash.save_adapter(tmp_path / "adapter")
    assert (out / "adapter_config.json").exists()
    # a second run from the same dashboard replaces the adapters and overlays the first run
    dash.panel.rank = 2
    result = run(dash.run())
    assert isinstance(result, RunFinished) and len(dash.charts.previous_runs) == 1
    assert (
        dash.trainer is not None
        and dash.trainer.report.trainable_params < dash.runs[0].trainer.report.trainable_params
    )


def test_loss_range_leaves_headroom_for_the_legend_and_follows_the_log_toggle() -> None:
    dash = make_dash()
    run(dash.run())
    scale = dash.charts._loss_y_linear
    lo, hi = float(np.min(dash.charts.raw_loss.y)), float(np.max(dash.charts.raw_loss.y))
    assert scale.min < lo and scale.max > hi + 0.5 * (hi - lo)  # the top is left to the legend
    dash.panel.log_scale = True
    log = dash.charts._loss_y_log
    assert 0 < log.min < lo and log.max > hi


@pytest.mark.slow
def test_headless_execution_completes_and_keeps_the_static_summary(tmp_path: Path) -> None:
    """What nbval / ``jupyter nbconvert --execute`` do: no front end, ``start()`` then ``await wait()``."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("lora_widgets.models")
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            "from lora_widgets import LoRADashboard, TrainConfig\n"
            f"dash = LoRADashboard(train=TrainConfig(max_steps=6, warmup_steps=1, eval_every=3, output_dir={str(tmp_path)!r}))\n"
            "dash"
        ),
        nbformat.v4.new_code_cell("dash.start()\nresult = await dash.wait()\nprint(result.kind, dash.state)"),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    # stdout only: transformers 4.x logs a warning about fp32 logits to stderr when the model runs without labels
    stdout = [o["text"] for o in nb.cells[1].outputs if o.get("name") == "stdout"]
    assert "".join(stdout).strip() == "finished finished"
    # one output: the widget's view, with the summary as the fallback of front ends without widgets (GitHub,
    # nbconvert); a front end that renders the widget shows it alone, not the summary under it
    (output,) = [o for o in nb.cells[0].outputs if o["output_type"] != "stream"]
    assert "application/vnd.jupyter.widget-view+json" in output["data"]
    html = output["data"]["text/html"]
    assert "static summary" in html and "finished" in html
    assert "<polyline" in html  # the loss curve, inline


def test_preflight_that_does_not_fit_warns_but_lets_the_run_start(monkeypatch: pytest.MonkeyPatch) -> None:
    import lora_widgets.memory.fit as memory

    class NoFit:
        fits = False
        suggestions: ClassVar[list[str]] = [
            "batch_size=2 fits (predicted 3.1 GiB)",
            "gradient checkpointing fits",
        ]

        def message(self) -> str:
            return "Predicted peak 20 GiB vs 16 GiB available on cuda: will NOT fit."

    seen: dict[str, Any] = {}

    def fake_preflight(model: Any, lora: Any, **kw: Any) -> NoFit:
        seen.update(kw, lora=lora)
        return NoFit()

    monkeypatch.setattr(memory, "preflight", fake_preflight)
    dash = make_dash(batch_size=4)
    result = run(dash.run())
    assert isinstance(result, RunFinished)  # the user may still start
    warning = [c for c in dash.panel.callouts if c["title"] == "This run may not fit in memory"]
    assert len(warning) == 1 and "will NOT fit" in warning[0]["message"]
    assert warning[0]["suggestions"] == NoFit.suggestions
    assert seen["batch_size"] == 4 and seen["seq_len"] == 32 and seen["lora"].r == 4


def test_a_failed_start_does_not_overlay_the_previous_run_twice() -> None:
    dash = make_dash()
    run(dash.run())

    def bad(*a: Any, **k: Any) -> Any:
        raise ValueError("nope")

    dash._trainer_factory = bad
    for _ in range(2):
        with pytest.raises(ValueError, match="nope"):
            run(dash.run())
    dash._trainer_factory = FakeTrainer
    run(dash.run())
    assert len(dash.charts.previous_runs) == 1


def test_missing_browser_fails_under_ci_and_is_skipped_with_the_install_command_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.e2e import conftest as e2e

    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        e2e._missing("Chromium")
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="apt-get install -y chromium"):
        e2e._missing(f"Chromium; install it with `{e2e.INSTALL_HINT}`")


def test_a_config_check_the_form_does_not_know_still_disables_train() -> None:
    @dataclass(frozen=True)
    class StrictConfig(FakeTrainConfig):
        def __post_init__(self) -> None:
            if self.seed == 13:
                raise ValueError("seed 13 is unlucky; pick another seed")

    dash = LoRADashboard(model=tiny_llama(), train_data=torch.randint(0, 128, (64, 32)), train=StrictConfig())
    dash.panel.seed = 13
    assert dash.panel.errors == {"settings": "seed 13 is unlucky; pick another seed"}
    dash.panel.seed = 1
    assert dash.panel.errors == {}


def test_stop_right_after_train_is_not_lost() -> None:
    class NotYetRunning(FakeTrainer):
        running = False  # like the real LoRATrainer before its task is first scheduled

    dash = make_dash(NotYetRunning)

    async def scenario() -> Any:
        dash._on_panel_msg(dash.panel, {"type": "train"}, [])
        dash._on_panel_msg(dash.panel, {"type": "stop"}, [])  # same loop iteration
        return await dash.wait()

    result = run(scenario())
    assert isinstance(result, RunStopped) and dash.state == "stopped"


def test_gpu_series_reach_the_memory_chart() -> None:
    from lora_widgets.widget.charts import Charts

    dash = make_dash()
    dash.charts = Charts(gpu=True)  # what a CUDA device gets
    assert dash.charts.gpu_util in dash.charts.memory_figure.marks
    loop = FakeLoop()
    dash._flusher.clock, dash._flusher.call_later = loop.time, loop.call_later
    steps = (
        StepMetrics(i, 10, i / 10, 2.0, 1e-3, 1.0, 1e4, i, 1.0, 2**30, 2**31, 87.0) for i in range(1, 11)
    )
    run(watched(dash, ScriptedRun(steps, loop, 0.1)))
    assert list(dash.charts.memory.y) == [1024.0] * 10  # MiB
    assert list(dash.charts.memory_reserved.y) == [2048.0] * 10
    assert list(dash.charts.gpu_util.y) == [87.0] * 10


def test_colab_widget_support_is_switched_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """In Colab (``google.colab.output`` imported) building a dashboard enables third-party widgets, once.

    anywidget does this when the panel is created; bqplot's figures need it too, and get it from the same call.
    """
    import sys
    import types

    calls: list[str] = []
    output = types.ModuleType("google.colab.output")
    output.enable_custom_widget_manager = lambda: calls.append("enabled")  # type: ignore[attr-defined]
    colab = types.ModuleType("google.colab")
    colab.output = output  # type: ignore[attr-defined]
    google = types.ModuleType("google")
    google.colab = colab  # type: ignore[attr-defined]
    for name, module in (("google", google), ("google.colab", colab), ("google.colab.output", output)):
        monkeypatch.setitem(sys.modules, name, module)
    make_dash()
    assert calls == ["enabled"]


def test_outside_colab_nothing_is_switched_on(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    for name in [m for m in sys.modules if m == "google" or m.startswith("google.")]:
        monkeypatch.delitem(sys.modules, name)
    make_dash()
    # no Colab module is imported or required outside Colab (anywidget switches Colab's widget manager on there)
    assert not [m for m in sys.modules if m.startswith("google.colab")]


def test_validation_dots_are_capped_and_keep_the_best() -> None:
    """Each dot is an SVG element in the page, so a long run's validation points are capped lower."""
    dash = make_dash()
    loop = FakeLoop()
    dash._flusher.clock, dash._flusher.call_later = loop.time, loop.call_later
    n_evals = 1_000

    def events() -> Any:
        yield RunStarted("r", "/tmp/r", {}, {}, "cpu", "CPU", 10, 100, 100_000, 128, 0.0)
        for k in range(1, n_evals + 1):
            val = 3.0 + 0.2 * math.sin(k / 7) + (-1.0 if k == 613 else 0.0)  # the best one, mid-run
            yield _step(100 * k, 100_000)
            yield EvalMetrics(100 * k, val, math.exp(val), min(val, 2.0))

    run(watched(dash, ScriptedRun(events(), loop, 0.05)))
    x, y = dash.charts.val_loss.x, dash.charts.val_loss.y
    assert len(x) <= dash.max_markers < n_evals
    assert 61_300 in set(x.tolist()) and math.isclose(
        float(y.min()), 2.0 + 0.2 * math.sin(613 / 7), rel_tol=1e-6
    )
    assert x[-1] == 100_000  # the latest evaluation is always shown


def test_a_data_split_is_accepted_with_its_own_validation_part() -> None:
    from lora_widgets.data.text import DataSplit

    blocks = torch.randint(0, 128, (40, 32))
    split = DataSplit(
        train=blocks[:30], val=blocks[30:], block_size=32, n_tokens=40 * 32, split="by document: x"
    )
    dash = LoRADashboard(
        model=tiny_llama(),
        tokenizer=object(),
        train_data=split,
        lora=LoRAConfig(r=4),
        train=FakeTrainConfig(),
    )
    train, val, how = dash._data
    assert torch.equal(train, split.train) and torch.equal(val, split.val) and how == "by document: x"
    assert dash.panel.summary.get("train_blocks") == 30
