"""``SweepView``: a sweep in the notebook, live: the runs' table, their loss curves overlaid, a scatter.

The view consumes the typed events of a :class:`~lora_widgets.sweep.runner.Sweep` only (through
:class:`~lora_widgets.widget.sweep_state.SweepBoard`) and runs the sweep as a task on the kernel's asyncio
loop, as the dashboard runs a training run, so cells keep executing meanwhile. Traffic stays within the
dashboard's budget (``benchmarks/bench_streaming.py``, case "sweep"): at most one push per
``flush_interval`` second; a run's decimated curve (<= 48 points) is sent once after it ends, the run in
progress as one small ``live`` trait; the table is resent only when it changed.

In the page: the table sorts by any column (click its header), the best run is highlighted, clicking a row
emphasises that run's curve; the scatter shows a chosen setting against best validation loss (log axis for a
learning rate); Stop sweep and Skip this run; ``on_select`` is told which finished run was clicked. A saved notebook keeps the table and the scatter as HTML + SVG
(:mod:`lora_widgets.widget.sweep_static`), written below the widget when the sweep ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anywidget
import traitlets
from IPython.display import display, update_display

from lora_widgets.lora import has_lora, remove_lora
from lora_widgets.sweep.events import SweepRunEnded
from lora_widgets.sweep.runner import Sweep
from lora_widgets.widget.session import running_loop
from lora_widgets.widget.sweep_state import SweepBoard
from lora_widgets.widget.sweep_static import scatter_svg, table_html
from lora_widgets.widget.throttle import FlushScheduler
from lora_widgets.widget.view import publish_view

__all__ = ["SweepView"]

_STATIC = Path(__file__).parent / "static"


class SweepView(anywidget.AnyWidget):
    """Show ``sweep`` live; :meth:`start` runs it as a task (see the module docstring)."""

    _esm = _STATIC / "sweep.js"
    _css = _STATIC / "sweep.css"

    rows = traitlets.List(
        traitlets.Dict(), help="One dict per run (SweepBoard.rows), the run in progress last."
    ).tag(sync=True)
    settings = traitlets.List(traitlets.Unicode(), help="The swept settings' names.").tag(sync=True)
    scatter_setting = traitlets.Unicode("", help="The setting on the scatter's x axis.").tag(sync=True)
    best_index = traitlets.Int(-1, help="The best run's index (-1: none yet).").tag(sync=True)
    live = traitlets.Dict(help="The run in progress: {'index', 'curve': [[step, loss], ...]}.").tag(sync=True)
    state = traitlets.Unicode("idle", help="idle, running, finished or stopped.").tag(sync=True)
    message = traitlets.Unicode("", help="The sweep's end message.").tag(sync=True)

    flush_interval: float = 1.0

    def __init__(self, sweep: Sweep, **kwargs: Any) -> None:
        if not isinstance(sweep, Sweep):
            raise TypeError(f"sweep must be a lora_widgets.sweep.Sweep, got {type(sweep).__name__}")
        super().__init__(**kwargs)
        self.sweep = sweep
        self.board = SweepBoard()
        self.settings = list(sweep.settings)
        self.scatter_setting = next(
            (s for s in sweep.settings if s.endswith("learning_rate")), sweep.settings[0]
        )
        self._task: asyncio.Task[Any] | None = None
        self._dirty = False
        self._flusher = FlushScheduler(self._flush, self.flush_interval)
        self._display_id: str | None = None
        self.on_select: Callable[[SweepRunEnded], None] | None = None
        """Called with a finished run's row when its table row is clicked (a dashboard replays the run)."""
        sweep.subscribe(self._on_event)
        self.on_msg(self._on_msg)

    @classmethod
    def from_dashboard(cls, dashboard: Any, space: Any, **kwargs: Any) -> SweepView:
        """A :class:`SweepView` of a sweep on a dashboard's model and data, from its current settings.

        ``kwargs`` go to :class:`~lora_widgets.sweep.runner.Sweep` (``seeds``, ``halving``, ``directory``). Raises
        ``RuntimeError`` while the dashboard trains (one model, one run at a time) and the sweep's ``ValueError``
        for bad input, before anything runs. Adapters an earlier dashboard run made are removed from the model
        first (each run saved its adapter in its run directory); adapters you applied yourself are refused.
        Clicking a finished run's row replays that run in the dashboard, so its charts show as for any run.
        """
        if dashboard.running:
            raise RuntimeError("the dashboard is training; stop it or await dash.wait() before a sweep")
        lora, train = dashboard.current_configs()
        if has_lora(dashboard.model) and any(run.lora is not None for run in dashboard.runs):
            remove_lora(dashboard.model)  # a dashboard run made them and saved them in its run directory
        prepared = dashboard._data  # the RunData the dashboard prepared (train, val, how it was split)
        sweep = Sweep(dashboard.model, dashboard.tokenizer, prepared, None, space=space, lora=lora, config=train,
                      **kwargs)  # fmt: skip
        view = cls(sweep)

        def show(row: SweepRunEnded) -> None:  # a clicked row's charts: its metrics.jsonl replayed
            if row.run_dir is not None and not dashboard.running:
                dashboard.replay(Path(row.run_dir) / "metrics.jsonl")

        view.on_select = show
        return view

    # -- public API ------------------------------------------------------------------------------------

    def start(self) -> asyncio.Task[Any]:
        """Run the sweep as a task on the running loop (a notebook's); returns the task."""
        if self.running:
            raise RuntimeError("the sweep is already running; view.stop() it or await view.wait()")
        self._task = running_loop().create_task(self.sweep.run())
        return self._task

    @property
    def running(self) -> bool:
        """True while the sweep's task has not finished."""
        return self._task is not None and not self._task.done()

    async def wait(self) -> Any:
        """Wait for the sweep to end; its rows. Also writes the static summary from the awaiting cell."""
        if self._task is None:
            return None
        rows = await asyncio.shield(self._task)
        self._write_static()
        return rows

    def stop(self) -> None:
        """Stop the sweep (the run in progress is not recorded; a resumed sweep runs it again)."""
        self.sweep.stop()

    def skip(self) -> None:
        """End the run in progress; the sweep goes on."""
        self.sweep.skip()

    def static_html(self) -> str:
        """The table and the scatter as HTML with an inline SVG (what a saved notebook shows)."""
        svg = scatter_svg(self.board.rows, self.scatter_setting, self.board.best_index)
        return table_html(self.board.rows, self.board.best_index, self.board.message) + svg

    def _ipython_display_(self) -> None:
        publish_view(self)
        if self._display_id is None:
            self._display_id = f"lora-sweep-{id(self):x}-{time.time_ns():x}"
        display({"text/plain": ""}, raw=True, display_id=self._display_id)

    # -- events -> traits ------------------------------------------------------------------------------

    def _on_event(self, event: Any) -> None:
        if self.board.on_event(event):
            self._dirty = True
        if event.kind == "sweep_ended":
            self._flusher.flush_now()
            self._write_static()
        elif event.kind == "step" or self._dirty:
            self._flusher.request()  # at most one push per flush_interval, however short the runs

    def _flush(self) -> None:
        b = self.board
        with self.hold_sync():
            if self._dirty:
                self.rows = b.rows
                self.best_index = -1 if b.best_index is None else b.best_index
                self.state, self.message = b.state, b.message
                self._dirty = False
            if b.current is not None:
                self.live = {"index": b.current, "curve": b.curve(b.current)}
        finished = b.take_finished()
        if finished:  # the runs that ended since the last push, in one message, once each
            self.send({"type": "curves", "curves": {str(i): b.curve(i) for i in finished}})

    def _on_msg(self, _widget: Any, content: Any, _buffers: Any) -> None:
        kind = content.get("type") if isinstance(content, dict) else None
        if kind == "stop":
            self.stop()
        elif kind == "skip":
            self.skip()
        elif kind == "select" and self.on_select is not None:  # a row was clicked
            row = next((r for r in self.board.ended if r.index == content.get("index")), None)
            if row is not None:
                self.on_select(row)
        elif kind == "curves":  # a page (re)opened: every finished run's curve, once
            curves = {str(r.index): self.board.curve(r.index) for r in self.board.ended}
            self.send({"type": "curves", "curves": curves})

    def _write_static(self) -> None:
        if self._display_id is not None and self.board.rows:
            text = f"sweep: {len(self.board.ended)} runs; {self.board.message}"
            update_display(
                {"text/html": self.static_html(), "text/plain": text}, raw=True, display_id=self._display_id
            )
