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

import dataclasses
import math
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import (
    Any,
    ClassVar,
    Literal,
    Protocol,
    Union,
    get_args,
    get_origin,
    get_type_hints,
    runtime_checkable,
)

SCHEMA_VERSION = 1
"""The version of the events' shapes written to ``metrics.jsonl`` (:attr:`RunStarted.schema_version`): raised
when a field changes meaning or an event kind is added, so that an older reader can say what it skipped."""

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
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, dict):
        return {k: _from_json(v) for k, v in value.items()}
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
    schema_version: int = SCHEMA_VERSION
    """:data:`SCHEMA_VERSION` of the writer (a file without it was written before versions were recorded: 1)."""


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
    documents, seed 0"``; :mod:`lora_widgets.data.split`).
    ``packed``: the examples are laid out padding-free (``TrainConfig.packing``), so ``padding_tokens`` is 0."""

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
    packed: bool = False

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


@dataclass(frozen=True)
class Notice(_EventBase):
    """A run source's own message to whoever views it, under ``key``: a replay's skipped lines, a watched run
    directory not written yet. A later notice with the same ``key`` replaces it; an empty ``message`` clears it."""

    kind: ClassVar[str] = "notice"
    key: str
    title: str
    message: str
    severity: Literal["info", "warning"] = "info"


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
    Notice,
]

_BY_KIND: dict[str, type[_EventBase]] = {cls.kind: cls for cls in get_args(Event)}
"""Every event class by its ``kind`` (read back from metrics.jsonl): the members of :data:`Event`."""


def event_from_dict(data: dict[str, Any]) -> Event:
    """Rebuild an event from :meth:`to_dict` output (one line of ``metrics.jsonl``), checking each field's type.

    Keys the event does not have (written by a newer version) are ignored. Raises ``ValueError`` for an
    unknown ``"event"`` kind (naming it and the known kinds) or a field of the wrong type (naming the field,
    its expected type and the value, e.g. ``loss: "abc"``); ``TypeError`` for a missing field.
    """
    kind = data.get("event")
    cls = _BY_KIND.get(str(kind))
    if cls is None:
        raise ValueError(f"unknown event kind {kind!r}; expected one of {sorted(_BY_KIND)}")
    names = {f.name for f in fields(cls)}
    kwargs = {k: _from_json(v) for k, v in data.items() if k in names}
    hints = _field_types(cls)
    for name, value in kwargs.items():
        if not _fits(value, hints[name]):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise ValueError(f"{kind} field {name!r} should be {_type_name(hints[name])}, got {shown}")
    if cls is RunFailed and "suggestions" in kwargs:
        kwargs["suggestions"] = tuple(kwargs["suggestions"])
    return cls(**kwargs)  # type: ignore[return-value]


_FIELD_TYPES: dict[type, dict[str, Any]] = {}


def _field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of an event class (resolved once per class)."""
    if cls not in _FIELD_TYPES:
        _FIELD_TYPES[cls] = get_type_hints(cls)
    return _FIELD_TYPES[cls]


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value can stand for a field typed ``hint`` (an int for a float; a dict for a record)."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (str, bool):
        return isinstance(value, hint)
    if origin in (Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is Literal:
        return value in args
    if origin is dict:
        return isinstance(value, dict) and all(_fits(v, args[1]) for v in value.values())
    if origin is tuple:
        return isinstance(value, list | tuple) and all(_fits(v, args[0]) for v in value)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict | hint)
    return True


def _type_name(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


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
