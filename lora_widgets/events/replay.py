"""Replaying a finished run: its ``metrics.jsonl`` read back into events, and a :class:`Replay` that plays
them to a view as a :class:`~lora_widgets.events.types.RunSource` (``LoRADashboard.replay(path)``).

Kept apart from :mod:`lora_widgets.events.types` (the event types and the RunSource contract), which every producer
imports: a replay is one more producer, a :class:`~lora_widgets.events.source.RunBase` that writes only how it
publishes. Every line is checked (:class:`~lora_widgets.events.run_files.EventLines`): a bad line is named and
skipped (or, ``strict``, refused), never drawn at the wrong step, and what was skipped is said in
:class:`~lora_widgets.events.types.Notice` events before the run's own.
"""

from __future__ import annotations

import asyncio
import os
import reprlib
from collections.abc import Iterable

from lora_widgets.events.run_files import EventLines
from lora_widgets.events.source import RunBase
from lora_widgets.events.types import (
    EvalMetrics,
    Event,
    Notice,
    RunEnded,
    RunStopped,
    StateChanged,
    StepMetrics,
    _EventBase,
)
from lora_widgets.paths import as_path

__all__ = ["Replay", "check_events", "read_events"]


def check_events(path: str | os.PathLike[str], *, strict: bool = False) -> tuple[list[Event], list[Notice]]:
    """The events of a run's ``metrics.jsonl`` and the :class:`Notice` s that say what was skipped.

    Each line is checked, types included (:class:`~lora_widgets.events.run_files.EventLines`): a line that is
    not a run event, or a step that goes back, is named by number and skipped (``strict``: ``ValueError``
    naming the file and line); event kinds of a newer version are skipped and counted. A last line cut short
    (the process was killed while writing it) is skipped in either mode.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is empty, is not UTF-8 text, or (``strict``) a line is bad.
    """
    file = as_path(path, "read_events", "path")
    if not file.is_file():
        raise FileNotFoundError(f"no metrics file at {str(file)!r}; pass a run's <run_dir>/metrics.jsonl")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{file} is not UTF-8 text ({exc.reason}); is it a metrics.jsonl file?") from None
    if not text.strip():
        raise ValueError(f"{file} is empty: the run wrote no event (it never started, or is starting now)")
    lines = text.split("\n")  # not splitlines(): U+2028 inside a JSON string is not a line break
    unfinished = lines.pop() if lines[-1] else ""  # text after the last newline: a write cut short
    reader = EventLines(str(file), strict=strict)
    events = [event for line in lines if (event := reader.feed(line)) is not None]
    if unfinished.strip():
        reader.strict = False
        if (event := reader.feed(unfinished)) is not None:
            events.append(event)  # whole, only its newline missing
    return events, reader.notices()


def read_events(path: str | os.PathLike[str], *, strict: bool = False) -> list[Event]:
    """Every event of a run's ``metrics.jsonl``, in order, checked as :func:`check_events` does (what was
    skipped is logged). Replay the result with :class:`Replay` or ``LoRADashboard.replay``."""
    return check_events(path, strict=strict)[0]


class Replay(RunBase):
    """A :class:`RunSource` that publishes the events of a recorded run again, in order.

    ``events`` is a run's ``metrics.jsonl`` path (read with :func:`check_events`; ``strict`` refuses a bad
    line) or the events themselves. :meth:`run` publishes first the notices of what the file held that could
    not be shown, then the events up to and including the first terminal event, and returns it; a recording
    that ends without one (an interrupted run) ends with a :class:`RunStopped` saying so. ``interval`` seconds
    pass between two steps (0: as fast as the event loop allows, yielding to it regularly so a notebook stays
    responsive). :meth:`stop` ends the replay early (with a :class:`RunStopped`); :meth:`pause` and
    :meth:`resume` hold and release it between events, publishing :class:`StateChanged` as a trainer does.
    """

    owner = "replay"

    def __init__(
        self, events: str | os.PathLike[str] | Iterable[Event], *, interval: float = 0.0, strict: bool = False
    ) -> None:
        super().__init__()
        self.notices: list[Notice] = []
        if isinstance(events, str | os.PathLike):
            events, self.notices = check_events(events, strict=strict)
        elif not isinstance(events, Iterable) or isinstance(events, bytes | dict):
            raise TypeError(
                "events must be a path to a run's metrics.jsonl or a list of run events, got "
                f"{type(events).__name__} {reprlib.repr(events)}"
            )
        self.events: list[Event] = list(events)
        bad = [e for e in self.events if not isinstance(e, _EventBase)]
        if bad:
            raise TypeError(
                f"events must be run events (lora_widgets.events.types), got {type(bad[0]).__name__}"
            )
        if isinstance(interval, bool) or not isinstance(interval, int | float) or not interval >= 0:
            raise ValueError(f"interval must be a number of seconds >= 0, got {interval!r}")
        self.interval = float(interval)

    async def run(self) -> RunEnded:
        """Publish the events; return the terminal one (see the class docstring)."""
        self._begin_run("this replay is already running; await it or stop() it first")
        try:
            return await self._replay()
        finally:
            self._end_run()

    async def _replay(self) -> RunEnded:
        for notice in self.notices:
            self._publish(notice)
        last: StepMetrics | None = None
        best: float | None = None
        for i, event in enumerate(self.events):
            if self._requests.pause_requested:
                self._publish(StateChanged(state="paused", step=last.step if last else 0))
                await self._wait_while_paused()
                self._publish(StateChanged(state="running", step=last.step if last else 0))
            if self._requests.stop_requested:
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
