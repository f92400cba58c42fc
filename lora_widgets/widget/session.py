"""The runs a dashboard drives: one at a time, each a :class:`~lora_widgets.events.types.RunSource` awaited in a task.

One job: the run's lifetime. :meth:`RunSession.begin` subscribes to the source, records every event into
the run's :class:`~lora_widgets.widget.record.RunRecord` and awaits ``source.run()`` as a task on the
kernel's own asyncio loop (cells keep executing while it trains, and every widget update is made from the
loop's thread: updates from other threads never reach Colab, googlecolab/colabtools#3373). Stop, pause and
resume are passed to the source. When the source returns (or raises: a backstop turns that into a
:class:`~lora_widgets.events.types.RunFailed`), ``on_end`` is called once with the finished record.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from lora_widgets.events.types import Event, RunEnded, RunFailed, RunSource, RunStopped
from lora_widgets.training.diagnosis import format_lr
from lora_widgets.widget.labels import run_label
from lora_widgets.widget.record import RunRecord

__all__ = ["RunSession"]


class RunSession:
    """Every run shown so far (:attr:`runs`) and the task of the one in progress."""

    def __init__(
        self, on_event: Callable[[RunRecord, Event], None], on_end: Callable[[RunRecord], None]
    ) -> None:
        self.runs: list[RunRecord] = []
        self._on_event = on_event
        self._on_end = on_end
        self._task: asyncio.Task[RunEnded | None] | None = None
        self._unsubscribe: Callable[[], Any] | None = None
        self._stop_before_start = False

    @property
    def current(self) -> RunRecord | None:
        """The run in progress, or the last one."""
        return self.runs[-1] if self.runs else None

    @property
    def running(self) -> bool:
        """True while a run's task has not finished (running or paused)."""
        return self._task is not None and not self._task.done()

    @property
    def task(self) -> asyncio.Task[RunEnded | None] | None:
        """The current (or last) run's task."""
        return self._task

    def to_archive(self) -> RunRecord | None:
        """The previous run, once, when a new run is about to replace it on the charts."""
        prev = self.current
        if prev is None or prev.overlaid or self.running:
            return None
        prev.overlaid = True
        return prev

    def check_idle(self, source: Any = None) -> None:
        """Raise ``RuntimeError`` while a run is in progress (one run at a time), and whatever ``source`` says
        stops it from starting now (:func:`lora_widgets.widget.attach.check_can_start`: its trainer training
        in another thread or cell, a setting it would fail on), before anything is changed."""
        if self.running:
            raise RuntimeError(
                "a run is already in progress; stop it (dash.stop()) or await dash.wait() first"
            )
        if source is not None:
            from lora_widgets.widget.attach import check_can_start

            check_can_start(source)

    def begin(self, record: RunRecord, loop: asyncio.AbstractEventLoop) -> asyncio.Task[RunEnded | None]:
        """Record ``record.source``'s events into ``record`` and run it as a task on ``loop``."""
        self.check_idle()
        source = record.source
        if source is None:
            raise ValueError("the run has no source to drive")
        self.runs.append(record)
        self._stop_before_start = False

        def on_event(event: Event) -> None:
            record.record(event)
            self._on_event(record, event)

        self._unsubscribe = source.subscribe(on_event)
        self._task = loop.create_task(self._drive(record, source))
        return self._task

    async def _drive(self, record: RunRecord, source: RunSource) -> RunEnded | None:
        try:
            if self._stop_before_start:
                record.record(RunStopped(0, 0.0, None, None, None, "stopped before the first step"))
            else:
                await source.run()
        except Exception as exc:  # a source should publish RunFailed itself; shown as a failed run if not
            if record.result is None:
                last = record.history.last_step
                record.record(
                    RunFailed(step=last.step if last else 0, elapsed_s=0.0, final_loss=None, best_val_loss=None,
                              adapter_path=None, message=str(exc), reason="error", error_type=type(exc).__name__)
                )  # fmt: skip
        finally:
            if self._unsubscribe is not None:
                self._unsubscribe()
                self._unsubscribe = None
        if record.result is None:  # run() returned without a terminal event: treat it as stopped
            last = record.history.last_step
            record.record(RunStopped(step=last.step if last else 0, elapsed_s=0.0,
                                     final_loss=last.loss if last else None, best_val_loss=None,
                                     adapter_path=None, message="the run ended without a final event"))  # fmt: skip
        self._on_end(record)
        return record.result

    async def wait(self) -> RunEnded | None:
        """Wait for the current run to end; its terminal event (``None`` if nothing was started)."""
        if self._task is None:
            return None
        return await asyncio.shield(self._task)

    def stop(self) -> None:
        """Ask the run to stop after the step in progress (also before its first step)."""
        record = self.current
        if self.running and record is not None and record.source is not None:
            if not record.source.running:
                self._stop_before_start = True  # the task has not reached source.run() yet
            record.source.stop()

    def pause(self) -> None:
        """Hold the run between two steps."""
        record = self.current
        if self.running and record is not None and record.source is not None:
            record.source.pause()

    def resume(self) -> None:
        """Continue a paused run."""
        record = self.current
        if self.running and record is not None and record.source is not None:
            record.source.resume()


def running_loop() -> asyncio.AbstractEventLoop:
    """The running asyncio loop a run's task goes on (a Jupyter kernel's); a clear error without one."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            "start() needs a running asyncio loop, as in a Jupyter kernel; in a plain script use "
            "asyncio.run(dash.run()) or the headless LoRATrainer.run_sync()"
        ) from None


def new_trainer_run(
    model: Any,
    tokenizer: Any,
    data: Any,
    lora: Any,
    own: Any,
    train: Any,
    index: int,
    factory: Any,
    previous: Sequence[RunRecord] = (),
) -> RunRecord:
    """Run number ``index`` of our own :class:`~lora_widgets.LoRATrainer` (``factory``: a stand-in class in tests).

    ``own`` is the LoRA config the LoRATrainer applies (``None``: the model's own adapters train as they are).
    The LoRATrainer replaces adapters an earlier run made (they are saved in its run_dir) and puts them back if
    the new settings fail, so a bad setting never costs the user a trained adapter.
    """
    if factory is None:
        from lora_widgets.training.trainer import LoRATrainer

        factory = LoRATrainer
    trainer = factory(model, tokenizer, data, lora=own, config=train)  # data: a RunData (train, val, split)
    if own is None:
        label = f"run {index}: model's adapters lr={format_lr(train.learning_rate)}"
    else:
        base = getattr(train, "base", None)
        ratio = getattr(train, "loraplus_lr_ratio", None)
        label = run_label(index, lora.r, lora.alpha, train.learning_rate, lora.target_modules, base, ratio)
    same = next((r.index for r in reversed(previous) if r.lora == own and r.train == train), None)
    if same is not None:  # its curve would hide the earlier one's: the legend says why they coincide
        label += f" (same settings as run {same})"
    return RunRecord(index, label, own, train, trainer)
