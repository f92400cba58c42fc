"""A run's history built from its events: compact metric arrays, and a bounded, shape-preserving view.

One job: turn the typed events of a run (:mod:`lora_widgets.events.types`) into NumPy arrays that plots and
scripts read. The trainer feeds it its own steps (:meth:`History.append`); the dashboard, a replay of
``metrics.jsonl`` or a script feed it every event (:meth:`History.record`), so the trainer's history and the
dashboard's record are one implementation.

A long run logs one :class:`~lora_widgets.events.types.StepMetrics` per step; keeping them as Python objects
costs ~1 kB each, and re-sending every point to a chart makes each redraw slower as the run grows.
:class:`History` stores each metric in a growable array (:class:`Column`: amortised O(1) append, 8 bytes
a value) and :func:`decimate_indices` picks at most ``max_points`` points however long the run is, by
min-max bucketing (the M4 idea of Jugel et al. 2014, "M4: A Visualization-Oriented Time Series Data
Aggregation", VLDB, sec. 3): each bucket keeps its minimum and maximum, so spikes and the overall shape
survive, and the first and last points are always kept.

This module is the one place for the decimation, the smoothing (:class:`EMA`) and the growable column;
the dashboard's charts use them from here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from lora_widgets.events.types import (
    CheckpointSaved,
    EvalMetrics,
    Event,
    RunEnded,
    RunFailed,
    RunFinished,
    RunStarted,
    RunState,
    StateChanged,
    StepMetrics,
)

__all__ = ["EMA", "Column", "History", "debiased_ema", "decimate_indices"]

_STEP_FIELDS: tuple[str, ...] = (
    "step",
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "elapsed_s",
    "memory_bytes",
    "memory_reserved_bytes",
    "gpu_utilization",
    "epoch",
)
_SMOOTHED_FIELDS: tuple[str, ...] = ("loss_smooth", "tokens_per_s_smooth")
_EVAL_FIELDS: tuple[str, ...] = ("eval_step", "val_loss")


class Column:
    """A float64 array that doubles its capacity when full (amortised O(1) :meth:`append`)."""

    __slots__ = ("_data", "_n")

    def __init__(self, capacity: int = 256) -> None:
        self._data = np.empty(max(1, capacity), dtype=np.float64)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def append(self, value: float | None) -> None:
        """Add one value (``None`` is stored as NaN)."""
        if self._n == self._data.shape[0]:
            grown = np.empty(2 * self._data.shape[0], dtype=np.float64)
            grown[: self._n] = self._data[: self._n]
            self._data = grown
        self._data[self._n] = math.nan if value is None else value
        self._n += 1

    def view(self) -> np.ndarray:
        """The values so far, as a read-only view (no copy)."""
        out = self._data[: self._n]
        out.flags.writeable = False
        return out


def decimate_indices(y: np.ndarray, max_points: int) -> np.ndarray:
    """Indices (sorted, unique) of at most ``max_points`` points of ``y`` that keep its shape.

    Keeps index 0 and ``len(y) - 1`` and, in each of ``(max_points - 2) // 2`` equal buckets of the
    interior, the positions of the minimum and maximum (NaNs are never chosen unless a bucket is all
    NaN, in which case its first point is kept). Returns ``arange(len(y))`` if it already fits.
    """
    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 4:
        raise ValueError(f"max_points must be an integer >= 4, got {max_points!r}")
    n = int(y.shape[0])
    if n <= max_points:
        return np.arange(n)
    interior = np.asarray(y[1:-1], dtype=np.float64)  # [L]
    length = interior.shape[0]
    buckets = (max_points - 2) // 2
    size = -(-length // buckets)  # ceil: points per bucket
    buckets = -(-length // size)  # no bucket made only of padding
    pad = buckets * size - length
    lo = np.where(np.isnan(interior), np.inf, interior)
    hi = np.where(np.isnan(interior), -np.inf, interior)
    lo = np.concatenate([lo, np.full(pad, np.inf)]).reshape(buckets, size)  # [B, size]
    hi = np.concatenate([hi, np.full(pad, -np.inf)]).reshape(buckets, size)  # [B, size]
    base = np.arange(buckets) * size  # [B]
    picks = np.concatenate([base + lo.argmin(axis=1), base + hi.argmax(axis=1)])
    picks = picks[picks < length] + 1  # back to indices of y
    return np.unique(np.concatenate([[0], picks, [n - 1]]))


class EMA:
    """Bias-corrected exponential moving average, one value at a time (TensorBoard's smoothing).

    ``m_t = beta m_{t-1} + (1 - beta) x_t`` with ``m_0 = 0``, reported as ``m_t / (1 - beta^t)`` (the
    correction of Kingma & Ba 2015, "Adam", sec. 3), so the first values are not pulled towards zero.
    Non-finite inputs are skipped (the average carries over).
    """

    __slots__ = ("_m", "_weight", "beta")

    def __init__(self, beta: float = 0.9) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        self.beta = beta
        self._m = 0.0
        self._weight = 0.0

    def update(self, x: float) -> float:
        """Fold in one value and return the debiased average so far (NaN before any finite value)."""
        if math.isfinite(x):
            self._m = self.beta * self._m + (1.0 - self.beta) * x
            self._weight = self.beta * self._weight + (1.0 - self.beta)
        return self._m / self._weight if self._weight > 0 else math.nan


def debiased_ema(values: Iterable[float], beta: float = 0.9) -> np.ndarray:
    """:class:`EMA` over a whole series at once: the smoothed value after each input."""
    ema = EMA(beta)
    return np.array([ema.update(float(x)) for x in values], dtype=np.float64)


class History:
    """Every logged step's metrics as NumPy arrays, the evaluations, and the run's other events.

    Arrays (read-only views, one entry per :class:`StepMetrics`): ``step``, ``loss``, ``lr``,
    ``grad_norm``, ``tokens_per_s``, ``elapsed_s``, ``memory_bytes``, ``memory_reserved_bytes`` and
    ``gpu_utilization`` (NaN when unknown), ``epoch``, ``loss_smooth`` (see :meth:`smoothed_loss`) and
    ``tokens_per_s_smooth`` (the same smoothing of the throughput); per evaluation: ``eval_step``,
    ``val_loss``.

    Filled by :meth:`append` (steps and evaluations, as the trainer does) or :meth:`record` (any event:
    the run's start, checkpoints, state and end are kept too, as ``started``, ``checkpoints``, ``state``
    and ``ended``), so a view of a run needs nothing but its events.
    """

    def __init__(self, smoothing: float = 0.9) -> None:
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
        self.smoothing = smoothing
        names = (*_STEP_FIELDS, *_SMOOTHED_FIELDS, *_EVAL_FIELDS)
        self._cols: dict[str, Column] = {name: Column() for name in names}
        self._loss_ema = EMA(smoothing)
        self._tps_ema = EMA(smoothing)  # per-step throughput is noisy
        self.started: RunStarted | None = None
        self.last_step: StepMetrics | None = None
        self.last_eval: EvalMetrics | None = None
        self.checkpoints: list[CheckpointSaved] = []
        self.state: RunState = "idle"
        self.ended: RunEnded | None = None

    @classmethod
    def from_events(cls, events: Iterable[Event], smoothing: float = 0.9) -> History:
        """A history with every event of ``events`` recorded, in order (e.g. a replayed ``metrics.jsonl``)."""
        history = cls(smoothing)
        for event in events:
            history.record(event)
        return history

    def __len__(self) -> int:
        return len(self._cols["step"])

    def __getattr__(self, name: str) -> np.ndarray:
        cols = self.__dict__.get("_cols")
        if cols is not None and name in cols:
            return cols[name].view()
        raise AttributeError(f"History has no attribute {name!r}; arrays: {sorted(cols or ())}")

    # typed accessors for the most used arrays (mypy sees these; __getattr__ serves the rest)
    @property
    def step(self) -> np.ndarray:
        """Step numbers (1-based count of completed optimizer updates)."""
        return self._cols["step"].view()

    @property
    def loss(self) -> np.ndarray:
        """Training loss (mean token cross-entropy, nats) at each logged step."""
        return self._cols["loss"].view()

    @property
    def lr(self) -> np.ndarray:
        """Learning rate of each logged step's update."""
        return self._cols["lr"].view()

    @property
    def tokens_per_s(self) -> np.ndarray:
        """Training throughput since the previous logged step."""
        return self._cols["tokens_per_s"].view()

    @property
    def eval_step(self) -> np.ndarray:
        """Steps at which validation ran."""
        return self._cols["eval_step"].view()

    @property
    def val_loss(self) -> np.ndarray:
        """Validation loss at each ``eval_step``."""
        return self._cols["val_loss"].view()

    def append(self, event: StepMetrics | EvalMetrics) -> None:
        """Record a step or eval event (other kinds are ignored; :meth:`record` keeps them)."""
        if isinstance(event, StepMetrics):
            c = self._cols
            c["step"].append(event.step)
            c["loss"].append(event.loss)
            c["lr"].append(event.learning_rate)
            c["grad_norm"].append(event.grad_norm)
            c["tokens_per_s"].append(event.tokens_per_s)
            c["elapsed_s"].append(event.elapsed_s)
            c["memory_bytes"].append(event.memory_bytes)
            c["memory_reserved_bytes"].append(event.memory_reserved_bytes)
            c["gpu_utilization"].append(event.gpu_utilization)
            c["epoch"].append(event.epoch)
            c["loss_smooth"].append(self._loss_ema.update(event.loss))
            c["tokens_per_s_smooth"].append(self._tps_ema.update(event.tokens_per_s))
            self.last_step = event
        elif isinstance(event, EvalMetrics):
            self._cols["eval_step"].append(event.step)
            self._cols["val_loss"].append(event.val_loss)
            self.last_eval = event

    def record(self, event: Event) -> None:
        """Record any event of a run: steps and evaluations as :meth:`append`, the others as attributes."""
        if isinstance(event, StepMetrics | EvalMetrics):
            self.append(event)
        elif isinstance(event, RunStarted):
            self.started = event
            self.state = "running"
        elif isinstance(event, CheckpointSaved):
            self.checkpoints.append(event)
        elif isinstance(event, StateChanged):
            self.state = event.state
        elif isinstance(event, RunEnded):
            self.ended = event
            self.state = (
                "failed"
                if isinstance(event, RunFailed)
                else "finished"
                if isinstance(event, RunFinished)
                else "stopped"
            )

    def smoothed_loss(self) -> np.ndarray:
        """Bias-corrected exponential moving average of the loss (as TensorBoard and Adam's m-hat do).

        ``m_t = beta m_{t-1} + (1 - beta) x_t`` reported as ``m_t / (1 - beta^t)``, with ``beta`` the
        ``smoothing`` given to the constructor; NaN losses are skipped. Kept up to date on every append.
        """
        return self._cols["loss_smooth"].view()

    def best_val_loss(self) -> float | None:
        """Lowest validation loss recorded (``None`` without a finite one)."""
        vals = self.val_loss
        finite = vals[np.isfinite(vals)]
        return float(finite.min()) if finite.size else None

    def display(self, max_points: int = 2000) -> dict[str, np.ndarray]:
        """A decimated copy of every series, at most ``max_points`` points each, for plotting.

        Step series share one set of indices chosen on the loss (see :func:`decimate_indices`), so
        ``out["step"][i]`` lines up with ``out["loss"][i]``, ``out["lr"][i]``, ... The smoothed series are
        computed on the full series, then decimated. ``eval_step``/``val_loss`` are decimated on the
        validation loss.
        """
        idx = decimate_indices(self.loss, max_points)
        names = (*_STEP_FIELDS, *_SMOOTHED_FIELDS)
        out: dict[str, np.ndarray] = {name: np.array(self._cols[name].view()[idx]) for name in names}
        eidx = decimate_indices(self.val_loss, max_points)
        out["eval_step"] = np.array(self.eval_step[eidx])
        out["val_loss"] = np.array(self.val_loss[eidx])
        return out

    def to_dict(self) -> dict[str, Any]:
        """Every full series as a list (for JSON)."""
        return {name: col.view().tolist() for name, col in self._cols.items()}
