r"""Learning-rate schedules as pure functions of the step, so they can be previewed before training.

The trainer asks :func:`lr_at` for the rate of every optimizer update, and the dashboard plots
:func:`lr_schedule` before the Train button is pressed: both read the same function, so the preview is
exactly what the run will use. How many updates a run makes (:func:`total_steps`) is written here once too.

Steps here are 0-based *update indices*, like array positions: ``lr_at(0, ...)`` is the rate of the first
optimizer update, the one events report as ``StepMetrics.step == 1`` (so step ``s`` uses ``lr_at(s - 1, ...)``
and ``lr_schedule(...)[s - 1]``). The
shapes are the ones in Hugging Face ``transformers`` (``get_{constant,linear,cosine}_schedule_with_warmup``),
so a run here and a ``transformers.Trainer`` run with the same settings use identical rates:

- warmup (Goyal et al. 2017, "Accurate, Large Minibatch SGD", arXiv:1706.02677, sec. 2.2): for
  ``s < warmup_steps`` the rate rises linearly, :math:`\eta_s = \eta \cdot s / w` (so the very first update
  uses 0, as in ``transformers``);
- then, with progress :math:`p = (s - w) / \max(1, T - w)` over the remaining updates:

  - ``"constant"``: :math:`\eta`;
  - ``"linear"``: :math:`\eta \cdot \max(0, (T - s) / \max(1, T - w))`;
  - ``"cosine"`` (Loshchilov & Hutter 2017, "SGDR", arXiv:1608.03983, eq. 5, one half-period without
    restarts and with :math:`\eta_{min} = 0`): :math:`\eta \cdot \tfrac12 (1 + \cos(\pi p))`.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

__all__ = ["SCHEDULES", "Schedule", "lr_at", "lr_schedule", "steps_per_epoch", "total_steps"]

Schedule = Literal["constant", "linear", "cosine"]
SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine")


def _check(total_steps: int, base_lr: float, warmup_steps: int, schedule: str) -> None:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
    if not (isinstance(base_lr, int | float) and math.isfinite(base_lr) and base_lr >= 0):
        raise ValueError(f"base_lr must be a finite number >= 0, got {base_lr!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {schedule!r}")


def _factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base rate for 0-based update ``step`` (validated arguments)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    remaining = max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, (total_steps - step) / remaining)
    progress = (step - warmup_steps) / remaining  # cosine
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int, schedule: str) -> float:
    """Learning rate of the 0-based optimizer update ``step`` out of ``total_steps``.

    Raises ``ValueError`` for a negative step, an unknown schedule or out-of-range arguments.
    Steps past ``total_steps`` keep the formula (linear and cosine stay at 0).
    """
    _check(total_steps, base_lr, warmup_steps, schedule)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    return float(base_lr) * _factor(step, total_steps, warmup_steps, schedule)


def lr_schedule(total_steps: int, base_lr: float, warmup_steps: int, schedule: str) -> np.ndarray:
    """The rate of every update ``0 .. total_steps - 1``, shape ``[total_steps]`` (float64), for previews."""
    _check(total_steps, base_lr, warmup_steps, schedule)
    return np.array(
        [float(base_lr) * _factor(s, total_steps, warmup_steps, schedule) for s in range(total_steps)],
        dtype=np.float64,
    )


def steps_per_epoch(n_blocks: int, batch_size: int, grad_accum_steps: int) -> int:
    """Optimizer updates in one pass over ``n_blocks`` training sequences: each update consumes
    ``grad_accum_steps`` micro-batches of ``batch_size`` sequences, and a last partial batch is dropped."""
    return (n_blocks // batch_size) // grad_accum_steps


def total_steps(max_steps: int | None, epochs: int, per_epoch: int) -> int:
    """Updates a run makes: ``max_steps`` when set (the data is cycled as needed), else ``epochs`` passes
    of ``per_epoch`` updates. The one formula the trainer and the dashboard's preview share."""
    return max_steps if max_steps is not None else epochs * per_epoch
