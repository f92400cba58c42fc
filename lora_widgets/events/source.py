"""The one run contract: what every run source shares, written once.

A run source (:class:`~lora_widgets.LoRATrainer`, :class:`~lora_widgets.hf.run.HFRun`,
:class:`~lora_widgets.events.replay.Replay`, :class:`~lora_widgets.events.watch.RunDirWatch`) subclasses
:class:`RunBase` and writes only what is its own: how it produces events (its ``run()``). :class:`RunBase` holds
the rest and satisfies :class:`~lora_widgets.events.types.RunSource`:

- ``state``, ``history`` (a :class:`~lora_widgets.events.history.History`), ``last_event`` and ``running``;
- the subscribers (:class:`Subscribers`), called on the event loop's thread only: :meth:`RunBase._publish`
  from the loop, :meth:`RunBase._publish_from_thread` from a worker thread (the hop goes through
  ``loop.call_soon_threadsafe``; widget updates sent from other threads never reach the page in Colab,
  googlecolab/colabtools#3373);
- the ``metrics.jsonl`` writer (:class:`~lora_widgets.events.run_files.MetricsWriter`), when the source writes one;
- stop / pause / resume (:class:`Requests`, safe from any thread, awaited on the loop or in a worker thread), and
  the requests another process writes to the run directory (:class:`~lora_widgets.events.run_files.ControlReader`);
- the cancel shield: :meth:`RunBase._in_thread` runs a blocking phase in a worker thread and, if the run's task
  is cancelled, still waits for the thread (nothing may touch the model while clean-up runs) before the
  ``CancelledError`` goes on.

Adding a source is one small class (CONTRIBUTING.md, "Add a run source"). The steering part (subscribers,
``running``, requests, the hop, the pause wait, the cancel shield) is :class:`Steerable`, which a
:class:`~lora_widgets.sweep.runner.Sweep` shares too: it forwards each request to the run in progress and
keeps no flags of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from lora_widgets.events.history import History
from lora_widgets.events.run_files import ControlReader, MetricsWriter
from lora_widgets.events.types import Event, RunEnded, RunState

__all__ = ["Requests", "RunBase", "Steerable", "Subscribers"]

T = TypeVar("T")

logger = logging.getLogger(__name__)


class Subscribers:
    """The subscriber list of a run source (one rule, written once).

    :meth:`add` returns an unsubscribe function; :meth:`deliver` calls every callback in order, and a
    callback that raises is logged with the producer's name while the others (and the run) carry on: a
    broken view must never end a training run.
    """

    def __init__(self, owner: str, *initial: Callable[[Event], None]) -> None:
        self._owner = owner
        self._callbacks: list[Callable[[Event], None]] = list(initial)

    def add(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Subscribe ``callback``; returns a function that unsubscribes it (idempotent)."""
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.remove(callback)

        return unsubscribe

    def deliver(self, event: Event) -> None:
        """Hand ``event`` to every subscriber, in subscription order."""
        for callback in list(self._callbacks):
            try:
                callback(event)
            except Exception:
                logger.exception("a %s subscriber raised on %s; the run continues", self._owner, event.kind)


class Requests:
    """Stop, pause and resume requests: set from any thread, read between steps.

    ``stop`` also releases a pause; ``pause`` after ``stop`` does nothing. A worker thread holds a pause
    with :meth:`wait_blocking`; the event loop with :meth:`RunBase._wait_while_paused`.
    """

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._go = threading.Event()
        self._go.set()

    @property
    def stop_requested(self) -> bool:
        """A stop was asked for since the run began."""
        return self._stop.is_set()

    @property
    def pause_requested(self) -> bool:
        """A pause is in force (asked for, not yet resumed or stopped)."""
        return not self._go.is_set()

    def stop(self) -> None:
        """Ask for the end after the step in progress (releases a pause)."""
        self._stop.set()
        self._go.set()

    def pause(self) -> None:
        """Ask to hold between steps (nothing once a stop was asked for)."""
        if not self._stop.is_set():
            self._go.clear()

    def resume(self) -> None:
        """Release a pause."""
        self._go.set()

    def clear(self) -> None:
        """Forget every request (a new run begins)."""
        self._stop.clear()
        self._go.set()

    def wait_blocking(self, poll: Callable[[], None] | None = None, every: float = 0.25) -> float:
        """Block this (worker) thread while paused; returns the seconds waited. ``poll`` is called every
        ``every`` seconds meanwhile (to read a resume written by another process)."""
        t0 = time.monotonic()
        while not self._go.wait(every if poll is not None else None):
            if poll is not None:
                poll()
        return time.monotonic() - t0

    def apply(self, request: str | None) -> None:
        """Apply a request read from the run directory (``None``: nothing to do)."""
        if request == "stop":
            self.stop()
        elif request == "pause":
            self.pause()
        elif request == "resume":
            self.resume()


class Steerable:
    """What every steerable producer of events shares, a run or a sweep of runs (see the module docstring).

    The subscribers, ``running``, stop / pause / resume (:class:`Requests`; :meth:`_forward_request` passes each
    on to whatever produces the events), the hop to the loop's thread, the wait while paused and the cancel
    shield. :class:`RunBase` adds one run's record (state, history, ``metrics.jsonl``, ``control.json``); a
    :class:`~lora_widgets.sweep.runner.Sweep` uses this part alone, forwarding to the run in progress.

    Args:
        requests: the stop/pause requests to share (a source whose worker honours them itself, such as an
            HF callback, passes its own); a fresh :class:`Requests` by default.
    """

    owner: ClassVar[str] = "run"
    """The source's name in log messages and errors."""

    def __init__(self, requests: Requests | None = None) -> None:
        self._subscribers = Subscribers(self.owner)
        self._requests = requests if requests is not None else Requests()
        self._running = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._wake: asyncio.Event | None = None

    # -- the RunSource members ------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for every event, on the event loop's thread, in order; returns an
        unsubscribe function. An exception in a callback is logged and does not stop the run."""
        return self._subscribers.add(callback)

    @property
    def running(self) -> bool:
        """True while ``run()`` is in progress (also while paused)."""
        return self._running

    def stop(self) -> None:
        """End the run after the step in progress. Safe from any thread; nothing happens when idle."""
        if self._running:
            self._requests.stop()
            self._on_loop(self._set_wake)
            self._forward_request("stop")

    def pause(self) -> None:
        """Hold the run after the step in progress until :meth:`resume`. Safe from any thread."""
        if self._running:
            self._requests.pause()
            self._forward_request("pause")

    def resume(self) -> None:
        """Release a paused run. Safe from any thread."""
        self._requests.resume()
        if self._running:
            self._on_loop(self._set_wake)
            self._forward_request("resume")

    # -- for subclasses -------------------------------------------------------------------------------

    def _forward_request(self, request: str) -> None:
        """Pass a request on to whatever produces the events (a watched process, a sweep's run in progress);
        nothing by default."""

    def _begin_run(self, busy: str) -> None:
        """A run begins on the current loop: forget earlier requests. ``busy``: the ``RuntimeError`` message if
        one is already in progress."""
        if self._running:
            raise RuntimeError(busy)
        self._running = True
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        self._requests.clear()

    def _end_run(self) -> None:
        """The run is over: later requests do nothing."""
        self._running = False
        self._loop = self._loop_thread = self._wake = None

    def _publish(self, event: Event) -> None:
        """On the loop's thread: hand ``event`` to every subscriber, in order."""
        self._subscribers.deliver(event)

    def _publish_from_thread(self, event: Event) -> None:
        """:meth:`_publish` from any thread: hopped to the loop's thread (directly when already on it, or when
        no run is in progress)."""
        loop = self._loop
        if loop is None or threading.get_ident() == self._loop_thread:
            self._publish(event)
            return
        with contextlib.suppress(RuntimeError):  # the loop was closed in between
            loop.call_soon_threadsafe(self._publish, event)

    def _poll_s(self) -> float | None:
        """While paused, how often :meth:`_check_control` looks for a request from outside (``None``: never)."""
        return None

    def _check_control(self) -> None:
        """Apply a request that came from outside this process since the last check; nothing by default."""

    async def _wait_while_paused(self) -> float:
        """Hold (without blocking the loop) until resumed or stopped; returns the seconds waited."""
        t0 = time.monotonic()
        poll = self._poll_s()
        while self._requests.pause_requested and self._wake is not None:
            self._wake.clear()  # a resume()/stop() scheduled after this point sets it again
            with contextlib.suppress(asyncio.TimeoutError):  # Python 3.10: not the built-in one
                await asyncio.wait_for(self._wake.wait(), poll)
            self._check_control()
        return time.monotonic() - t0

    async def _in_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``await asyncio.to_thread(fn, ...)``; if the awaiting task is cancelled, a stop is requested and the
        thread is still awaited (its result discarded, its work done) before ``CancelledError`` propagates."""
        task = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            self._requests.stop()
            try:
                await task
            except asyncio.CancelledError:
                pass  # cancelled once more: stop waiting
            except Exception as exc:  # the run ends as cancelled; say what the thread hit meanwhile
                name = getattr(fn, "__name__", fn)
                logger.warning("%s raised while the run was being cancelled: %r", name, exc)
            raise

    def _set_wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _on_loop(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the run's loop thread (``asyncio.Event`` is not thread-safe); nothing when idle."""
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            fn()
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed in between
                loop.call_soon_threadsafe(fn)


class RunBase(Steerable):
    """What every run source shares (see the module docstring); a subclass writes ``run()``.

    :class:`Steerable` plus the run's record: ``state``, ``history``, ``last_event``, the ``metrics.jsonl``
    writer and the requests another process writes to ``control.json``.

    Args:
        requests: the stop/pause requests to share (a source whose worker honours them itself, such as an
            HF callback, passes its own); a fresh :class:`Requests` by default.
    """

    control_poll_s: ClassVar[float] = 0.25
    """While paused with a :class:`~lora_widgets.events.run_files.ControlReader`, how often it is read."""

    def __init__(self, requests: Requests | None = None) -> None:
        super().__init__(requests)
        self.state: RunState = "idle"
        self.history = History()
        self.last_event: RunEnded | None = None
        self._writer: MetricsWriter | None = None
        self._control: ControlReader | None = None

    def _begin_run(self, busy: str) -> None:
        """A run begins on the current loop: forget earlier requests and history. ``busy``: the
        ``RuntimeError`` message if one is already in progress."""
        super()._begin_run(busy)
        self.history = History()
        self.last_event = None

    def _end_run(self) -> None:
        """The run is over: later requests do nothing; the metrics file and control file are closed."""
        super()._end_run()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._control is not None:
            self._control.discard()  # a request that came too late must not act on a later run
            self._control = None

    def _publish(self, event: Event) -> None:
        """On the loop's thread: record ``event`` (state, history, metrics.jsonl), then hand it to every
        subscriber, in order."""
        if isinstance(event, RunEnded):
            self.last_event = event
        self.history.record(event)
        self.state = self.history.state  # one rule: from StateChanged, RunStarted and the terminal event
        if self._writer is not None:
            self._writer.write(event)
        super()._publish(event)

    def _poll_s(self) -> float | None:
        return self.control_poll_s if self._control is not None else None

    def _check_control(self) -> None:
        """Apply a request another process wrote to the run directory since the last check."""
        if self._control is not None:
            request = self._control.poll()  # one of REQUESTS: the method of that name
            if request is not None:
                getattr(self, request)()
