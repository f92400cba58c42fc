"""When the dashboard pushes to the browser: a flush throttle and the scheduler that binds it to a loop.

Why: a trainer can publish hundreds of steps per second, and JupyterLab's server drops iopub messages
above 1,000/s (jupyter_server's ``iopub_msg_rate_limit``, averaged over a 3 s window; comm messages count). The dashboard's event
handler therefore only *records* (into a :class:`~lora_widgets.events.history.History`); a :class:`Throttle`
decides when the recorded data is pushed to the browser (at most once per ``interval`` seconds, whatever
the step rate), and the charts bound what one push sends (a line's points match the chart's pixels).

:class:`Throttle` is pure (the caller owns the clock), so its policy is unit-tested on plain numbers;
:class:`FlushScheduler` runs it on the kernel's asyncio loop, or on a fake clock in tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

__all__ = ["FlushScheduler", "Throttle"]


class Throttle:
    """Leading-edge flush throttle: at most one flush per ``interval`` seconds.

    Protocol (the caller owns the clock and the timer, which keeps this class pure):

    1. on new data, call :meth:`request` with the current time. It returns ``None`` when a flush is
       already scheduled (nothing to do), otherwise the delay in seconds after which the caller should
       flush (0 when the last flush is at least ``interval`` old, so an isolated update shows at once);
    2. when the flush runs, call :meth:`flushed` with the time it ran.

    Consecutive flushes are therefore at least ``interval`` apart, and data recorded after a request
    is never lost: it is included in the pending flush. A final flush at the end of a run may bypass
    the throttle (call :meth:`flushed` afterwards and :meth:`cancel` the pending one).
    """

    def __init__(self, interval: float = 0.25) -> None:
        if not (interval > 0 and math.isfinite(interval)):
            raise ValueError(f"interval must be a positive number of seconds, got {interval!r}")
        self.interval = float(interval)
        self.last_flush: float | None = None
        self.pending = False
        self.flushes = 0

    def request(self, now: float) -> float | None:
        """Ask for a flush at time ``now``; return the delay to wait, or ``None`` if one is pending."""
        if self.pending:
            return None
        self.pending = True
        if self.last_flush is None:
            return 0.0
        return max(0.0, self.last_flush + self.interval - now)

    def flushed(self, now: float) -> None:
        """Record that a flush ran at time ``now``."""
        self.pending = False
        self.last_flush = now
        self.flushes += 1

    def cancel(self) -> None:
        """Forget a pending request (its timer was cancelled)."""
        self.pending = False


class FlushScheduler:
    """Calls ``flush()`` when a :class:`Throttle` says so, through the running asyncio loop's timer.

    :meth:`request` after recording new data; :meth:`flush_now` at the end of a run (it cancels the
    pending timer). Without a running loop (a synchronous caller) a request flushes at once. ``clock``
    and ``call_later`` replace the loop's for tests and benchmarks (a fake clock decides exactly as a
    live kernel would).
    """

    def __init__(
        self,
        flush: Callable[[], None],
        interval: float,
        clock: Callable[[], float] = time.monotonic,
        call_later: Callable[[float, Callable[[], None]], Any] | None = None,
    ) -> None:
        self._flush = flush
        self.throttle = Throttle(interval)
        self.clock = clock
        self.call_later = call_later
        self._handle: Any = None

    @property
    def flushes(self) -> int:
        """Flushes made so far (throttled and final ones)."""
        return self.throttle.flushes

    def reset(self, interval: float) -> None:
        """Start afresh for a new run (the next request flushes at once)."""
        self.cancel()
        self.throttle = Throttle(interval)

    def request(self) -> None:
        """New data was recorded: flush now or later, at most once per interval."""
        delay = self.throttle.request(self.clock())
        if delay is None:
            return
        if self.call_later is not None:
            self._handle = self.call_later(delay, self._run)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a synchronous caller): flush now
            self._run()
            return
        self._handle = loop.call_later(delay, self._run)

    def flush_now(self) -> None:
        """Flush at once, cancelling a pending timed flush (the end of a run)."""
        self.cancel()
        self._run()

    def cancel(self) -> None:
        """Drop the pending timed flush, if any."""
        handle, self._handle = self._handle, None
        if handle is not None and hasattr(handle, "cancel"):
            handle.cancel()
        self.throttle.cancel()

    def _run(self) -> None:
        self._handle = None
        self.throttle.flushed(self.clock())
        self._flush()
