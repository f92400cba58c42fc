"""A sweep's results: rows per run, a table per setting (mean and spread over seeds), successive halving.

Pure functions of :class:`~lora_widgets.sweep.events.SweepRunEnded` rows, so the headless sweep, a resumed
sweep and the dashboard's sweep view all compute the same table from the same rows.

Successive halving (Jamieson & Talwalkar 2016, "Non-stochastic Best Arm Identification and Hyperparameter
Optimization", AISTATS, Algorithm 1; as a rung schedule in Li et al. 2018/2020, "A System for Massively
Parallel Hyperparameter Tuning" (ASHA), MLSys, sec. 3, Algorithm 1): rung ``k`` trains every surviving setting
for ``min_steps * eta**k`` steps (the last rung for the full ``max_steps``), and the best ``1/eta`` of them,
by mean best validation loss over seeds, go on to the next rung. Runs here are sequential on one model, so
the rungs are synchronous (ASHA's asynchronous promotion matters only with parallel workers), and a promoted
setting is trained again from the start with the larger budget, so that every run's learning-rate schedule
spans the steps it is given.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from lora_widgets.sweep.events import SweepRunEnded

__all__ = ["Halving", "SettingResult", "best_point", "promoted", "table"]


@dataclass(frozen=True)
class Halving:
    """Successive halving: ``eta`` (>= 2) and the first rung's steps ``min_steps`` (>= 1).

    The rungs' budgets are ``min_steps * eta**k`` below the base config's ``max_steps``, then ``max_steps``.
    """

    eta: int = 3
    min_steps: int = 10

    def __post_init__(self) -> None:
        if not (isinstance(self.eta, int) and self.eta >= 2):
            raise ValueError(
                f"Halving.eta={self.eta!r} must be an integer >= 2 (keep the best 1/eta), e.g. 3"
            )
        if not (isinstance(self.min_steps, int) and self.min_steps >= 1):
            raise ValueError(f"Halving.min_steps={self.min_steps!r} must be an integer >= 1, e.g. 10")

    def budgets(self, max_steps: int) -> list[int]:
        """Steps per rung, increasing, the last one ``max_steps``."""
        if self.min_steps >= max_steps:
            raise ValueError(
                f"Halving.min_steps={self.min_steps} must be below the runs' max_steps={max_steps}; "
                "lower min_steps or raise TrainConfig.max_steps"
            )
        out, b = [], self.min_steps
        while b < max_steps:
            out.append(b)
            b *= self.eta
        return [*out, max_steps]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return asdict(self)


@dataclass(frozen=True)
class SettingResult:
    """One setting (``point``) at one ``rung``, over its seeds: the table's row."""

    point: int
    rung: int
    settings: dict[str, Any]
    seeds: int
    ok: int
    mean_best_val: float | None
    std_best_val: float | None
    mean_steps: float
    elapsed_s: float
    adapter_bytes: int | None
    outcomes: tuple[str, ...]
    best_index: int | None  # the run (of these seeds) with the lowest best validation loss

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return asdict(self)


def _score(row: SweepRunEnded) -> float | None:
    v = row.best_val_loss
    return v if v is not None and math.isfinite(v) and row.outcome != "failed" else None


def table(rows: Sequence[SweepRunEnded]) -> list[SettingResult]:
    """One row per (point, rung): mean and sample standard deviation of the best validation loss over the
    seeds that produced one (``std`` is ``None`` with fewer than two), in the order the points first ran."""
    groups: dict[tuple[int, int], list[SweepRunEnded]] = {}
    for r in rows:
        groups.setdefault((r.point, r.rung), []).append(r)
    out = []
    for (point, rung), runs in groups.items():
        scores = [s for s in map(_score, runs) if s is not None]
        best = min((r for r in runs if _score(r) is not None), key=lambda r: _score(r) or 0.0, default=None)
        sizes = [r.adapter_bytes for r in runs if r.adapter_bytes is not None]
        out.append(
            SettingResult(
                point=point,
                rung=rung,
                settings=runs[0].settings,
                seeds=len(runs),
                ok=len(scores),
                mean_best_val=statistics.fmean(scores) if scores else None,
                std_best_val=statistics.stdev(scores) if len(scores) > 1 else None,
                mean_steps=statistics.fmean(r.step for r in runs),
                elapsed_s=sum(r.elapsed_s for r in runs),
                adapter_bytes=max(sizes) if sizes else None,
                outcomes=tuple(r.outcome for r in runs),
                best_index=best.index if best is not None else None,
            )
        )
    return out


def _ranked(rows: Sequence[SweepRunEnded], rung: int) -> list[SettingResult]:
    at = [s for s in table(rows) if s.rung == rung]
    return sorted(at, key=lambda s: (s.mean_best_val is None, s.mean_best_val or 0.0, s.point))


def promoted(rows: Sequence[SweepRunEnded], rung: int, eta: int) -> list[int]:
    """The points that go on from ``rung``: the best ``max(1, n // eta)`` by mean best validation loss
    (settings whose every seed failed never go on), in their original order."""
    ranked = [s for s in _ranked(rows, rung) if s.mean_best_val is not None]
    n = len({r.point for r in rows if r.rung == rung})
    keep = ranked[: max(1, n // eta)]
    return sorted(s.point for s in keep)


def best_point(rows: Sequence[SweepRunEnded]) -> int | None:
    """The setting with the lowest mean best validation loss at the highest rung any setting reached."""
    if not rows:
        return None
    for rung in sorted({r.rung for r in rows}, reverse=True):
        ranked = [s for s in _ranked(rows, rung) if s.mean_best_val is not None]
        if ranked:
            return ranked[0].point
    return None
