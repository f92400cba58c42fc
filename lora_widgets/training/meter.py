"""Telemetry of a run: elapsed time without the paused time, tokens/s, ETA, device memory and utilisation."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lora_widgets.devices import gpu_utilization, memory_in_use

__all__ = ["DeviceUsage", "Lap", "Meter"]


@dataclass(frozen=True)
class Lap:
    """Throughput since the previous lap, time so far (pauses excluded) and time left."""

    tokens_per_s: float
    elapsed_s: float
    eta_s: float


class Meter:
    """The run's clock. ``elapsed()`` excludes paused time; :meth:`lap` gives tokens/s between logged steps
    and an ETA that extrapolates the mean time per update made so far by this run."""

    def __init__(self) -> None:
        self._t0 = time.monotonic()
        self._paused_s = 0.0
        self._tokens_per_step = 0
        self._start_step = 0
        self._mark = (0.0, 0)  # (elapsed, step) at the previous lap

    def start(self, step: int, tokens_per_step: int) -> None:
        """Training begins at ``step`` (> 0 when resumed); each update consumes ``tokens_per_step``."""
        self._tokens_per_step = tokens_per_step
        self._start_step = step
        self._mark = (self.elapsed(), step)

    def paused(self, seconds: float) -> None:
        """Leave ``seconds`` of pause out of the elapsed time."""
        self._paused_s += seconds

    def elapsed(self) -> float:
        """Seconds since the run began, pauses excluded."""
        return time.monotonic() - self._t0 - self._paused_s

    def lap(self, step: int, total_steps: int) -> Lap:
        """Telemetry after update ``step``; the next lap measures from here."""
        now = self.elapsed()
        t_prev, step_prev = self._mark
        self._mark = (now, step)
        tokens_per_s = (step - step_prev) * self._tokens_per_step / max(now - t_prev, 1e-9)
        eta = (total_steps - step) * now / max(step - self._start_step, 1)
        return Lap(tokens_per_s, now, eta)


class DeviceUsage:
    """Memory in use, and GPU utilisation read at most once a second (``nvidia-smi`` is slow)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._util: float | None = None
        self._util_t = -1e9

    def sample(self) -> tuple[int, int | None, float | None]:
        """(allocated bytes, reserved bytes or ``None``, GPU utilisation % or ``None``)."""
        allocated, reserved = memory_in_use(self.device)
        if self.device.type == "cuda" and time.monotonic() - self._util_t > 1.0:
            self._util = gpu_utilization(self.device)
            self._util_t = time.monotonic()
        return allocated, reserved, self._util
