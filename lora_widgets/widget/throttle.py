"""Pure helpers behind the dashboard's streaming discipline: a flush throttle, decimation, smoothing.

Nothing here imports a widget library, so each policy is unit-tested on plain numbers with a fake clock.

Why: a trainer can publish hundreds of steps per second, and JupyterLab's server drops iopub messages
above 1,000/s (see NOTES). The dashboard's event handler therefore only *records* (into :class:`Series`);
a :class:`Throttle` decides when the recorded data is pushed to the browser (at most once per
``interval`` seconds, whatever the step rate), and :func:`decimate_indices` bounds what one push sends
(a few thousand points, whatever the run length).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["EMA", "Series", "Throttle", "debiased_ema", "decimate_indices"]


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


def decimate_indices(y: np.ndarray, max_points: int = 2000) -> np.ndarray:
    """Indices of at most ``max_points`` samples of ``y`` that keep its shape (min-max bucketing).

    The series is cut into ``max_points // 2`` equal buckets and each keeps its minimum and its maximum
    (in their original order), so a loss spike or a NaN-free dip survives decimation, unlike plain
    striding. The first and last samples are always kept. Non-finite values never win a bucket unless
    the bucket has nothing else. Returns a sorted int64 array; ``arange(n)`` when ``n <= max_points``.
    """
    if max_points < 4:
        raise ValueError(f"max_points must be at least 4, got {max_points}")
    n = int(y.shape[0])
    if n <= max_points:
        return np.arange(n, dtype=np.int64)
    buckets = (max_points - 2) // 2
    size = math.ceil(n / buckets)
    padded = np.full(buckets * size, np.nan, dtype=np.float64)
    padded[:n] = y
    grid = padded.reshape(buckets, size)  # [buckets, size]
    finite = np.isfinite(grid)
    lo = np.where(finite, grid, np.inf).argmin(axis=1)  # [buckets]
    hi = np.where(finite, grid, -np.inf).argmax(axis=1)  # [buckets]
    base = np.arange(buckets, dtype=np.int64) * size
    idx = np.concatenate([[0], base + lo, base + hi, [n - 1]])
    idx = idx[idx < n]
    return np.unique(idx)  # sorted, at most 2 * buckets + 2 <= max_points


def debiased_ema(values: np.ndarray, beta: float = 0.9) -> np.ndarray:
    """Exponential moving average with bias correction, as TensorBoard's smoothing slider.

    ``m_t = beta * m_{t-1} + (1 - beta) * x_t`` with ``m_0 = 0``, reported as ``m_t / (1 - beta^t)``
    (the correction of Kingma & Ba 2015, Adam, section 3), so the first points are not pulled towards
    zero. Non-finite inputs are skipped (the average carries over).
    """
    out = np.empty(len(values), dtype=np.float64)
    m = 0.0
    weight = 0.0
    for i, x in enumerate(np.asarray(values, dtype=np.float64)):
        if math.isfinite(x):
            m = beta * m + (1.0 - beta) * x
            weight = beta * weight + (1.0 - beta)
        out[i] = m / weight if weight > 0 else math.nan
    return out


class EMA:
    """Incremental form of :func:`debiased_ema`: ``update(x)`` returns the smoothed value so far."""

    def __init__(self, beta: float = 0.9) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        self.beta = beta
        self._m = 0.0
        self._weight = 0.0

    def update(self, x: float) -> float:
        """Fold in one value (non-finite values are skipped) and return the debiased average."""
        if math.isfinite(x):
            self._m = self.beta * self._m + (1.0 - self.beta) * x
            self._weight = self.beta * self._weight + (1.0 - self.beta)
        return self._m / self._weight if self._weight > 0 else math.nan


class Series:
    """Append-only columns of floats with amortised O(1) appends (capacity doubling).

    ``Series("step", "loss")`` then ``s.append(step=1, loss=2.3)``; ``s["loss"]`` is a view of the
    recorded values. Missing columns in an append are recorded as NaN.
    """

    def __init__(self, *columns: str, capacity: int = 256) -> None:
        if not columns:
            raise ValueError("Series needs at least one column name")
        self.columns = tuple(columns)
        self._data = {c: np.full(capacity, np.nan, dtype=np.float64) for c in columns}
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def append(self, **values: float | None) -> None:
        """Record one row; unknown column names raise ``KeyError`` naming them."""
        unknown = set(values) - set(self.columns)
        if unknown:
            raise KeyError(f"unknown columns {sorted(unknown)}; this series has {list(self.columns)}")
        if self._n == len(self._data[self.columns[0]]):
            for c in self.columns:
                grown = np.full(2 * self._n, np.nan, dtype=np.float64)
                grown[: self._n] = self._data[c]
                self._data[c] = grown
        for c in self.columns:
            v = values.get(c)
            self._data[c][self._n] = math.nan if v is None else float(v)
        self._n += 1

    def __getitem__(self, column: str) -> np.ndarray:
        return self._data[column][: self._n]

    def last(self, column: str) -> float | None:
        """The most recent value of ``column``, or ``None`` when empty."""
        return float(self._data[column][self._n - 1]) if self._n else None
