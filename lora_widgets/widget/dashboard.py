"""``LoRADashboard``: controls, Train/Pause/Stop, progress, summary and live charts for a LoRA fine-tune.

The dashboard is a view of an event stream. It drives any :class:`~lora_widgets.events.types.RunSource` (the
:class:`~lora_widgets.LoRATrainer` its Train button builds, a :class:`~lora_widgets.events.replay.Replay` of a finished
run's ``metrics.jsonl``, a bridge to another trainer) and reads nothing from it but its typed events::

    controls --configs--> LoRATrainer ----+
                          Replay -----+--events--> RunSession --> RunRecord (History) --flush--> Charts, panel
                          any source -+                                                          AdapterCharts

Each job has its module in ``widget/``: loading (model, data), session (the run's task), record (what the
events said), throttle (when to push), charts (the marks), adapter_charts (is LoRA learning? the heatmap of
``||dW||/||W||``), readouts (progress, summary, sample answers), callouts (including the run's alerts),
static_summary. This class wires them.

Network: the event handler only records; a push happens at most once per ``flush_interval`` (1 s) and
re-sends only the marks that changed, at most one point per pixel column each (``max_points``), so a
100,000-step run costs what a 1,000-step run costs (``benchmarks/bench_streaming.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ipywidgets import Layout, VBox

from lora_widgets.events.history import History
from lora_widgets.events.replay import Replay
from lora_widgets.events.types import (
    AdapterStats,
    AlertRaised,
    DataPrepared,
    EvalMetrics,
    Event,
    Notice,
    RunEnded,
    RunSource,
    RunStarted,
    SampleGenerations,
    StateChanged,
    StepMetrics,
)
from lora_widgets.events.watch import RunDirWatch
from lora_widgets.lora.layers import LoRAConfig, count_parameters
from lora_widgets.widget import attach, callouts, controls, loading, readouts
from lora_widgets.widget.bases import BaseModels, with_model_base
from lora_widgets.widget.callouts import Callouts
from lora_widgets.widget.charts import MAX_MARKERS, POINTS_PER_LINE
from lora_widgets.widget.data_view import DataView, data_facts
from lora_widgets.widget.frontend import MarimoDisplay, build_front_end, resolve_renderer
from lora_widgets.widget.labels import label_from_started
from lora_widgets.widget.panel import DashboardPanel, validate_settings
from lora_widgets.widget.record import RunRecord
from lora_widgets.widget.session import RunSession, new_trainer_run, running_loop
from lora_widgets.widget.static_summary import StaticSummary, StaticSummaryViews
from lora_widgets.widget.throttle import FlushScheduler

if TYPE_CHECKING:
    from lora_widgets.training.config import TrainConfig

__all__ = ["DashboardPanel", "LoRADashboard", "RunRecord", "validate_settings"]

logger = logging.getLogger(__name__)

_TRAIN_FIELDS = controls.config_fields(controls.TrainConfig)
_LOGGED_LR_EVERY = 5  # flushes between redraws of a logged LR line (it moves slowly; its marker every flush)


class LoRADashboard(
    StaticSummaryViews, MarimoDisplay, VBox
):  # the mixins first: ipywidgets 7's VBox has an _ipython_display_ too
    """Train a LoRA adapter live in a notebook: controls, Train/Pause/Stop, progress, summary, charts.

    Args:
        model: a ``transformers`` causal LM, a hub id or local path (loaded with
            :func:`lora_widgets.models.load_model`), or ``None`` for the shipped base model. A model that
            already carries LoRA adapters (a PEFT model, or one given to ``apply_lora``) is trained as it
            is, as ``LoRATrainer(lora=None)`` does: the LoRA controls then do not apply.
        tokenizer: the model's tokenizer (required when ``model`` is a model object).
        train_data: any source :func:`lora_widgets.data.text.prepare_data` accepts, token blocks
            ``[n, T]``, or a :class:`~lora_widgets.data.text.DataSplit` (its ``val`` part validates);
            ``None`` for the demo corpus ("python-docs"). The same rule as the trainer's
            (:func:`lora_widgets.data.text.train_val_blocks`).
        eval_data: validation source; ``None`` holds out ``train.val_fraction`` of ``train_data``.
        lora: the starting :class:`~lora_widgets.lora.layers.LoRAConfig` (the controls start from it).
            ``None`` starts from r=8, alpha=16 on all linear layers: on the shipped model that lowers
            the demo corpus's validation loss by ~21% in 200 steps, where q,v alone manage ~4%
            (adapting every linear layer is the QLoRA paper's recommendation, Dettmers et al. 2023, sec. 4).
        train: the starting :class:`~lora_widgets.training.config.TrainConfig`; fields without a control
            (eval_every, output_dir, block_size, ...) are kept for every run.
        trainer: instead of all of the above, your ``transformers.Trainer`` / ``trl.SFTTrainer`` (or any
            :class:`~lora_widgets.events.types.RunSource`): Train runs its ``train()`` in a background thread
            (:class:`~lora_widgets.hf.run.HFRun`), Pause/Stop act between steps, its settings are read-only.

    Display it (last line of a cell) to show it. ``start()``, ``stop()``, ``pause()``, ``resume()`` and
    ``await wait()`` do from Python what the buttons do. ``watch(source)`` shows any other
    :class:`~lora_widgets.events.types.RunSource`, and ``replay(path)`` a finished run's ``metrics.jsonl``.
    """

    flush_interval: float = 1.0
    """Seconds between two pushes to the browser (at most one per second)."""
    max_points: int = POINTS_PER_LINE
    """Points per chart line: one per pixel column of a chart's plot area (min-max decimation keeps spikes)."""
    max_markers: int = MAX_MARKERS
    """Validation dots per chart (each is an SVG element, so fewer; the best always survives)."""

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        train_data: Any = None,
        eval_data: Any = None,
        lora: LoRAConfig | None = None,
        train: TrainConfig | None = None,
        trainer: Any = None,
        renderer: str = "auto",
        **kwargs: Any,
    ) -> None:
        renderer = resolve_renderer(renderer)
        self._attached: RunSource | None = None  # LoRADashboard(trainer=...): the source Train runs
        if trainer is not None:
            self._attached = attach.attached_source(trainer, model=model, tokenizer=tokenizer, lora=lora,
                                                    train_data=train_data, eval_data=eval_data, train=train)  # fmt: skip
        if train is None:
            from lora_widgets.training.config import TrainConfig

            train = TrainConfig()
        loading.check_arguments(kwargs, lora, train, _TRAIN_FIELDS)
        lora = lora if lora is not None else LoRAConfig(r=8, alpha=16, target_modules="all-linear")

        self._lora0 = lora
        self._train0: Any = train
        self._observed_lr = False  # the current run's schedule is not previewed: draw its logged rates
        # the model, the prepared data and its view (an attached trainer owns its model, data and settings)
        loaded = (
            attach.loaded_of(self._attached)
            if self._attached is not None
            else loading.load(model, tokenizer, train_data, eval_data, train)
        )
        self.model, self.tokenizer, self._data = loaded.model, loaded.tokenizer, loaded.data
        self._bases = BaseModels(self.model, loaded.source, loaded.device_type, given=loaded.given)
        self._train0 = train = with_model_base(train, self.model)  # the base control shows what is loaded
        self._adapters_given, self._device_type = loaded.adapters_given, loaded.device_type
        self._n_train_blocks: int | None = loaded.n_train_blocks
        self._data_view: DataView | None = loaded.data_view

        self._session = RunSession(self._on_event, self._end_run)
        self._flusher = FlushScheduler(lambda: self._flush(), self.flush_interval)
        self._callouts = Callouts()
        self._static = StaticSummary(
            lambda: self.runs, lambda: self.panel.summary, lambda: self.panel.data_view.get("facts", {})
        )
        self._trainer_factory: Any = None  # test hook: a stand-in LoRATrainer class

        read_only = attach.panel_traits(self._attached)  # no inputs: the trainer's settings, as a table
        front = build_front_end(renderer, {**self._initial_controls(lora, train), **read_only},
                                self._device_type == "cuda", self.max_points, self.max_markers)  # fmt: skip
        self.panel, self.charts, self.adapter_charts = front.panel, front.charts, front.adapter_charts
        self.panel.observe(self._on_controls, names=list(DashboardPanel.CONFIG_TRAITS))
        self.panel.observe(self._preview_params, names=list(controls.LORA_CONTROL_NAMES))
        self.panel.observe(self._on_log_scale, names=["log_scale"])
        self.panel.observe(self._show_example, names=["data_index"])
        self._show_example()
        self.panel.on_msg(self._on_panel_msg)
        self.panel.observe(self._publish_run_state, names=["state"])
        super().__init__(children=front.children, layout=Layout(width="100%"))
        self.add_class("lw-dashboard")
        self._on_controls()
        self.panel.summary = readouts.idle_summary(
            self._device_type, *count_parameters(self.model), self._n_train_blocks
        )
        self._preview_params()
        if self._attached is not None:
            self.panel.summary = {**self.panel.summary, "train_rows": attach.train_rows_of(self._attached)}
            attach.show_source(self._attached, self.panel, self._callouts, self.charts)
            self._callouts.set("status", callouts.ready_callout(self.panel.attached_settings))
            self._publish_callouts()
            return
        self._callouts.set("status", callouts.READY)
        self._callouts.put("device", callouts.cpu_callout(self.model) if self._device_type == "cpu" else None)
        self._callouts.put("adapters", callouts.ADAPTERS_GIVEN if self._adapters_given else None)
        self._publish_callouts()

    # ------------------------------------------------------------------ controls -> configs
    @staticmethod
    def _initial_controls(lora: LoRAConfig, train: Any) -> dict[str, Any]:
        return controls.values_from_configs(lora, train)

    def _control_values(self) -> dict[str, Any]:
        return self.panel.control_values()

    def current_configs(self) -> tuple[LoRAConfig, Any]:
        """The ``(LoRAConfig, TrainConfig)`` the next run would use, from the controls' values."""
        return controls.to_configs(self._control_values(), self._lora0, self._train0)

    # ------------------------------------------------------------------ public API
    @property
    def runs(self) -> list[RunRecord]:
        """Every run shown by this dashboard, oldest first: label, settings, source, history and result."""
        return self._session.runs

    @property
    def trainer(self) -> RunSource | None:
        """The current (or last) run's source (its :class:`~lora_widgets.LoRATrainer` for a run started with
        Train); before the first run, the attached source (``HFRun``) of ``LoRADashboard(trainer=...)``, else
        ``None``."""
        run = self._session.current
        return self._attached if run is None else run.source

    @property
    def history(self) -> History | None:
        """The current (or last) run's metrics, recorded from its events; ``None`` before the first run."""
        run = self._session.current
        return None if run is None else run.history

    @property
    def state(self) -> str:
        """The status line's word: idle, running, paused, stopped, finished or failed."""
        return str(self.panel.state)

    @property
    def running(self) -> bool:
        """True while a run's task has not finished (running or paused)."""
        return self._session.running

    def start(self) -> asyncio.Task[RunEnded | None]:
        """Start a run with the controls' settings as a task on the running asyncio loop; return the task.

        Raises ``RuntimeError`` when a run is already in progress (a double click never starts two runs)
        or when no asyncio loop is running (use it from a notebook, or ``await dash.run()`` in a
        script), and ``ValueError`` naming every invalid setting. Whatever stops a run from starting is
        also shown in the panel's callout, as when Train is clicked. Attached: ``watch`` of the trainer's source.
        """
        self._session.check_idle()
        if self._attached is not None:
            try:
                return self.watch(self._attached)
            except RuntimeError as exc:
                self._show_start_failure(exc)
                raise
        try:
            loop = running_loop()
            if self.panel.errors:
                problems = "; ".join(f"{k}: {v}" for k, v in self.panel.errors.items())
                raise ValueError(f"invalid settings, fix them before training: {problems}")
            lora, train = self.current_configs()
        except (RuntimeError, ValueError, TypeError) as exc:
            self._show_start_failure(exc)
            raise
        self._archive_previous_run()
        self.panel.attached_settings = {}  # a watched source's settings no longer describe the next run
        self._callouts.clear("advice", "lr")
        try:
            record = self._build_run(lora, train)
        except Exception as exc:  # shown in the panel, then raised to the caller
            self._show_start_failure(exc)
            self.panel.state = "failed"
            raise
        return self._begin(record, loop, readouts.planned_total_steps(train, self._n_train_blocks))

    def watch(self, source: RunSource | str | Path, label: str = "") -> asyncio.Task[RunEnded | None]:
        """Show a run that ``source`` produces (any :class:`~lora_widgets.events.types.RunSource`: a ``LoRATrainer``
        built in code, a :class:`~lora_widgets.events.replay.Replay`, a bridge to another trainer; a run directory
        another process writes, followed live by a :class:`~lora_widgets.events.watch.RunDirWatch`) as this
        dashboard shows its own runs; the buttons steer it. Returns the task that awaits ``source.run()``.

        ``label`` names it in the legend (default: from its :class:`~lora_widgets.events.types.RunStarted`).
        A source that describes its settings (``HFRun``) has them shown read-only, with its logging advice.
        """
        if isinstance(source, str | Path):
            source = RunDirWatch(source)
        if not isinstance(source, RunSource):
            raise TypeError(f"source must be a RunSource or a run directory, got {type(source).__name__}")
        self._session.check_idle()
        loop = running_loop()
        self._archive_previous_run()
        if attach.show_source(source, self.panel, self._callouts, self.charts):  # settings, advice, schedule
            self._publish_callouts()
        record = RunRecord(len(self.runs) + 1, label, None, None, source)
        return self._begin(record, loop, attach.total_steps_of(source))

    def replay(self, events: str | Path | list[Event], interval: float = 0.0) -> asyncio.Task[Any]:
        """Show a finished run again from its ``<run_dir>/metrics.jsonl`` (or its events): the charts, progress
        and summary end as they were at the end of the live run. ``interval`` seconds pass between two
        steps (0: as fast as the notebook allows). ``await`` the returned task, or ``dash.wait()``. Same as ``dash.watch(lora_widgets.events.replay.Replay(events, interval=interval))``.
        """
        return self.watch(Replay(events, interval=interval))

    async def wait(self) -> RunEnded | None:
        """Wait for the current run to end; return its terminal event (None if nothing was started).

        Also (re)writes the static summary from the awaiting cell, so headless executors (nbval,
        ``nbconvert --execute``) record it.
        """
        result = await self._session.wait()
        self._static.update()
        return result

    async def run(self) -> RunEnded | None:
        """``start()`` then ``wait()``: convenient in scripts (``asyncio.run(dash.run())``)."""
        self.start()
        return await self.wait()

    def stop(self) -> None:
        """Ask the run to stop after the current optimizer step (the adapter is saved)."""
        self._session.stop()

    def pause(self) -> None:
        """Hold the run between two optimizer steps."""
        self._session.pause()

    def resume(self) -> None:
        """Continue a paused run."""
        self._session.resume()

    def save_adapter(self, path: str | Path) -> Path:
        """Write the last run's adapter in PEFT's format (adapter_config.json + adapter_model.safetensors)."""
        run = self._session.current
        save = getattr(run.source, "save_adapter", None) if run is not None else None
        if callable(save):
            out = save(path)
            return Path(out) if out is not None else Path(path)
        if run is None:
            raise ValueError("nothing to save yet: start a run first (dash.start() or the Train button)")
        where = run.result.adapter_path if run.result else None  # a replayed run saved its adapter there
        raise ValueError(f"{run.label} was not trained here; its adapter was saved to {where or 'no path'}")

    # ------------------------------------------------------------------ run plumbing
    def _begin(
        self, record: RunRecord, loop: asyncio.AbstractEventLoop, total: int | None
    ) -> asyncio.Task[RunEnded | None]:
        """Clear the current run's marks, show the new run as starting, and hand it to the session."""
        self._flusher.reset(self.flush_interval)
        self._observed_lr = False  # until its RunStarted says whether its schedule can be previewed
        self.charts.clear_current()
        self.adapter_charts.update(None)
        self._callouts.clear_prefix(callouts.ALERT_PREFIX, callouts.NOTICE_PREFIX)
        self.charts.label_current(record.label)
        self.panel.run_label = record.label
        if record.train is not None:
            self._preview_schedule(None, record.train)
        task = self._session.begin(record, loop)
        kept = ("device", "device_name", "train_blocks", "train_rows")
        summary = {k: v for k, v in self.panel.summary.items() if k in kept}
        with self.panel.hold_sync():
            self.panel.summary = summary
            self.panel.state = "running"
            self.panel.progress = {"step": 0, "total": int(total or 0)}
            self.panel.samples, self.panel.samples_note = [], ""
            self._callouts.clear("status")
            self._callouts.set("starting", callouts.STARTING)
            self._publish_callouts()
        return task

    def _build_run(self, lora: LoRAConfig, train: Any) -> RunRecord:
        """The next run: the memory pre-flight (as a callout), then a LoRATrainer to drive."""
        own = None if self._adapters_given else lora  # a model's own adapters train as they are
        self.model = self._bases.model_for(getattr(train, "base", None))  # the "base" control's precision
        self._callouts.put("preflight", callouts.preflight_callout(self.model, own, train, self._device_type,
                                                                  int(self._data[0].shape[1])))  # fmt: skip
        return new_trainer_run(self.model, self.tokenizer, self._data, lora, own, train, len(self.runs) + 1,
                               self._trainer_factory, self.runs)  # fmt: skip

    def _preview_schedule(self, _source: Any, train: Any) -> None:
        """Draw the schedule the settings ``train`` give (from the config, with :mod:`lora_widgets.training.schedules`)."""
        self.charts.set_schedule(
            readouts.schedule_preview(
                dataclasses.asdict(train), readouts.planned_total_steps(train, self._n_train_blocks)
            )
        )

    def _preview_params(self, _change: Any = None) -> None:
        """Show the trainable/total parameters the current LoRA settings will train (before Train)."""
        if self.running:
            return
        try:
            lora, _ = self.current_configs()
        except (ValueError, TypeError):  # invalid settings: the panel's errors say why
            return
        trainable, total = readouts.planned_params(self.model, None if self._adapters_given else lora)
        self.panel.summary = {**self.panel.summary, **readouts.params_summary(trainable, total)}

    def _archive_previous_run(self) -> None:
        """Overlay the last run's smoothed loss as a labelled line before a new run clears the marks."""
        prev = self._session.to_archive()
        if prev is not None:
            self.charts.overlay_run(prev.label, prev.history)

    # ------------------------------------------------------------------ events -> records (no sends)
    def _on_event(self, run: RunRecord, event: Event) -> None:
        """Session callback, after ``run`` recorded ``event``: ask for a flush; pushing is the flush's job."""
        if isinstance(event, StepMetrics | EvalMetrics | AdapterStats | SampleGenerations):
            self._flusher.request()
        elif isinstance(event, AlertRaised):  # shown at the next flush, with the evidence that raised it
            self._callouts.set(callouts.ALERT_PREFIX + event.key, callouts.alert_callout(event))
            self._flusher.request()
        elif isinstance(
            event, Notice
        ):  # a source's own message (a replay's skipped lines, a watch that waits)
            self._callouts.put(callouts.NOTICE_PREFIX + event.key, callouts.notice_callout(event))
            self._flusher.request()
        elif isinstance(event, RunStarted):
            if not run.label:  # a run started elsewhere: named and previewed from its own settings
                run.label = label_from_started(run.index, event)
                self.charts.label_current(run.label)
                self.panel.run_label = run.label
            preview = readouts.schedule_preview(event.config, event.total_steps)
            # a transformers run whose scheduler is not previewed: the flushes draw the rates it logs
            self._observed_lr = preview is None and "lr_scheduler_type" in event.config
            self.charts.set_schedule(preview)
            self._flusher.request()
        elif isinstance(event, DataPrepared):
            if run.train is None or self._data_view is None:  # not our data: its facts, not our examples
                self.panel.data_view = {"facts": data_facts(event)}
            else:
                self._data_view.with_facts(event)
                self._show_example()
        elif isinstance(event, StateChanged) and event.state in ("running", "paused"):
            if event.state == "paused":
                self._flusher.flush_now()  # show the step it holds at now, not up to a second later
            self.panel.state = event.state  # rare: sent at once so the buttons follow

    def _flush(self) -> None:
        """Push what was recorded since the last flush: the changed marks, then the panel's progress."""
        run = self._session.current
        if run is None:
            return
        self.charts.update(run.history)
        if self._observed_lr and (self._flusher.flushes % _LOGGED_LR_EVERY == 1 or run.result is not None):
            self.charts.set_schedule((run.history.step, run.history.lr))  # no preview: the logged rates
        self.adapter_charts.update(run.adapter_stats, self._flusher.clock())  # new statistics: 10 s at most
        if run.history.last_step is not None and "starting" in self._callouts:
            self._callouts.clear("starting")
            self._callouts.set("status", callouts.TRAINING)
        with self.panel.hold_sync():
            self.panel.progress = readouts.progress_of(run.history)
            self.panel.summary = readouts.summary_of(self.panel.summary, run.history)
            self.panel.samples, self.panel.samples_note = readouts.samples_of(run.samples)
            self._publish_callouts()

    def _end_run(self, run: RunRecord) -> None:
        """Session callback when a run has ended: last flush, the outcome's callout, the static summary."""
        ended = run.result
        assert ended is not None  # the session records a terminal event before calling this
        self._flusher.flush_now()
        self.adapter_charts.update(run.adapter_stats)  # the run's last statistics, whenever last drawn
        summary = {**self.panel.summary, **readouts.adapter_summary(ended.adapter_path)}
        self._callouts.clear("starting")
        self._callouts.set(
            "status", callouts.outcome_callout(run.label, ended, run.final_loss, run.best_val_loss)
        )
        with self.panel.hold_sync():
            self.panel.summary = summary
            self.panel.state = run.history.state
            self._publish_callouts()
        self._static.update()

    # ------------------------------------------------------------------ panel plumbing
    def _on_panel_msg(self, _widget: Any, content: Any, _buffers: Any) -> None:
        """Button clicks from the browser. A click that is not valid in the current state is ignored."""
        kind = content.get("type") if isinstance(content, dict) else None
        if kind == "train":
            if self.running:
                return  # double click: the first one already started the run
            try:
                self.start()
            except Exception as exc:  # start() has shown it in the panel already
                logger.info("Train: the run did not start: %s", exc)
        elif kind in ("stop", "pause", "resume"):
            getattr(self, kind)()

    def _on_controls(self, _change: Any = None) -> None:
        if self._attached is not None:
            return  # no controls: the attached trainer's settings are shown read-only
        errors = validate_settings(self._control_values(), self._device_type, self._n_train_blocks,
                                   lora=self._lora0, train=self._train0)  # fmt: skip
        if not errors and not self.running:
            self._preview_schedule(None, self.current_configs()[1])
        self.panel.errors = errors

    def _show_example(self, _change: Any = None) -> None:
        """The data view: the facts and the example the panel's index selects."""
        if self._data_view is not None:
            self.panel.data_view = self._data_view.payload(self.panel.data_index)

    def _on_log_scale(self, change: Any) -> None:  # the log-scale checkbox
        self.charts.set_log_scale(bool(change["new"]))

    def _show_start_failure(self, exc: BaseException) -> None:
        callout = callouts.failure_callout(type(exc).__name__, str(exc), title="Could not start the run")
        self._callouts.clear("starting")
        self._callouts.set("status", callout)
        self._publish_callouts()

    def _publish_run_state(self, _change: Any = None) -> None:
        """The ``run_state`` trait, whenever the status changes (what a marimo cell reads reactively)."""
        self.panel.run_state = readouts.run_state_of(self._session.current, self.state, self.panel.run_state)

    def _publish_callouts(self) -> None:
        self.panel.callouts = self._callouts.as_list()
