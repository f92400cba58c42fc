"""Compact per-step training history and a bounded, shape-preserving view of it for plots.

A long run logs one :class:`~lora_widgets.events.StepMetrics` per step; keeping them as Python objects
costs ~1 kB each, and re-sending every point to a chart makes each redraw slower as the run grows.
:class:`History` stores each metric in a growable NumPy array (amortised O(1) append, 8 bytes a value) and
:meth:`History.display` returns at most ``max_points`` points however long the run is, chosen by
min-max bucketing (the M4 idea of Jugel et al. 2014, "M4: A Visualization-Oriented Time Series Data
Aggregation", VLDB, sec. 3): each bucket keeps its minimum and maximum loss, so spikes and the overall
shape survive, and the first and last points are always kept.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lora_widgets.events import EvalMetrics, StepMetrics

__all__ = ["History", "decimate_indices"]

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
_EVAL_FIELDS: tuple[str, ...] = ("eval_step", "val_loss")


class _Column:
    """A float64 array that doubles its capacity when full."""

    __slots__ = ("_data", "_n")

    def __init__(self, capacity: int = 256) -> None:
        self._data = np.empty(capacity, dtype=np.float64)
        self._n = 0

    def append(self, value: float) -> None:
        if self._n == self._data.shape[0]:
            grown = np.empty(2 * self._data.shape[0], dtype=np.float64)
            grown[: self._n] = self._data[: self._n]
            self._data = grown
        self._data[self._n] = value
        self._n += 1

    def view(self) -> np.ndarray:
        out = self._data[: self._n]
        out.flags.writeable = False  # callers get a read-only view, not a copy
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


class History:
    """Every logged step's metrics as NumPy arrays, plus the evaluations.

    Arrays (read-only views, one entry per :class:`StepMetrics`): ``step``, ``loss``, ``lr``,
    ``grad_norm``, ``tokens_per_s``, ``elapsed_s``, ``memory_bytes``, ``memory_reserved_bytes`` and
    ``gpu_utilization`` (NaN when unknown), ``epoch``, ``loss_smooth`` (see :meth:`smoothed_loss`);
    per evaluation: ``eval_step``, ``val_loss``.
    """

    def __init__(self, smoothing: float = 0.9) -> None:
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
        self.smoothing = smoothing
        names = (*_STEP_FIELDS, "loss_smooth", *_EVAL_FIELDS)
        self._cols: dict[str, _Column] = {name: _Column() for name in names}
        self._ema = 0.0
        self._ema_weight = 0.0

    def __len__(self) -> int:
        return self._cols["step"]._n

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
        """Record a step or eval event (other kinds are ignored)."""
        if isinstance(event, StepMetrics):
            c = self._cols
            c["step"].append(event.step)
            c["loss"].append(event.loss)
            c["lr"].append(event.learning_rate)
            c["grad_norm"].append(event.grad_norm)
            c["tokens_per_s"].append(event.tokens_per_s)
            c["elapsed_s"].append(event.elapsed_s)
            c["memory_bytes"].append(event.memory_bytes)
            reserved = event.memory_reserved_bytes
            c["memory_reserved_bytes"].append(np.nan if reserved is None else reserved)
            util = event.gpu_utilization
            c["gpu_utilization"].append(np.nan if util is None else util)
            c["epoch"].append(event.epoch)
            if event.loss == event.loss:  # not NaN
                b = self.smoothing
                self._ema = b * self._ema + (1.0 - b) * event.loss
                self._ema_weight = b * self._ema_weight + (1.0 - b)
            c["loss_smooth"].append(self._ema / self._ema_weight if self._ema_weight > 0 else np.nan)
        elif isinstance(event, EvalMetrics):
            self._cols["eval_step"].append(event.step)
            self._cols["val_loss"].append(event.val_loss)

    def smoothed_loss(self) -> np.ndarray:
        """Bias-corrected exponential moving average of the loss (as TensorBoard and Adam's m-hat do).

        ``m_t = beta m_{t-1} + (1 - beta) x_t`` reported as ``m_t / (1 - beta^t)``, with ``beta`` the
        ``smoothing`` given to the constructor; NaN losses are skipped. Kept up to date on every append.
        """
        return self._cols["loss_smooth"].view()

    def display(self, max_points: int = 2000) -> dict[str, np.ndarray]:
        """A decimated copy of every series, at most ``max_points`` points each, for plotting.

        Step series share one set of indices chosen on the loss (see :func:`decimate_indices`), so
        ``out["step"][i]`` lines up with ``out["loss"][i]``, ``out["lr"][i]``, ... ``loss_smooth`` is the
        smoothed loss computed on the full series, then decimated. ``eval_step``/``val_loss`` are
        decimated on the validation loss.
        """
        idx = decimate_indices(self.loss, max_points)
        out: dict[str, np.ndarray] = {name: np.array(self._cols[name].view()[idx]) for name in _STEP_FIELDS}
        out["loss_smooth"] = np.array(self.smoothed_loss()[idx])
        eidx = decimate_indices(self.val_loss, max_points)
        out["eval_step"] = np.array(self.eval_step[eidx])
        out["val_loss"] = np.array(self.val_loss[eidx])
        return out

    def to_dict(self) -> dict[str, Any]:
        """Every full series as a list (for JSON)."""
        return {name: col.view().tolist() for name, col in self._cols.items()}
