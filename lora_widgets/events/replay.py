"""Replaying a finished run: its ``metrics.jsonl`` read back into events, and a :class:`Replay` that plays
them to a view as a :class:`~lora_widgets.events.types.RunSource` (``LoRADashboard.replay(path)``).

Kept apart from :mod:`lora_widgets.events.types` (the event types and the RunSource contract), which every producer
imports: a replay is one more producer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from lora_widgets.events.types import (
    EvalMetrics,
    Event,
    RunEnded,
    RunStopped,
    StateChanged,
    StepMetrics,
    Subscribers,
    _EventBase,
    event_from_dict,
)

__all__ = ["Replay", "read_events"]

logger = logging.getLogger(__name__)


def read_events(path: str | os.PathLike[str]) -> list[Event]:
    """Every event of a run's ``metrics.jsonl`` (the trainer appends one JSON line per event), in order.

    A last line cut short (the process was killed while writing it) is skipped with a logged warning; any
    other line that is not an event raises ``ValueError`` naming the file and line. Replay the result with
    :class:`Replay` or ``LoRADashboard.replay``.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no metrics file at {str(file)!r}; pass a run's <run_dir>/metrics.jsonl")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{file} is not UTF-8 text ({exc.reason}); is it a metrics.jsonl file?") from None
    lines = text.split("\n")
    events: list[Event] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object, got {type(data).__name__}")
            events.append(event_from_dict(data))
        except (ValueError, TypeError) as exc:
            if number == len(lines):  # no newline after it: a write cut short by a crash
                logger.warning("%s: skipping the unfinished last line %d (%s)", file, number, exc)
                continue
            raise ValueError(f"{file}, line {number}: not a run event ({exc})") from None
    return events


class Replay:
    """A :class:`RunSource` that publishes the events of a recorded run again, in order.

    ``events`` is a run's ``metrics.jsonl`` path (read with :func:`read_events`) or the events themselves.
    :meth:`run` publishes them up to and including the first terminal event and returns it; a recording that
    ends without one (an interrupted run) ends with a :class:`RunStopped` saying so. ``interval`` seconds
    pass between two steps (0: as fast as the event loop allows, yielding to it regularly so a notebook stays
    responsive). :meth:`stop` ends the replay early (with a :class:`RunStopped`); :meth:`pause` and
    :meth:`resume` hold and release it between events, publishing :class:`StateChanged` as a trainer does.
    """

    def __init__(self, events: str | os.PathLike[str] | Iterable[Event], *, interval: float = 0.0) -> None:
        if isinstance(events, str | os.PathLike):
            events = read_events(events)
        self.events: list[Event] = list(events)
        bad = [e for e in self.events if not isinstance(e, _EventBase)]
        if bad:
            raise TypeError(
                f"events must be run events (lora_widgets.events.types), got {type(bad[0]).__name__}"
            )
        if isinstance(interval, bool) or not isinstance(interval, int | float) or not interval >= 0:
            raise ValueError(f"interval must be a number of seconds >= 0, got {interval!r}")
        self.interval = float(interval)
        self._subscribers = Subscribers("replay")
        self._running = False
        self._stop = threading.Event()
        self._resume: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for every replayed event; returns an unsubscribe function."""
        return self._subscribers.add(callback)

    @property
    def running(self) -> bool:
        """True while :meth:`run` is in progress (also while paused)."""
        return self._running

    def stop(self) -> None:
        """End the replay before its next event. Safe from any thread; no-op when idle."""
        self._stop.set()
        self._on_loop(lambda: self._resume.set() if self._resume else None)

    def pause(self) -> None:
        """Hold the replay before its next event."""
        self._on_loop(lambda: self._resume.clear() if self._resume else None)

    def resume(self) -> None:
        """Release a paused replay."""
        self._on_loop(lambda: self._resume.set() if self._resume else None)

    async def run(self) -> RunEnded:
        """Publish the events; return the terminal one (see the class docstring)."""
        if self._running:
            raise RuntimeError("this replay is already running; await it or stop() it first")
        self._running, self._loop = True, asyncio.get_running_loop()
        self._resume = asyncio.Event()
        self._resume.set()
        self._stop.clear()
        try:
            return await self._replay()
        finally:
            self._running, self._resume, self._loop = False, None, None

    async def _replay(self) -> RunEnded:
        last: StepMetrics | None = None
        best: float | None = None
        for i, event in enumerate(self.events):
            if not self._resume_is_set():
                self._publish(StateChanged(state="paused", step=last.step if last else 0))
                await self._resume.wait()  # type: ignore[union-attr]
                self._publish(StateChanged(state="running", step=last.step if last else 0))
            if self._stop.is_set():
                return self._end(last, best, "replay stopped")
            self._publish(event)
            if isinstance(event, RunEnded):
                return event
            if isinstance(event, EvalMetrics):
                best = event.val_loss if best is None else min(best, event.val_loss)
            if isinstance(event, StepMetrics):
                last = event
                if self.interval > 0:
                    await asyncio.sleep(self.interval)
            if i % 64 == 63:
                await asyncio.sleep(0)  # let the notebook (and the dashboard's flushes) run
        return self._end(last, best, "the recording ends without a final event: the run was interrupted")

    def _end(self, last: StepMetrics | None, best: float | None, message: str) -> RunStopped:
        step = last.step if last else 0
        end = RunStopped(step=step, elapsed_s=last.elapsed_s if last else 0.0,
                         final_loss=last.loss if last else None, best_val_loss=best, adapter_path=None,
                         message=f"{message} (step {step})")  # fmt: skip
        self._publish(end)
        return end

    def _resume_is_set(self) -> bool:
        return self._resume is None or self._resume.is_set()

    def _publish(self, event: Event) -> None:
        self._subscribers.deliver(event)

    def _on_loop(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the replay's loop thread (asyncio.Event is not thread-safe)."""
        loop = self._loop
        if loop is None:
            return
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if current is loop:
            fn()
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed in between
                loop.call_soon_threadsafe(fn)
