"""One run as a view sees it: its label and settings, and a :class:`~lora_widgets.events.history.History` of its events.

A plain record, built only from the run's events (:meth:`RunRecord.record`), so a live trainer, a replayed
``metrics.jsonl`` or any other :class:`~lora_widgets.events.types.RunSource` gives the same record. The dashboard
keeps one per run (``dash.runs``); the static summary and the charts read it; nothing here imports a
widget library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lora_widgets.events.history import History
from lora_widgets.events.types import AdapterStats, AlertRaised, Event, RunEnded, RunSource, SampleGenerations
from lora_widgets.lora.layers import LoRAConfig

__all__ = ["RunRecord"]


@dataclass(eq=False)
class RunRecord:
    """One run shown by a dashboard (``dash.runs``): its settings, its source, and what its events said.

    ``lora``/``train`` are the settings it was started with (``None`` for a run the dashboard did not start,
    such as a replay: its settings are in ``history.started.config``). ``source`` is the
    :class:`~lora_widgets.events.types.RunSource` that produced the events (a :class:`~lora_widgets.LoRATrainer`, a
    :class:`~lora_widgets.events.replay.Replay`, ...). ``history`` holds every event recorded so far; what shows whether
    the adapters learn is kept beside it: the last ``adapter_stats`` and ``samples``, and every alert.
    """

    index: int
    label: str
    lora: LoRAConfig | None = None
    train: Any = None  # TrainConfig
    source: RunSource | None = None
    history: History = field(default_factory=History, repr=False)
    overlaid: bool = field(default=False, repr=False)
    adapter_stats: AdapterStats | None = field(default=None, repr=False)
    samples: SampleGenerations | None = field(default=None, repr=False)
    alerts: list[AlertRaised] = field(default_factory=list, repr=False)

    def record(self, event: Event) -> None:
        """Record one event of the run (into :attr:`history`, or the adapter statistics, samples and alerts)."""
        if isinstance(event, AdapterStats):
            self.adapter_stats = event
        elif isinstance(event, SampleGenerations):
            self.samples = event
        elif isinstance(event, AlertRaised):
            self.alerts.append(event)
        else:
            self.history.record(event)

    @property
    def trainer(self) -> RunSource | None:
        """The run's source (the :class:`~lora_widgets.LoRATrainer` for a run started with Train)."""
        return self.source

    @property
    def result(self) -> RunEnded | None:
        """The terminal event (finished, stopped or failed); ``None`` while the run is in progress."""
        return self.history.ended

    @property
    def final_loss(self) -> float | None:
        """Final training loss (``None`` before the first step)."""
        if self.result is not None and self.result.final_loss is not None:
            return self.result.final_loss
        last = self.history.last_step
        return None if last is None else last.loss

    @property
    def best_val_loss(self) -> float | None:
        """Best validation loss seen (``None`` without evaluation)."""
        if self.result is not None and self.result.best_val_loss is not None:
            return self.result.best_val_loss
        return self.history.best_val_loss()
