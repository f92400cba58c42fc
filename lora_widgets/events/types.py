"""Typed events that a training run publishes, in order, to its subscribers.

Any run source produces these (our ``training/trainer.py``, an attached HF/TRL trainer via ``hf_bridge``, a :class:`~lora_widgets.events.replay.Replay`); the dashboard (``widget/``), scripts and tests consume them.
Keeping them in their own small module lets the widget depend on the event *shapes* without importing
anything that trains, and lets ``metrics.jsonl`` be read back into the same objects
(:func:`event_from_dict`) after a kernel crash.

Every event is a frozen dataclass with a ``kind`` class attribute and a JSON-safe :meth:`to_dict`.

A finished (or interrupted) run can be shown again: :func:`~lora_widgets.events.replay.read_events` reads its
``metrics.jsonl`` back into events, and :class:`~lora_widgets.events.replay.Replay` is a :class:`RunSource` that publishes them, so anything that views a
live run (the dashboard) views a replay the same way.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Literal, Protocol, Union, get_args, runtime_checkable

logger = logging.getLogger(__name__)

RunState = Literal["idle", "running", "paused", "stopped", "finished", "failed"]
"""The states a run moves through; the dashboard's status line shows exactly these words."""

RUN_STATES: tuple[RunState, ...] = ("idle", "running", "paused", "stopped", "finished", "failed")

FailureReason = Literal["oom", "nan", "bad_input", "no_gradient", "error"]
"""Why a run failed: out of memory, a non-finite loss, bad user input, a loss that no trainable parameter
reaches (:mod:`lora_widgets.health.gradient_check`), or any other exception."""


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
    """Base of the three terminal events; exactly one of them ends every run. ``saved`` says what was written to
    ``adapter_path``: a PEFT-format ``"adapter"``, the whole ``"model"`` (full fine-tuning) or the
    ``"trainable"`` tensors by name (a subset of the model's own choosing); ``""`` when nothing was."""

    kind: ClassVar[str] = "run_ended"
    step: int
    elapsed_s: float
    final_loss: float | None
    best_val_loss: float | None
    adapter_path: str | None
    message: str
    saved: str = ""  # what adapter_path holds: "adapter", "model" or "trainable" (checkpoint.SavedKind)


@dataclass(frozen=True)
class RunFinished(RunEnded):
    """The run completed all its steps."""

    kind: ClassVar[str] = "finished"


@dataclass(frozen=True)
class RunEarlyStopped(RunFinished):
    """An early-stopping rule ended the run before its last step: a normal end, not a failure.

    ``reason``: ``"patience"`` (the validation loss stopped improving) or ``"diverged"`` (the loss went
    non-finite or far above its start); ``best_step``/``best_val_loss``: the best evaluation, whose adapter
    is the one saved (``adapter_path``). See :mod:`lora_widgets.training.early_stopping`.
    """

    kind: ClassVar[str] = "early_stopped"
    reason: Literal["patience", "diverged"] = "patience"
    best_step: int | None = None


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


@dataclass(frozen=True)
class DataPrepared(_EventBase):
    """The run's data once prepared. ``data_kind``: ``"packed"`` (text cut into blocks of ``seq_len`` tokens,
    every token trained) or ``"sft"`` (instruction/chat rows padded per batch; ``seq_len`` is the longest
    padded length, ``trained_tokens`` the loss positions, ``padding_tokens`` the padded positions of epoch
    0's batches). ``tokens`` excludes padding. ``rows``/``truncated``/``dropped``/``formats``: the rows read,
    those cut to ``max_length``, those left with no trained token, rows per source format (SFT only).
    ``split``: how the validation part was chosen, in words (``"by document: 410 train / 46 validation
    documents, seed 0"``; :mod:`lora_widgets.data.split`)."""

    kind: ClassVar[str] = "data"
    data_kind: Literal["packed", "sft"]
    train_sequences: int
    val_sequences: int
    seq_len: int
    tokens: int
    trained_tokens: int
    padding_tokens: int = 0
    rows: int = 0
    truncated: int = 0
    dropped: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    train_on: str = "all"
    max_length: int | None = None
    split: str = ""

    @property
    def trained_share(self) -> float:
        """Share of the (non-padding) training tokens whose prediction is trained."""
        return self.trained_tokens / self.tokens if self.tokens else 0.0

    @property
    def padding_share(self) -> float:
        """Share of the batched positions that are padding."""
        total = self.tokens + self.padding_tokens
        return self.padding_tokens / total if total else 0.0


# -- issue 14: adapter statistics and sample generations (lora_widgets.adapter_stats, lora_widgets.health.samples) --


def _nested(value: Any) -> Any:
    """Undo JSON for a nested record: lists back to tuples, 'nan'/'inf' strings back to floats."""
    if isinstance(value, list):
        return tuple(_nested(v) for v in value)
    return _from_json(value)


@dataclass(frozen=True)
class AdapterLayerStats:
    """One LoRA layer at a step: ``||dW||_F / ||W||_F`` with ``dW = scaling * B A``, the factors' norms, their
    gradient norms (None: no ``.grad``), ``dW``'s singular values (descending) and the last update's size
    ``||dW_t - dW_(t-1)||_F / ||W||_F`` (None: not measured). ``layer``: block index; ``module``: its kind."""

    name: str
    layer: int | None
    module: str
    rank: int
    scaling: float
    weight_norm: float
    delta_norm: float
    relative_update: float
    a_norm: float
    b_norm: float
    a_grad_norm: float | None
    b_grad_norm: float | None
    singular_values: tuple[float, ...]
    update_ratio: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name not in ("name", "module"):
                object.__setattr__(self, f.name, _nested(getattr(self, f.name)))


@dataclass(frozen=True)
class AdapterStats(_EventBase):
    """Statistics of every LoRA layer after ``step`` updates. ``after_backward``: taken between ``backward()``
    and ``zero_grad()``, so a missing gradient means none flowed; ``learning_rate``: of the last update."""

    kind: ClassVar[str] = "adapter_stats"
    step: int
    layers: tuple[AdapterLayerStats, ...]
    after_backward: bool = False
    learning_rate: float | None = None
    seconds: float = 0.0

    def __post_init__(self) -> None:
        rows = tuple(r if isinstance(r, AdapterLayerStats) else AdapterLayerStats(**r) for r in self.layers)
        object.__setattr__(self, "layers", rows)


@dataclass(frozen=True)
class SamplePair:
    """One prompt's greedy answers from the base model (adapters off) and the current adapter. ``*_ended``:
    whether the answer ended with the end-of-turn token (None when no such token was given)."""

    prompt: str
    base: str
    current: str
    base_ended: bool | None = None
    current_ended: bool | None = None


@dataclass(frozen=True)
class SampleGenerations(_EventBase):
    """Sample answers at ``step`` and their cost in seconds (``base_reused``: base answers of an earlier
    record were reused, greedy decoding of a frozen base being deterministic)."""

    kind: ClassVar[str] = "samples"
    step: int
    samples: tuple[SamplePair, ...]
    max_new_tokens: int
    base_seconds: float
    current_seconds: float
    base_reused: bool = False

    def __post_init__(self) -> None:
        rows = tuple(s if isinstance(s, SamplePair) else SamplePair(**s) for s in self.samples)
        object.__setattr__(self, "samples", rows)


@dataclass(frozen=True)
class AlertRaised(_EventBase):
    """An "is it training?" finding (:mod:`lora_widgets.health.alerts`), published once per ``key`` per run: the
    ``evidence`` with its numbers, the ``fix``, the ``step`` it was seen at; ``severity`` "danger" (nothing
    trains) or "warning" (training works badly)."""

    kind: ClassVar[str] = "alert"
    key: str
    title: str
    evidence: str
    fix: str
    step: int | None = None
    severity: Literal["warning", "danger"] = "warning"


Event = Union[  # noqa: UP007 - a runtime alias, kept readable on Python 3.10
    RunStarted,
    StepMetrics,
    EvalMetrics,
    CheckpointSaved,
    StateChanged,
    RunFinished,
    RunEarlyStopped,
    RunStopped,
    RunFailed,
    AdapterStats,
    SampleGenerations,
    DataPrepared,
    AlertRaised,
]

_BY_KIND: dict[str, type[_EventBase]] = {cls.kind: cls for cls in get_args(Event)}
"""Every event class by its ``kind`` (read back from metrics.jsonl): the members of :data:`Event`."""


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

    Our :class:`~lora_widgets.LoRATrainer` satisfies it; so does an attached Hugging Face / TRL trainer,
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


class Subscribers:
    """The subscriber list every :class:`RunSource` keeps (one rule, written once).

    :meth:`add` returns an unsubscribe function; :meth:`deliver` calls every callback in order, and a
    callback that raises is logged with the producer's name while the others (and the run) carry on: a
    broken view must never end a training run.
    """

    def __init__(self, owner: str, *initial: Callable[[Event], None]) -> None:
        self._owner = owner
        self._callbacks: list[Callable[[Event], None]] = list(initial)

    def add(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Subscribe ``callback``; returns a function that unsubscribes it (idempotent)."""
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.remove(callback)

        return unsubscribe

    def deliver(self, event: Event) -> None:
        """Hand ``event`` to every subscriber, in subscription order."""
        for callback in list(self._callbacks):
            try:
                callback(event)
            except Exception:
                logger.exception("a %s subscriber raised on %s; the run continues", self._owner, event.kind)
