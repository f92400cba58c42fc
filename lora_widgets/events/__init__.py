"""The typed event stream every run speaks, whoever produces it, and what reads it back.

=============  ==============================================================================================
``types``      the frozen event dataclasses (``RunStarted`` ... ``RunEnded``), their checked JSON round trip,
               and the :class:`RunSource` protocol every run satisfies
``source``     :class:`RunBase`, what every run source shares (state, :class:`Subscribers`, history, the
               metrics writer, the hop to the loop thread, stop/pause/resume, cancellation); its steering
               part alone is :class:`Steerable` (a ``Sweep`` of runs is one)
``run_files``  the run directory's files, one protocol for writers and readers: ``metrics.jsonl``
               (:class:`MetricsWriter`, :class:`EventLines`) and ``control.json`` (:func:`send_request`)
``history``    a run's metrics as NumPy columns; min-max decimation and the debiased EMA the charts use
``replay``     :func:`read_events` of a ``metrics.jsonl`` and :class:`Replay`, a run source that re-publishes it
``watch``      :class:`RunDirWatch`, a run source that follows a run directory another process writes
=============  ==============================================================================================
"""

from __future__ import annotations

from lora_widgets.events.history import History
from lora_widgets.events.replay import Replay, check_events, read_events
from lora_widgets.events.run_files import EventLines, MetricsWriter, send_request
from lora_widgets.events.source import Requests, RunBase, Steerable, Subscribers
from lora_widgets.events.types import (
    AdapterLayerStats,
    AdapterStats,
    AlertRaised,
    CheckpointSaved,
    DataPrepared,
    EvalMetrics,
    Event,
    FailureReason,
    Notice,
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
    event_from_dict,
)
from lora_widgets.events.watch import RunDirWatch

__all__ = [
    "AdapterLayerStats",
    "AdapterStats",
    "AlertRaised",
    "CheckpointSaved",
    "DataPrepared",
    "EvalMetrics",
    "Event",
    "EventLines",
    "FailureReason",
    "History",
    "MetricsWriter",
    "Notice",
    "Replay",
    "Requests",
    "RunBase",
    "RunDirWatch",
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
    "Steerable",
    "StepMetrics",
    "Subscribers",
    "check_events",
    "event_from_dict",
    "read_events",
    "send_request",
]
