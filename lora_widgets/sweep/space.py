"""What a sweep tries: a grid, a list or a random sample of settings, checked before any run starts.

A *setting* is a field of :class:`~lora_widgets.lora.config.LoRAConfig` (``r``, ``alpha``, ``target_modules``,
...) or of :class:`~lora_widgets.training.config.TrainConfig` (``learning_rate``, ``warmup_steps``, ...), named
as the field (``"r"``) or with its config's prefix (``"lora.r"``, ``"train.learning_rate"``). Seeds are a
separate axis (``Sweep(seeds=...)``) so that results can be averaged over them.

:func:`expand` turns a space into its points (dicts of settings) and :func:`configs_for` builds a point's two
configs, so every value a config refuses is named, with the config's own message, before anything trains.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from lora_widgets.lora.config import LoRAConfig
from lora_widgets.training.config import TrainConfig

__all__ = [
    "Grid",
    "LogUniform",
    "Points",
    "RandomSearch",
    "Space",
    "as_space",
    "configs_for",
    "expand",
    "resolve",
]

_RESERVED = ("output_dir", "seed")
_OTHER_NAMES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lr": "learning_rate",
}
"""What PEFT/transformers call some settings, for the "did you mean" of an unknown name (not accepted as is)."""  # the sweep sets these: its run directories, and the seeds axis


@dataclass(frozen=True)
class LogUniform:
    """Sample ``exp(U(log low, log high))``: the distribution for learning rates (Bergstra & Bengio 2012,
    "Random Search for Hyper-Parameter Optimization", JMLR 13, sec. 2.3, sample scale parameters on a log
    scale)."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not (0 < self.low < self.high and math.isfinite(self.high)):
            raise ValueError(
                f"LogUniform({self.low!r}, {self.high!r}): need 0 < low < high, e.g. (1e-4, 1e-2)"
            )

    def sample(self, rng: random.Random) -> float:
        """One value."""
        return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))


@dataclass(frozen=True)
class Grid:
    """Every combination of the ``axes`` values (the first axis varies slowest)."""

    axes: Mapping[str, Sequence[Any]]


@dataclass(frozen=True)
class Points:
    """Exactly these settings, in order."""

    points: Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class RandomSearch:
    """``n`` points, each setting drawn from a list of choices or a :class:`LogUniform`, from ``seed``."""

    space: Mapping[str, Sequence[Any] | LogUniform]
    n: int
    seed: int = 0


Space = Union[Grid, Points, RandomSearch]  # noqa: UP007 - a runtime alias


def as_space(space: Any) -> Space:
    """A :data:`Space` from a ``Grid``/``Points``/``RandomSearch``, a dict of axes (a grid) or a list of dicts."""
    if isinstance(space, Grid | Points | RandomSearch):
        return space
    if isinstance(space, Mapping):
        return Grid(space)
    if isinstance(space, Sequence) and not isinstance(space, str):
        return Points(space)
    raise TypeError(
        f"space must be a dict of axes (a grid), a list of dicts, Grid, Points or RandomSearch; "
        f"got {type(space).__name__}"
    )


def _values(name: str, values: Any) -> list[Any]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ValueError(f"sweep axis {name!r} must be a list of values, got {values!r}; e.g. {name}=[...]")
    if not values:
        raise ValueError(f"sweep axis {name!r} is empty; give it at least one value")
    return list(values)


def expand(space: Space) -> list[dict[str, Any]]:
    """The points of ``space``, each a dict of settings. Raises ``ValueError`` for an empty space."""
    if isinstance(space, Grid):
        if not space.axes:
            raise ValueError("the sweep's grid is empty; give at least one axis, e.g. {'r': [4, 8]}")
        names = list(space.axes)
        columns = [_values(n, space.axes[n]) for n in names]
        points = [dict(zip(names, combo, strict=True)) for combo in itertools.product(*columns)]
    elif isinstance(space, Points):
        points = [dict(p) for p in space.points]
        if not points:
            raise ValueError("the sweep's list of points is empty; give at least one dict of settings")
    else:
        if not (isinstance(space.n, int) and space.n >= 1):
            raise ValueError(f"RandomSearch.n={space.n!r} must be an integer >= 1")
        if not space.space:
            raise ValueError("the sweep's random space is empty; give at least one setting")
        rng = random.Random(space.seed)
        for name, dist in space.space.items():
            if not isinstance(dist, LogUniform):
                _values(name, dist)
        points = [
            {
                n: d.sample(rng) if isinstance(d, LogUniform) else rng.choice(list(d))
                for n, d in space.space.items()
            }
            for _ in range(space.n)
        ]
    for p in points:
        if not isinstance(p, dict) or not p:
            raise ValueError(f"a sweep point must be a non-empty dict of settings, got {p!r}")
    return [{k: _json_value(v) for k, v in p.items()} for p in points]


def _json_value(value: Any) -> Any:
    """Tuples become lists, so that a point survives sweep.json unchanged."""
    return list(value) if isinstance(value, tuple) else value


def _fields(config: type) -> set[str]:
    return {f.name for f in dataclasses.fields(config)}


def resolve(name: str) -> tuple[type[LoRAConfig] | type[TrainConfig], str]:
    """(the config class, its field) a setting name means; ``ValueError`` naming near matches otherwise."""
    lora, train = _fields(LoRAConfig), _fields(TrainConfig)
    prefix, _, field = name.rpartition(".")
    if prefix in ("lora", "train"):
        config, known = (LoRAConfig, lora) if prefix == "lora" else (TrainConfig, train)
        if field in known and field not in _RESERVED:
            return config, field
    elif not prefix and name in lora | train and name not in _RESERVED:
        if name in lora and name in train:
            raise ValueError(
                f"sweep setting {name!r} is a field of both configs; write 'lora.{name}' or 'train.{name}'"
            )
        return (LoRAConfig, name) if name in lora else (TrainConfig, name)
    if field in _RESERVED or name in _RESERVED:
        why = "use Sweep(seeds=[...])" if "seed" in name else "the sweep gives every run its own directory"
        raise ValueError(f"sweep setting {name!r} is set by the sweep itself: {why}")
    names = sorted((lora | train) - set(_RESERVED))
    other = _OTHER_NAMES.get(field or name)
    close = [other] if other else difflib.get_close_matches(field or name, names, n=3)
    hint = f"; did you mean {close}?" if close else ""
    raise ValueError(
        f"unknown sweep setting {name!r}: no LoRAConfig or TrainConfig field has that name{hint} "
        f"(settings: {names})"
    )


def configs_for(
    point: Mapping[str, Any], lora: LoRAConfig, train: TrainConfig, **train_changes: Any
) -> tuple[LoRAConfig, TrainConfig]:
    """``(lora, train)`` with ``point``'s settings (and ``train_changes``) applied, validated by the configs.

    Raises ``ValueError`` naming the setting, its value and the config's own message.
    """
    changes: dict[type, dict[str, Any]] = {LoRAConfig: {}, TrainConfig: dict(train_changes)}
    for name, value in point.items():
        config, field = resolve(name)
        if config is LoRAConfig and field == "target_modules" and isinstance(value, list):
            value = tuple(value)
        changes[config][field] = value
    try:
        return dataclasses.replace(lora, **changes[LoRAConfig]), dataclasses.replace(
            train, **changes[TrainConfig]
        )
    except (ValueError, TypeError) as exc:
        shown = json.dumps(dict(point), default=str)
        raise ValueError(f"the sweep point {shown} is refused: {exc}") from exc
