"""Typed events that a training run publishes, in order, to its subscribers.

The trainer (``trainer.py``) produces these; the dashboard (``widget/``), scripts and tests consume them.
Keeping them in their own small module lets the widget depend on the event *shapes* without importing
anything that trains, and lets ``metrics.jsonl`` be read back into the same objects
(:func:`event_from_dict`) after a kernel crash.

Every event is a frozen dataclass with a ``kind`` class attribute and a JSON-safe :meth:`to_dict`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Literal, Protocol, Union, runtime_checkable

RunState = Literal["idle", "running", "paused", "stopped", "finished", "failed"]
"""The states a run moves through; the dashboard's status line shows exactly these words."""

RUN_STATES: tuple[RunState, ...] = ("idle", "running", "paused", "stopped", "finished", "failed")

FailureReason = Literal["oom", "nan", "bad_input", "error"]
"""Why a run failed: out of memory, a non-finite loss, bad user input, or any other exception."""


def _json_safe(value: Any) -> Any:
    """Turn NaN/inf floats into strings so that every line of metrics.jsonl is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # 'nan', 'inf', '-inf'
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _from_json(value: Any) -> Any:
    if value in ("nan", "inf", "-inf"):
        return float(value)
    return value


@dataclass(frozen=True)
class _EventBase:
    kind: ClassVar[str] = "event"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict with an ``"event"`` key naming the kind (used for metrics.jsonl)."""
        return {"event": self.kind, **_json_safe(asdict(self))}


@dataclass(frozen=True)
class RunStarted(_EventBase):
    """A run began: what it trains, where, and how long it will take."""

    kind: ClassVar[str] = "run_started"
    run_id: str
    run_dir: str
    config: dict[str, Any]
    lora: dict[str, Any] | None
    device: str
    device_name: str
    trainable_params: int
    total_params: int
    total_steps: int
    tokens_per_step: int
    time: float


@dataclass(frozen=True)
class StepMetrics(_EventBase):
    """One optimizer step completed (published every ``log_every`` steps and on the last step)."""

    kind: ClassVar[str] = "step"
    step: int
    total_steps: int
    epoch: float
    loss: float
    learning_rate: float
    grad_norm: float
    tokens_per_s: float
    elapsed_s: float
    eta_s: float
    memory_bytes: int
    memory_reserved_bytes: int | None = None
    gpu_utilization: float | None = None
    extra: dict[str, float] = field(default_factory=dict)
    """Further numeric metrics the producer logged, by its own names (e.g. TRL's ``mean_token_accuracy``)."""


@dataclass(frozen=True)
class EvalMetrics(_EventBase):
    """Validation loss (mean token cross-entropy, nats) and perplexity = exp(loss) at a step."""

    kind: ClassVar[str] = "eval"
    step: int
    val_loss: float
    perplexity: float
    best_val_loss: float
    extra: dict[str, float] = field(default_factory=dict)
    """Further numeric evaluation metrics, by the producer's names (e.g. ``eval_mean_token_accuracy``)."""


@dataclass(frozen=True)
class CheckpointSaved(_EventBase):
    """An adapter-only checkpoint (PEFT format + optimizer/scheduler/RNG state) was written atomically."""

    kind: ClassVar[str] = "checkpoint"
    step: int
    path: str


@dataclass(frozen=True)
class StateChanged(_EventBase):
    """The run moved to a new state (running, paused, ...)."""

    kind: ClassVar[str] = "state"
    state: RunState
    step: int


@dataclass(frozen=True)
class RunEnded(_EventBase):
    """Base of the three terminal events; exactly one of them ends every run."""

    kind: ClassVar[str] = "run_ended"
    step: int
    elapsed_s: float
    final_loss: float | None
    best_val_loss: float | None
    adapter_path: str | None
    message: str


@dataclass(frozen=True)
class RunFinished(RunEnded):
    """The run completed all its steps."""

    kind: ClassVar[str] = "finished"


@dataclass(frozen=True)
class RunStopped(RunEnded):
    """The user stopped the run; the adapter of the last completed step is kept."""

    kind: ClassVar[str] = "stopped"


@dataclass(frozen=True)
class RunFailed(RunEnded):
    """The run failed; ``message`` says what happened and ``suggestions`` what to change."""

    kind: ClassVar[str] = "failed"
    reason: FailureReason = "error"
    error_type: str = ""
    suggestions: tuple[str, ...] = field(default_factory=tuple)


Event = Union[  # noqa: UP007 - a runtime alias, kept readable on Python 3.10
    RunStarted,
    StepMetrics,
    EvalMetrics,
    CheckpointSaved,
    StateChanged,
    RunFinished,
    RunStopped,
    RunFailed,
]

_BY_KIND: dict[str, type[_EventBase]] = {
    cls.kind: cls
    for cls in (
        RunStarted,
        StepMetrics,
        EvalMetrics,
        CheckpointSaved,
        StateChanged,
        RunFinished,
        RunStopped,
        RunFailed,
    )
}


def event_from_dict(data: dict[str, Any]) -> Event:
    """Rebuild an event from :meth:`to_dict` output (one line of ``metrics.jsonl``).

    Raises ``ValueError`` for an unknown ``"event"`` kind, naming it and the known kinds.
    """
    kind = data.get("event")
    cls = _BY_KIND.get(str(kind))
    if cls is None:
        raise ValueError(f"unknown event kind {kind!r}; expected one of {sorted(_BY_KIND)}")
    names = {f.name for f in fields(cls)}
    kwargs = {k: _from_json(v) for k, v in data.items() if k in names}
    if cls is RunFailed and "suggestions" in kwargs:
        kwargs["suggestions"] = tuple(kwargs["suggestions"])
    return cls(**kwargs)  # type: ignore[return-value]


@runtime_checkable
class RunSource(Protocol):
    """Anything that produces a run's events and can be steered: the contract the dashboard relies on.

    Today's :class:`~lora_widgets.Trainer` satisfies it; so does an attached Hugging Face / TRL trainer,
    and a replay of ``metrics.jsonl`` (whose ``stop``/``pause``/``resume`` do nothing). A view subscribes,
    awaits :meth:`run`, and never reaches further into the producer than these members.
    """

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for every event, on the event loop's thread, in order; returns an
        unsubscribe function."""
        ...

    async def run(self) -> RunEnded:
        """Produce the run's events until it ends; return the terminal event (never raises for a failed
        run: a failure is a :class:`RunFailed`)."""
        ...

    def stop(self) -> None:
        """Ask the run to end after the step in progress. Safe from any thread; no-op when idle."""
        ...

    def pause(self) -> None:
        """Hold the run between steps until :meth:`resume`. Safe from any thread."""
        ...

    def resume(self) -> None:
        """Release a paused run. Safe from any thread."""
        ...

    @property
    def running(self) -> bool:
        """True while :meth:`run` is in progress (also while paused)."""
        ...
