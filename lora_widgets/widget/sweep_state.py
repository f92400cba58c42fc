"""What the sweep view shows, computed from typed events only (no widgets): rows, curves, the best run.

:class:`SweepBoard` consumes a :class:`~lora_widgets.sweep.runner.Sweep`'s event stream (its own events and
each run's :class:`~lora_widgets.events.StepMetrics`/:class:`~lora_widgets.events.EvalMetrics`) and keeps:

- ``rows``: one JSON row per run (settings, seed, best validation loss, the mean and spread of its setting over
  seeds, steps, time, adapter size, outcome), the run in progress included;
- a loss curve per run, decimated to :data:`CURVE_POINTS` points (min-max per bucket, as the dashboard's
  charts, so a spike survives), frozen when the run ends: a finished curve is sent to the page once;
- the best run: the lowest best validation loss of the best setting (:func:`~lora_widgets.sweep.results.best_point`).

The widget (:mod:`lora_widgets.widget.sweep_view`) decides when to send what; the static summary
(:mod:`lora_widgets.widget.sweep_static`) draws the same rows.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lora_widgets.events import EvalMetrics, StepMetrics
from lora_widgets.events.history import decimate_indices
from lora_widgets.sweep.events import SweepEnded, SweepRunEnded, SweepRunStarted, SweepStarted
from lora_widgets.sweep.results import best_point, table

__all__ = ["CURVE_POINTS", "SweepBoard"]

CURVE_POINTS = 48
"""Points per run's curve on the overlay: 50 runs x 48 points stay a few tens of KB, sent once each."""


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


class SweepBoard:
    """The sweep view's model: feed :meth:`on_event`; read :attr:`rows`, :meth:`curve`, :attr:`best_index`."""

    def __init__(self) -> None:
        self.settings: list[str] = []
        self.rows: list[dict[str, Any]] = []
        self.state = "idle"
        self.message = ""
        self.current: int | None = None  # index of the run in progress
        self.best_index: int | None = None
        self.ended: list[SweepRunEnded] = []
        self.finished_curves: list[int] = []  # runs whose curve froze since the last take_finished()
        self._steps: dict[int, list[tuple[int, float]]] = {}
        self._started: dict[int, SweepRunStarted] = {}

    def on_event(self, event: Any) -> bool:
        """Record one event; True when the table or a curve changed."""
        if isinstance(event, SweepStarted):
            self.settings, self.state = list(event.settings), "running"
            self.message = event.note  # "resumed 4 of 8 runs from ...": shown while the sweep runs
        elif isinstance(event, SweepRunStarted):
            self.current, self._started[event.index] = event.index, event
            self._steps[event.index] = []
            self._rebuild()
        elif isinstance(event, StepMetrics) and self.current is not None:
            if math.isfinite(event.loss):
                self._steps[self.current].append((event.step, event.loss))
        elif isinstance(event, EvalMetrics) and self.current is not None:
            self._live_val = _finite(event.best_val_loss)
            return False
        elif isinstance(event, SweepRunEnded):
            self.ended = [r for r in self.ended if r.index != event.index] + [event]
            self.current = None if self.current == event.index else self.current
            self.finished_curves.append(event.index)
            self._rebuild()
        elif isinstance(event, SweepEnded):
            self.state, self.message, self.current = event.state, event.message, None
            self._rebuild()
        else:
            return False
        return True

    def curve(self, index: int) -> list[list[float]]:
        """Run ``index``'s training-loss curve as ``[[step, loss], ...]``, at most :data:`CURVE_POINTS` points."""
        pts = self._steps.get(index, [])
        if not pts:
            return []
        y = np.array([p[1] for p in pts])  # [n]
        keep = decimate_indices(y, CURVE_POINTS)
        return [[pts[i][0], round(pts[i][1], 5)] for i in keep]

    def take_finished(self) -> list[int]:
        """Runs whose curve froze since the last call (each sent to the page once)."""
        out, self.finished_curves = self.finished_curves, []
        return out

    def _rebuild(self) -> None:
        """Rows from the ended runs (with their setting's mean and spread over seeds) and the run in progress."""
        groups = {(s.point, s.rung): s for s in table(self.ended)}
        best = best_point(self.ended)
        self.best_index = (
            groups[max(k for k in groups if k[0] == best)].best_index if best is not None else None
        )
        rows = []
        for r in sorted(self.ended, key=lambda r: r.index):
            s = groups[(r.point, r.rung)]
            rows.append({"index": r.index, "point": r.point, "settings": r.settings, "seed": r.seed, "rung": r.rung,
                         "best_val": _finite(r.best_val_loss) if r.outcome != "failed" else None,
                         "mean_val": s.mean_best_val, "std_val": s.std_best_val, "step": r.step,
                         "max_steps": r.max_steps, "elapsed_s": round(r.elapsed_s, 2),
                         "adapter_bytes": r.adapter_bytes, "outcome": r.outcome, "reason": r.reason,
                         "message": r.message[:300]})  # fmt: skip
        if self.current is not None and self.current in self._started:
            st = self._started[self.current]
            rows.append({"index": st.index, "point": st.point, "settings": st.settings, "seed": st.seed,
                         "rung": st.rung, "best_val": None, "mean_val": None, "std_val": None, "step": None,
                         "max_steps": st.max_steps, "elapsed_s": None, "adapter_bytes": None,
                         "outcome": "running", "reason": "", "message": ""})  # fmt: skip
        self.rows = rows
