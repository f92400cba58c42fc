"""History: compact arrays, bounded shape-preserving display view."""

from __future__ import annotations

import numpy as np
import pytest

from lora_widgets.events.history import History, decimate_indices
from lora_widgets.events.types import EvalMetrics, StepMetrics


def _step(i: int, loss: float) -> StepMetrics:
    return StepMetrics(
        step=i,
        total_steps=0,
        epoch=0.0,
        loss=loss,
        learning_rate=1e-3,
        grad_norm=1.0,
        tokens_per_s=100.0,
        elapsed_s=float(i),
        eta_s=0.0,
        memory_bytes=1000 + i,
    )


def test_arrays_grow_and_hold_every_step() -> None:
    h = History()
    for i in range(1, 1001):
        h.append(_step(i, 1.0 / i))
    h.append(EvalMetrics(step=500, val_loss=0.5, perplexity=1.6, best_val_loss=0.5))
    assert len(h) == 1000
    assert h.step.tolist() == list(range(1, 1001))
    assert h.loss[9] == pytest.approx(0.1)
    assert h.memory_bytes[-1] == 2000
    assert h.eval_step.tolist() == [500]
    assert np.isnan(h.gpu_utilization).all()  # unknown on CPU
    with pytest.raises(ValueError):
        h.loss[0] = 3.0  # read-only views


def test_display_of_100k_steps_is_bounded_and_keeps_shape() -> None:
    rng = np.random.default_rng(0)
    n = 100_000
    losses = 5.0 * np.exp(-np.arange(n) / 20_000) + 0.05 * rng.standard_normal(n)
    losses[12_345] = 50.0  # a spike must survive decimation
    losses[77_777] = -3.0  # and so must a dip
    h = History()
    for i, v in enumerate(losses.tolist(), start=1):
        h.append(_step(i, v))
    view = h.display(max_points=2000)
    assert len(view["step"]) <= 2000
    assert {k: len(v) for k, v in view.items() if k not in ("eval_step", "val_loss")} == dict.fromkeys(
        [k for k in view if k not in ("eval_step", "val_loss")], len(view["step"])
    )
    assert view["step"][0] == 1 and view["step"][-1] == n  # first and last kept
    assert view["loss"].max() == 50.0 and view["loss"].min() == -3.0
    assert np.all(np.diff(view["step"]) > 0)
    # the decimated curve follows the true one: the mean of each tenth agrees within noise
    for lo in range(0, n, n // 10):
        sel = (view["step"] > lo) & (view["step"] <= lo + n // 10)
        assert abs(np.median(view["loss"][sel]) - np.median(losses[lo : lo + n // 10])) < 0.1


def test_decimate_short_series_untouched_and_nans_skipped() -> None:
    assert decimate_indices(np.arange(10.0), 100).tolist() == list(range(10))
    y = np.full(1000, np.nan)
    y[500] = 1.0
    idx = decimate_indices(y, 50)
    assert len(idx) <= 50 and 500 in idx.tolist()
    with pytest.raises(ValueError, match="max_points"):
        decimate_indices(y, 2)


def test_smoothed_loss_is_bias_corrected_ema() -> None:
    h = History(smoothing=0.5)
    for i, v in enumerate([4.0, 2.0, float("nan"), 1.0], start=1):
        h.append(_step(i, v))
    s = h.smoothed_loss()
    assert s[0] == pytest.approx(4.0)  # bias correction: the first value is the value
    assert s[1] == pytest.approx((0.25 * 4 + 0.5 * 2) / 0.75)
    assert s[2] == pytest.approx(s[1])  # NaN skipped
    with pytest.raises(ValueError, match="smoothing"):
        History(smoothing=1.0)
