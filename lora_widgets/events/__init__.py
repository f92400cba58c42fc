"""The typed event stream every run speaks, whoever produces it, and what reads it back.

=============  ==============================================================================================
``types``      the frozen event dataclasses (``RunStarted`` ... ``RunEnded``), their JSON round trip, the
               :class:`RunSource` protocol every run satisfies and the :class:`Subscribers` list
``history``    a run's metrics as NumPy columns; min-max decimation and the debiased EMA the charts use
``replay``     :func:`read_events` of a ``metrics.jsonl`` and :class:`Replay`, a run source that re-publishes it
=============  ==============================================================================================
"""

from __future__ import annotations

from lora_widgets.events.history import History
from lora_widgets.events.replay import Replay, read_events
from lora_widgets.events.types import (
    AdapterLayerStats,
    AdapterStats,
    AlertRaised,
    CheckpointSaved,
    DataPrepared,
    EvalMetrics,
    Event,
    FailureReason,
    RunEarlyStopped,
    RunEnded,
    RunFailed,
    RunFinished,
    RunSource,
    RunStarted,
    RunState,
    RunStopped,
    SampleGenerations,
    SamplePair,
    StateChanged,
    StepMetrics,
    Subscribers,
    event_from_dict,
)

__all__ = [
    "AdapterLayerStats",
    "AdapterStats",
    "AlertRaised",
    "CheckpointSaved",
    "DataPrepared",
    "EvalMetrics",
    "Event",
    "FailureReason",
    "History",
    "Replay",
    "RunEarlyStopped",
    "RunEnded",
    "RunFailed",
    "RunFinished",
    "RunSource",
    "RunStarted",
    "RunState",
    "RunStopped",
    "SampleGenerations",
    "SamplePair",
    "StateChanged",
    "StepMetrics",
    "Subscribers",
    "event_from_dict",
    "read_events",
]
