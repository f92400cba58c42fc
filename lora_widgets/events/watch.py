"""Watch a run that another process writes: :class:`RunDirWatch` follows its ``metrics.jsonl`` as it grows.

The run directory is the contract (:mod:`lora_widgets.events.run_files`): a run started with ``torchrun``,
``accelerate launch``, a batch job or another notebook, on this machine or on another one with shared storage,
is watched by reading the events it appends, and steered by writing ``control.json`` there, which our
trainer and our HF callback read after every step. Nothing else passes between the processes.

Polling, not threads: :meth:`RunDirWatch.run` reads what was appended since the last look, then
``await asyncio.sleep(poll_interval)``, so the event loop (a notebook's) stays free. A last line without its
newline is being written: it is kept and read once whole, never parsed half-written.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from lora_widgets.events.run_files import METRICS_FILE, EventLines, send_request
from lora_widgets.events.source import RunBase
from lora_widgets.events.types import Notice, RunEnded, RunFailed, RunStopped, StepMetrics
from lora_widgets.paths import as_path

__all__ = ["RunDirWatch"]

logger = logging.getLogger(__name__)

_WAITING = "waiting"  # the key of the notice shown while nothing can be read yet
_RUN_DIR_HINT = f"pass the run directory our trainer or HF callback writes (<output_dir>/<run_id>, with its {METRICS_FILE})"


class RunDirWatch(RunBase):
    """A :class:`~lora_widgets.events.types.RunSource` that follows a run directory another process writes.

    Args:
        run_dir: the run's folder (holding, or about to hold, ``metrics.jsonl``), or that file itself.
        poll_interval: seconds between two looks at the file.
        stop_timeout: after :meth:`stop`, how long to wait for the run to answer (its terminal event) before
            the watch ends on its own, saying that the process did not answer (it may have died).

    :meth:`run` publishes every event the run has written and writes, and returns its terminal event. While
    the directory or its ``metrics.jsonl`` does not exist yet it waits, publishing a
    :class:`~lora_widgets.events.types.Notice` that says so (cleared once events arrive). :meth:`stop`,
    :meth:`pause` and :meth:`resume` write the request to the run's ``control.json``; asking a run that has
    already ended is answered in :attr:`last_answer` and changes nothing. A ``metrics.jsonl`` that exists but
    cannot be read (a folder of that name, no permission) ends the watch with a
    :class:`~lora_widgets.events.types.RunFailed` (``reason="bad_input"``) that names the file and why.

    Raises:
        TypeError: ``run_dir`` is not a path.
        ValueError: ``run_dir`` is a file other than ``metrics.jsonl``, or its ``metrics.jsonl`` is a folder; a
            setting that is not a number of seconds > 0.
    """

    owner = "RunDirWatch"

    def __init__(
        self, run_dir: str | os.PathLike[str], *, poll_interval: float = 0.5, stop_timeout: float = 30.0
    ) -> None:
        super().__init__()
        as_path(run_dir, "RunDirWatch", "run_dir")
        for name, value in (("poll_interval", poll_interval), ("stop_timeout", stop_timeout)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
        path = Path(run_dir)
        self.run_dir = path.parent if path.name == METRICS_FILE else path
        if self.run_dir.is_file():
            raise ValueError(
                f"run_dir={str(run_dir)!r} is a file, not a run directory: pass the folder that holds "
                f"{METRICS_FILE} (or that file itself)"
            )
        if self.metrics_path.is_dir():
            raise ValueError(
                f"{str(self.metrics_path)!r} is a folder, not a run's event file; {_RUN_DIR_HINT}"
            )
        self.poll_interval = float(poll_interval)
        self.stop_timeout = float(stop_timeout)
        self.last_answer = ""
        """What the last stop/pause/resume did (written, or why not)."""

    @property
    def metrics_path(self) -> Path:
        """The ``metrics.jsonl`` followed."""
        return self.run_dir / METRICS_FILE

    def stop(self) -> None:
        """Ask the watched run to stop (through its ``control.json``); when it has already ended, say so."""
        if self._running:
            super().stop()
        else:
            self._forward_request("stop")

    def _forward_request(self, request: str) -> None:
        try:
            self.last_answer = send_request(self.run_dir, request)
        except FileNotFoundError as exc:
            self.last_answer = f"nothing to {request}: {exc}"
        logger.info("%s", self.last_answer)

    async def run(self) -> RunEnded:
        """Follow the run until its terminal event (or a stop it does not answer); return that event."""
        self._begin_run("this watch is already following its run; await it or stop() it first")
        try:
            return await self._follow()
        finally:
            self._end_run()

    async def _follow(self) -> RunEnded:
        lines = EventLines(str(self.metrics_path))
        offset, pending, said = 0, b"", ""
        stop_deadline: float | None = None
        while True:
            try:
                chunk = self._read_from(offset)
            except OSError as exc:  # not a missing file (that is waited for): a folder, no permission, ...
                return self._cannot_read(exc)
            if chunk is None:  # no metrics.jsonl yet
                said = self._say_waiting(said)
                if self._requests.stop_requested:
                    return self._ended_here(f"stopped waiting: nothing was written to {self.metrics_path}")
            else:
                if said:
                    said = self._say_waiting("", clear=True)
                offset += len(chunk)
                *whole, pending = (pending + chunk).split(b"\n")
                for raw in whole:
                    end = self._take(lines, raw)
                    if end is not None:
                        return end
                if whole:
                    stop_deadline = None  # the run is alive: wait a full stop_timeout from now on
            if self._requests.stop_requested:
                stop_deadline = stop_deadline or time.monotonic() + self.stop_timeout
                if time.monotonic() > stop_deadline:
                    return self._ended_here(
                        f"the run did not answer the stop request within {self.stop_timeout:g} s (its process "
                        "may have ended without a final event); stopped watching"
                    )
            await asyncio.sleep(self.poll_interval)

    def _read_from(self, offset: int) -> bytes | None:
        try:
            with open(self.metrics_path, "rb") as f:
                f.seek(offset)
                return f.read()
        except FileNotFoundError:
            return None

    def _take(self, lines: EventLines, raw: bytes) -> RunEnded | None:
        """Publish the event of one whole line (and a notice if it was skipped); the terminal event, if it is."""
        known = (len(lines.problems), sum(lines.unknown.values()), lines.newer)
        event = lines.feed(raw.decode("utf-8", errors="replace"))
        if (len(lines.problems), sum(lines.unknown.values()), lines.newer) != known:
            for notice in lines.notices():
                self._publish(notice)
        if event is None:
            return None
        self._publish(event)
        return event if isinstance(event, RunEnded) else None

    def _say_waiting(self, said: str, clear: bool = False) -> str:
        """Publish (once per reason) what the watch waits for, or clear it; returns what is said now."""
        if clear:
            self._publish(Notice(_WAITING, "", ""))
            return ""
        where = self.run_dir if not self.run_dir.is_dir() else self.metrics_path
        what = "run directory" if not self.run_dir.is_dir() else "metrics.jsonl"
        message = f"No {what} at {where} yet; waiting for the run to write it (Stop ends the wait)."
        if message != said:
            self._publish(Notice(_WAITING, "Waiting for the run", message))
        return message

    def _cannot_read(self, exc: OSError) -> RunFailed:
        """End the watch on a ``metrics.jsonl`` that exists but cannot be read: say which file and why."""
        last: StepMetrics | None = self.history.last_step
        end = RunFailed(step=last.step if last else 0, elapsed_s=last.elapsed_s if last else 0.0,
                        final_loss=last.loss if last else None, best_val_loss=self.history.best_val_loss(),
                        adapter_path=None, reason="bad_input", error_type=type(exc).__name__,
                        message=f"cannot read {self.metrics_path}: {exc.strerror or exc}; stopped watching",
                        suggestions=(_RUN_DIR_HINT, "check that this process may read that folder"))  # fmt: skip
        self._publish(end)
        return end

    def _ended_here(self, message: str) -> RunStopped:
        """End the watch itself (the run gave no terminal event): a RunStopped at the last step seen."""
        last: StepMetrics | None = self.history.last_step
        step = last.step if last else 0
        end = RunStopped(step=step, elapsed_s=last.elapsed_s if last else 0.0, final_loss=last.loss if last else None,
                         best_val_loss=self.history.best_val_loss(), adapter_path=None, message=message)  # fmt: skip
        self._publish(end)
        return end
