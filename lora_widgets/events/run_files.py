"""The run directory as a contract between processes: the files a run writes and reads, in one module.

A run (our :class:`~lora_widgets.LoRATrainer`, or a transformers ``Trainer`` with our
:class:`~lora_widgets.hf.callback.EventCallback`) and whoever follows it (a replay, a dashboard in another
process or on another machine with shared storage) meet only here::

    metrics.jsonl   every event, one JSON line each (MetricsWriter); read back line by line (EventLines)
    control.json    {"request": "stop" | "pause" | "resume", ...}, written atomically by a viewer
                    (send_request) and read by the run once per step (ControlReader)

A line of ``metrics.jsonl`` is written with one ``write`` of the whole line and flushed (the file is
unbuffered); if the write fails part-way (a full disk), the file is cut back to its last whole line, so a
reader never sees a partial line except the one being written at that moment, which it waits for.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Literal, get_args

from lora_widgets.atomic import atomic_write_json
from lora_widgets.events.types import (
    _BY_KIND,
    SCHEMA_VERSION,
    Event,
    Notice,
    RunEnded,
    RunStarted,
    StepMetrics,
    event_from_dict,
)
from lora_widgets.paths import as_path

__all__ = [
    "CONTROL_FILE",
    "METRICS_FILE",
    "ControlReader",
    "EventLines",
    "MetricsWriter",
    "Request",
    "last_event",
    "send_request",
]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CONTROL_FILE = "control.json"
Request = Literal["stop", "pause", "resume"]
REQUESTS: tuple[str, ...] = get_args(Request)


class MetricsWriter:
    """Appends events to a ``metrics.jsonl``: one whole line per event, flushed as it happens.

    A failed write (a full disk) is logged, the file is cut back to its last whole line and the run goes on;
    :attr:`failures` counts them.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.failures = 0
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - kept open for the run

    def write(self, event: Event) -> bool:
        """Append ``event``; ``False`` (logged) when the line could not be written whole."""
        if self._file.closed:
            return False
        line = (json.dumps(event.to_dict()) + "\n").encode("utf-8")
        end = os.fstat(self._file.fileno()).st_size
        try:
            done = 0
            while done < len(line):
                n = self._file.write(line[done:])
                if not n:
                    raise OSError(28, "No space left on device (short write)", str(self.path))
                done += n
        except OSError as exc:
            self.failures += 1
            logger.error("could not append to %s: %s", self.path, exc)
            try:
                os.truncate(self._file.fileno(), end)  # no partial line is left for a reader to misread
            except OSError as cut:
                logger.error("could not remove the partial line from %s: %s", self.path, cut)
            return False
        return True

    def close(self) -> None:
        """Close the file (later writes do nothing)."""
        self._file.close()


def send_request(run_dir: str | os.PathLike[str], request: str) -> str:
    """Ask the run writing ``run_dir`` to stop, pause or resume (from any process); returns what was done.

    Nothing is written when the run has already ended (its ``metrics.jsonl`` ends with a terminal event):
    the answer says so. Raises ``ValueError`` for an unknown request and ``FileNotFoundError`` for a missing
    directory.
    """
    if request not in REQUESTS:
        raise ValueError(f"request must be one of {REQUESTS}, got {request!r}")
    folder = as_path(run_dir, "send_request", "run_dir")
    if not folder.is_dir():
        raise FileNotFoundError(f"no run directory at {str(folder)!r}; pass the folder holding metrics.jsonl")
    ended = last_event(folder / METRICS_FILE)
    if isinstance(ended, RunEnded):
        return f"the run in {folder} already ended ({ended.kind} at step {ended.step}); nothing to {request}"
    atomic_write_json(folder / CONTROL_FILE, {"request": request, "time": time.time(), "pid": os.getpid()})
    return f"{request} requested: {folder / CONTROL_FILE} (the run reads it after its current step)"


def last_event(metrics: Path) -> Event | None:
    """The last event a ``metrics.jsonl`` holds whole (``None``: no file, or no readable last line)."""
    try:
        with open(metrics, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    lines = [
        line for line in tail.split("\n")[:-1] if line.strip()
    ]  # the text after the last newline is unfinished
    try:
        return event_from_dict(json.loads(lines[-1])) if lines else None
    except (ValueError, TypeError):
        return None


class ControlReader:
    """Reads the requests written to a run directory's ``control.json``, each one once.

    Created when a run begins, it removes a request left there by an earlier run (which must not act on this
    one). :meth:`poll` costs one ``stat`` when nothing changed, so a run calls it every step.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir) / CONTROL_FILE
        self._seen: tuple[int, int, int] | None = None
        self.discard()

    def discard(self) -> None:
        """Remove a pending request (a run that ends leaves none behind for the next one)."""
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("could not remove %s: %s", self.path, exc)

    def poll(self) -> str | None:
        """The request written since the last call (``"stop"``, ``"pause"``, ``"resume"``), else ``None``."""
        try:
            st = self.path.stat()
        except OSError:
            return None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key == self._seen:
            return None
        self._seen = key
        try:
            request = json.loads(self.path.read_text(encoding="utf-8")).get("request")
        except (OSError, ValueError, AttributeError) as exc:
            logger.warning("ignoring %s: not a control request (%s)", self.path, exc)
            return None
        if request not in REQUESTS:
            logger.warning("ignoring %s: request %r is not one of %s", self.path, request, REQUESTS)
            return None
        return str(request)


class EventLines:
    """Reads a ``metrics.jsonl`` line by line into events, checking each, and says what it could not use.

    :meth:`feed` takes the lines in order (whole lines, without the newline) and returns each one's event, or
    ``None`` for a line it skips: a line that is not JSON, not an event, or has a field of the wrong type
    (``loss: "abc"``), and a step that goes back (so nothing is drawn at the wrong step) are named by number
    in :attr:`problems` (``strict``: raised as ``ValueError`` instead); an event kind this version does not
    know (a newer writer) is skipped and counted in :attr:`unknown`. :meth:`notices` turns all that into
    :class:`~lora_widgets.events.types.Notice` events for a view.
    """

    def __init__(self, name: str, *, strict: bool = False) -> None:
        self.name = name
        self.strict = strict
        self.number = 0
        self.problems: list[str] = []
        self.unknown: Counter[str] = Counter()
        self.newer: int | None = None  # a RunStarted's schema_version above ours
        self._last_step: int | None = None

    def feed(self, line: str) -> Event | None:
        """The event of the next line (``None``: blank or skipped; see the class docstring)."""
        self.number += 1
        if not line.strip():
            return None
        try:
            data = json.loads(line)
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object, got {type(data).__name__}")
            kind = data.get("event")
            if isinstance(kind, str) and kind not in _BY_KIND:
                self.unknown[kind] += 1
                return None
            event = event_from_dict(data)
        except (ValueError, TypeError) as exc:
            self._skip(f"not a run event ({exc})")
            return None
        return self._in_order(event)

    def _in_order(self, event: Event) -> Event | None:
        if isinstance(event, RunStarted):
            self._last_step = None  # a second run appended to the same file starts its own count
            if event.schema_version > SCHEMA_VERSION:
                self.newer = event.schema_version
        elif isinstance(event, StepMetrics):
            if self._last_step is not None and event.step <= self._last_step:
                self._skip(f"step {event.step} comes after step {self._last_step}")
                return None
            self._last_step = event.step
        return event

    def _skip(self, why: str) -> None:
        problem = f"line {self.number}: {why}"
        if self.strict:
            raise ValueError(f"{self.name}, {problem}")
        logger.warning("%s, %s; the line is skipped", self.name, problem)
        self.problems.append(problem)

    def notices(self) -> list[Notice]:
        """What a view should say about the file: lines skipped, kinds not understood, a newer writer."""
        out: list[Notice] = []
        if self.problems:
            shown = "; ".join(self.problems[:5]) + ("; ..." if len(self.problems) > 5 else "")
            out.append(Notice("skipped-lines", f"{len(self.problems)} line(s) of {self.name} skipped",
                              f"{shown}. The other lines are shown; no point is drawn from a skipped line.",
                              "warning"))  # fmt: skip
        if self.unknown or self.newer is not None:
            kinds = ", ".join(f"{k!r} x{n}" for k, n in sorted(self.unknown.items()))
            newer = (
                f"written with event schema {self.newer} (this version reads {SCHEMA_VERSION}); "
                if self.newer
                else ""
            )
            what = (
                f"skipped event kinds it does not know: {kinds}"
                if kinds
                else "fields it does not know are ignored"
            )
            out.append(Notice("newer-version", "Recorded by a newer lora_widgets",
                              f"{self.name} was {newer}shown is what this version understands; {what}. "
                              "Upgrade lora_widgets to see everything.", "warning"))  # fmt: skip
        return out
