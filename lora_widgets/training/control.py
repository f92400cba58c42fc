"""Run control: stop, pause and resume from any thread, and each blocking phase in a worker thread.

Why a worker thread per phase (``asyncio.to_thread``): the event loop -- in a notebook, the kernel's --
stays free while a step computes, so other cells run and a Stop click arrives. Requests made from other
threads (a widget's comm thread, a script's control thread) are handed to the loop with
``call_soon_threadsafe``, so the run reads them between steps without locks.

Cancelling the run's task while a thread computes cannot stop the thread; :meth:`RunControl.in_thread`
therefore waits for it to finish (nothing may touch the model while clean-up runs) and only then lets
the ``CancelledError`` through. Whatever the thread completed (an update) has been recorded by then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["RunControl"]

T = TypeVar("T")

logger = logging.getLogger(__name__)


class RunControl:
    """The requests a run honours between steps, and whether a run is in progress."""

    def __init__(self) -> None:
        self.stop_requested = False
        self.pause_requested = False
        self._running = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    @property
    def running(self) -> bool:
        """True between :meth:`begin` and :meth:`end` (also while paused)."""
        return self._running

    def begin(self) -> None:
        """Start a run on the current event loop. Raises ``RuntimeError`` if one is in progress."""
        if self._running:
            raise RuntimeError(
                "this LoRATrainer is already running; wait for it (await the first run) or call stop() "
                "before starting another run"
            )
        self._running = True
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self.stop_requested = False
        self.pause_requested = False

    def end(self) -> None:
        """The run is over; later requests do nothing."""
        self._running = False
        self._loop = None
        self._wake = None

    def stop(self) -> None:
        """End the run after the step in progress. Safe from any thread; nothing happens when idle."""
        if self._running:
            self.stop_requested = True
            self._call_in_loop(self._set_wake)

    def pause(self) -> None:
        """Hold the run after the step in progress. Safe from any thread."""
        if self._running:
            self.pause_requested = True

    def resume(self) -> None:
        """Release a paused run. Safe from any thread."""
        self.pause_requested = False
        if self._running:
            self._call_in_loop(self._set_wake)

    async def wait_while_paused(self) -> float:
        """Block (without blocking the loop) until resumed or stopped; returns the seconds waited."""
        t0 = time.monotonic()
        while self.pause_requested and not self.stop_requested and self._wake is not None:
            self._wake.clear()  # a resume()/stop() scheduled after this point sets it again
            await self._wake.wait()
        return time.monotonic() - t0

    async def in_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``await asyncio.to_thread(fn, *args, **kwargs)``; if the awaiting task is cancelled, the thread is still
        awaited (its result discarded, its work done) before ``CancelledError`` propagates."""
        task = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            self.stop_requested = True
            try:
                await task
            except asyncio.CancelledError:
                pass  # cancelled once more: stop waiting
            except Exception as exc:  # the run ends as cancelled; say what the thread hit meanwhile
                logger.warning(
                    "%s raised while the run was being cancelled: %r", getattr(fn, "__name__", fn), exc
                )
            raise

    def _set_wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _call_in_loop(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            fn()
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed in between: nothing to wake
                loop.call_soon_threadsafe(fn)
