"""Typed events of a sweep as a whole, in the style of :mod:`lora_widgets.events`.

A :class:`~lora_widgets.sweep.runner.Sweep` publishes, in order::

    SweepStarted
      SweepRunStarted(index)   then that run's own events (RunStarted, StepMetrics, ..., RunEnded)
      SweepRunEnded(index)     the run's row of the results table (also a line of sweep.json)
      ...
    SweepEnded

Runs are sequential, so every run event between ``SweepRunStarted(i)`` and ``SweepRunEnded(i)`` belongs to
run ``i``. Each event is a frozen dataclass with a ``kind`` and a JSON-safe ``to_dict``;
:func:`sweep_event_from_dict` reads one back.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal, Union, get_args

from lora_widgets.events.types import _EventBase, _from_json

__all__ = [
    "Outcome",
    "SweepEnded",
    "SweepEvent",
    "SweepRunEnded",
    "SweepRunStarted",
    "SweepStarted",
    "sweep_event_from_dict",
]

Outcome = Literal["finished", "early_stopped", "skipped", "failed"]
"""How a run of a sweep ended: all its steps, stopped early by its rule, skipped by the user, or failed."""


@dataclass(frozen=True)
class SweepStarted(_EventBase):
    """A sweep began. ``resumed``: runs already done in an earlier session with the same fingerprint
    (:mod:`lora_widgets.sweep.fingerprint`), shown again before new ones; ``rerun``: stored runs whose data,
    base model or code differ, or that have no fingerprint, which run again; ``note``: both in words
    (``"resumed 4 of 8 runs from sweeps/x"``), empty when nothing was stored."""

    kind: ClassVar[str] = "sweep_started"
    directory: str
    settings: tuple[str, ...]
    points: int
    seeds: tuple[int, ...]
    planned_runs: int
    halving: dict[str, Any] | None = None
    resumed: int = 0
    rerun: int = 0
    note: str = ""


@dataclass(frozen=True)
class _SweepRun(_EventBase):
    """Which run of the sweep an event is about (the fields a run's start and its row share, in that order)."""

    index: int
    point: int
    settings: dict[str, Any]
    seed: int
    rung: int
    max_steps: int | None

    @property
    def key(self) -> tuple[int, int, int]:
        """(point, seed, rung): the same run in any session of the sweep."""
        return (self.point, self.seed, self.rung)


@dataclass(frozen=True)
class SweepRunStarted(_SweepRun):
    """Run ``index`` (0-based, in the order the sweep runs them) is about to start."""

    kind: ClassVar[str] = "sweep_run_started"
    label: str


@dataclass(frozen=True)
class SweepRunEnded(_SweepRun):
    """Run ``index`` ended: one row of the results table. ``point`` numbers its settings (seeds share it);
    ``reason``: a failure's diagnosis (``oom``, ``nan``, ``bad_input``, ``error``) or an early stop's
    (``patience``, ``diverged``); ``adapter_bytes``: the saved adapter's size on disk (every file of its directory);
    ``trainable_params``: the adapters' parameter count; ``fingerprint``: what the result depended on besides
    the settings (:class:`~lora_widgets.sweep.fingerprint.Fingerprint`'s dict: ``data``, ``model``, ``code``),
    which decides whether a later session may reuse the row."""

    kind: ClassVar[str] = "sweep_run_ended"
    outcome: Outcome
    step: int
    elapsed_s: float
    best_val_loss: float | None
    final_loss: float | None
    message: str
    reason: str = ""
    best_step: int | None = None
    run_dir: str | None = None
    adapter_bytes: int | None = None
    suggestions: tuple[str, ...] = field(default_factory=tuple)
    trainable_params: int | None = None
    fingerprint: dict[str, str] | None = None


@dataclass(frozen=True)
class SweepEnded(_EventBase):
    """The sweep ended: ``state`` finished (every planned run) or stopped; ``best_point``: the settings with
    the lowest mean best validation loss at the highest rung; ``base_unchanged``: the base weights' checksum
    after the sweep equals the one before (``None``: not checked)."""

    kind: ClassVar[str] = "sweep_ended"
    state: Literal["finished", "stopped"]
    runs: int
    best_point: int | None
    elapsed_s: float
    message: str
    base_unchanged: bool | None = None


SweepEvent = Union[SweepStarted, SweepRunStarted, SweepRunEnded, SweepEnded]  # noqa: UP007

_BY_KIND = {cls.kind: cls for cls in get_args(SweepEvent)}


def sweep_event_from_dict(data: dict[str, Any]) -> SweepEvent:
    """Rebuild a sweep event from its ``to_dict``; ``ValueError`` for an unknown kind."""
    cls = _BY_KIND.get(str(data.get("event")))
    if cls is None:
        raise ValueError(
            f"unknown sweep event kind {data.get('event')!r}; expected one of {sorted(_BY_KIND)}"
        )
    names = {f.name for f in fields(cls)}
    kwargs = {k: _from_json(v) for k, v in data.items() if k in names}
    for name in ("settings", "seeds", "suggestions"):
        if name in kwargs and isinstance(kwargs[name], list):
            kwargs[name] = tuple(kwargs[name])
    return cls(**kwargs)
