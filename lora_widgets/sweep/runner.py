"""``Sweep``: many LoRA runs, one after another on one model, each a normal run with its own directory.

::

    sweep = Sweep(model, tokenizer, "python-docs", space={"r": [4, 8, 16], "learning_rate": [1e-3, 3e-3]},
                  seeds=[0, 1], config=TrainConfig(max_steps=100), directory="sweeps/rank-lr")
    rows = await sweep.run()          # or sweep.run_sync() in a script
    print(sweep.format_table())

Each run is our :class:`~lora_widgets.training.trainer.LoRATrainer` with the point's settings: it applies fresh
adapters (replacing the previous run's), writes its own run directory under ``<directory>/runs`` and publishes
its own events; the sweep forwards them between its own (:mod:`lora_widgets.sweep.events`). The base weights
are never trained (adapters only); after the sweep the adapters are removed and, with ``check_base``, a
checksum of every base tensor is compared with the one taken before (``SweepEnded.base_unchanged``).

Everything a config would refuse is refused in the constructor, before any run: an empty space, an unknown
setting, a bad value. A run that fails (out of memory, NaN, a bad combination the configs cannot see) is a
row with its diagnosis, and the sweep goes on. ``stop()`` ends the sweep after the run in progress stops (that
run is not recorded: a resumed sweep runs it again); ``skip()`` ends only the run in progress (recorded as
skipped). Every finished run is saved in ``<directory>/sweep.json`` at once, so a killed sweep resumes.

A stored run is reused only when its fingerprint (:mod:`lora_widgets.sweep.fingerprint`: the prepared data, the
base model's weights, the package code) equals the sweep's, computed when :meth:`Sweep.run` starts; the others
run again. What was reused and what runs again is said in ``SweepStarted.note`` (``"resumed 4 of 8 runs from
sweeps/x"``), in ``Sweep.note``, at the top of :meth:`Sweep.format_table` and in ``SweepEnded.message``.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_widgets.data.sources import require_train_data
from lora_widgets.events.source import Steerable
from lora_widgets.events.types import (
    Event,
    RunEarlyStopped,
    RunEnded,
    RunFailed,
    RunFinished,
    RunStopped,
)
from lora_widgets.lora import has_lora, lora_layers, remove_lora
from lora_widgets.lora.config import LoRAConfig
from lora_widgets.sweep.events import (
    Outcome,
    SweepEnded,
    SweepEvent,
    SweepRunEnded,
    SweepRunStarted,
    SweepStarted,
)
from lora_widgets.sweep.fingerprint import (
    Fingerprint,
    code_fingerprint,
    data_fingerprint,
    model_fingerprint,
    resume_note,
)
from lora_widgets.sweep.results import Halving, SettingResult, best_point, promoted, table
from lora_widgets.sweep.space import Space, as_space, configs_for, expand, resolve
from lora_widgets.sweep.store import SweepStore
from lora_widgets.training import ownership
from lora_widgets.training.config import TrainConfig
from lora_widgets.training.diagnosis import format_lr

__all__ = ["Sweep", "base_checksum"]

_DATA_SETTINGS = ("block_size", "val_fraction", "max_length", "train_on")  # settings that change the data


def base_checksum(model: nn.Module) -> str:
    """SHA-256 of every tensor of ``model.state_dict()`` (names, dtypes, shapes and bytes), in order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # [numel * element size] bytes
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(raw.numpy().tobytes())
    return h.hexdigest()


def _seeds(seeds: Any) -> tuple[int, ...]:
    if isinstance(seeds, int):
        seeds = [seeds]
    out = tuple(seeds) if isinstance(seeds, Sequence) and not isinstance(seeds, str) else ()
    if not out or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in out):
        raise ValueError(f"seeds={seeds!r} must be a non-empty list of integers >= 0, e.g. [0, 1]")
    if len(set(out)) != len(out):
        raise ValueError(f"seeds={list(out)} repeats a seed; each seed runs once per setting")
    return out


def _adapter_bytes(path: str | None) -> int | None:
    if path is None or not Path(path).is_dir():
        return None
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _outcome(end: RunEnded) -> tuple[Outcome, str]:
    if isinstance(end, RunFailed):
        return "failed", end.reason
    if isinstance(end, RunEarlyStopped):
        return "early_stopped", end.reason
    if isinstance(end, RunFinished):
        return "finished", ""
    return "skipped", ""


class Sweep(Steerable):
    """Run every point of ``space`` for every seed, sequentially on ``model`` (see the module docstring).

    The steering is a run's (:class:`~lora_widgets.events.source.Steerable`: subscribers, ``running``, stop /
    pause / resume, the cancel shield): each request goes on to the run in progress, a pause asked for between
    runs holds the next one, and a stop ends the sweep after the run in progress.

    Args:
        model: the base model, without adapters (the sweep adds and removes its own).
        tokenizer: as for :class:`~lora_widgets.training.trainer.LoRATrainer`.
        train_data: as for the ``LoRATrainer``.
        eval_data: as for the ``LoRATrainer``.
        space: a dict of axes (a grid), a list of dicts, or a :class:`~lora_widgets.sweep.space.Grid`,
            :class:`~lora_widgets.sweep.space.Points`, :class:`~lora_widgets.sweep.space.RandomSearch`; keys
            are ``LoRAConfig``/``TrainConfig`` field names (``"lora.r"``, ``"train.learning_rate"`` also work).
        seeds: the seeds every point runs with (results are averaged over them).
        lora: the LoRA settings a point does not change (default ``LoRAConfig()``).
        config: the training settings a point does not change (default ``TrainConfig()``).
        halving: successive halving (:class:`~lora_widgets.sweep.results.Halving`), or ``None`` (every point
            runs ``config.max_steps``).
        directory: where ``sweep.json`` and the runs' directories go; a sweep.json of the same plan resumes:
            its runs are read back into ``rows`` now, and when :meth:`run` starts those whose fingerprint differs
            from this sweep's (other data, base weights or code; none stored) are dropped and run again.
        check_base: checksum the base weights before and after (one pass over them).

    Raises:
        ValueError: naming an empty space, an unknown setting, a value a config refuses, bad seeds, a model that
            already has adapters, or a directory that holds another sweep. Bad data raises from :meth:`run`,
            before any run: the data is prepared once (with ``config``'s seed) so that every run validates on
            the same blocks, unless a data setting (``block_size``, ``val_fraction``, ...) is swept (then it
            is prepared as the first point's first run prepares it, to be fingerprinted, and each run prepares
            its own).
    """

    owner = "Sweep"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        train_data: Any = None,
        eval_data: Any = None,
        *,
        space: Space | dict[str, Sequence[Any]] | Sequence[dict[str, Any]],
        seeds: Sequence[int] | int = (42,),
        lora: LoRAConfig | None = None,
        config: TrainConfig | None = None,
        halving: Halving | None = None,
        directory: str | Path = "sweeps/sweep",
        check_base: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if has_lora(model):
            raise ValueError(
                "the model already has LoRA adapters; a sweep trains its own on the base model: pass the model "
                "without adapters (lora_widgets.remove_lora(model), or load it again)"
            )
        require_train_data(train_data)
        self.model, self.tokenizer, self.train_data, self.eval_data = model, tokenizer, train_data, eval_data
        self.lora = LoRAConfig() if lora is None else lora
        self.config = TrainConfig() if config is None else config
        self.seeds = _seeds(seeds)
        self.points = expand(as_space(space))
        self.halving = halving
        self.directory = Path(directory)
        self.check_base = check_base
        self.budgets = self._budgets()
        for point in self.points:  # every run's configs, before any run: a bad value is named now
            for b in self.budgets:
                configs_for(point, self.lora, self.config, **self._changes(self.seeds[0], b))
        self.settings = tuple(dict.fromkeys(k for p in self.points for k in p))
        self._store = SweepStore(self.directory, self._plan())
        self.rows: list[SweepRunEnded] = self._store.load()
        self._trainer: Any = None  # the run in progress, which every request is forwarded to
        self._skip = False
        self._data: tuple[Any, Any] = (train_data, eval_data)
        self._fingerprint: Fingerprint | None = None  # computed when run() starts
        self._stale = 0
        self.note = ""
        """What this sweep took from its directory when it last started (``"resumed 4 of 8 runs from ..."``)."""
        self.trainer_factory: Callable[..., Any] | None = None  # a stand-in class (tests, benchmarks)

    # -- public API ------------------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for every sweep event (:mod:`lora_widgets.sweep.events`) and every run's
        events, in order, on the loop's thread; returns an unsubscribe function."""
        return super().subscribe(callback)

    @property
    def planned_runs(self) -> int:
        """Runs of the first rung (all of them without halving)."""
        return len(self.points) * len(self.seeds)

    def results(self) -> list[SettingResult]:
        """The table: one row per setting and rung, mean and spread of the best validation loss over seeds."""
        return table(self.rows)

    def best(self) -> dict[str, Any] | None:
        """The settings with the lowest mean best validation loss (at the highest rung), or ``None``."""
        p = best_point(self.rows)
        return None if p is None else dict(self.points[p])

    def format_table(self) -> str:
        """The table as aligned text, best first (failed settings last); above it :attr:`note`, if any."""
        rows = sorted(
            self.results(), key=lambda s: (-s.rung, s.mean_best_val is None, s.mean_best_val or 0.0)
        )
        lines = [self.note] if self.note else []
        lines += [f"{'settings':<44} {'rung':>4} {'best val loss':>16} {'steps':>6} {'time s':>7}  outcomes"]
        for s in rows:
            shown = ", ".join(
                f"{k}={format_lr(v) if k.endswith('learning_rate') else v}" for k, v in s.settings.items()
            )
            val = "-" if s.mean_best_val is None else f"{s.mean_best_val:.4f}"
            if s.std_best_val is not None:
                val += f" ± {s.std_best_val:.4f}"
            lines.append(
                f"{shown:<44} {s.rung:>4} {val:>16} {s.mean_steps:>6.0f} {s.elapsed_s:>7.1f}  {','.join(s.outcomes)}"
            )
        return "\n".join(lines)

    def stop(self) -> None:
        """End the sweep: the run in progress stops after its step and is not recorded. Safe from any thread."""
        super().stop()

    def skip(self) -> None:
        """End the run in progress (recorded as skipped, a pause released); the sweep goes on with the next one."""
        trainer = self._trainer
        if trainer is not None:
            self._skip = True
            self._requests.resume()
            trainer.stop()

    def _forward_request(self, request: str) -> None:
        """Stop, pause and resume go on to the run in progress (a pause between runs holds the next one)."""
        trainer = self._trainer
        if trainer is not None:
            getattr(trainer, request)()

    def run_sync(self) -> list[SweepRunEnded]:
        """Run the sweep from a script (blocks). In a notebook use ``await sweep.run()``."""
        return asyncio.run(self.run())

    async def run(self) -> list[SweepRunEnded]:
        """Run what is left of the sweep; returns every row (earlier sessions' included).

        Raises ``RuntimeError`` if this sweep is already running, or another run is training the model now.
        """
        self._begin_run("this sweep is already running; sweep.stop() it or await the first run()")
        t0 = time.monotonic()
        try:
            ownership.refuse_if_training(
                self.model
            )  # not one failed row per point: refused once, before any run
            self._data, fingerprint = await self._in_thread(self._prepare)  # bad data raises here
            self._fingerprint = fingerprint
            self._reuse_current(fingerprint)
            before = await self._in_thread(base_checksum, self.model) if self.check_base else None
        except BaseException:
            self._end_run()
            raise
        stopped = True
        try:
            self._publish(self._started())
            for row in self.rows:  # a resumed sweep's table fills in at once
                self._publish(row)
            stopped = await self._rungs()
        finally:
            if lora_layers(self.model):
                remove_lora(self.model)
            after = await asyncio.to_thread(base_checksum, self.model) if before is not None else None
            self._trainer = None
            self._end_run()
            self._publish(self._ended(stopped, before, after, time.monotonic() - t0))
        return list(self.rows)

    # -- the sweep, rung by rung -------------------------------------------------------------------------

    async def _rungs(self) -> bool:
        """Every rung's runs; True when stopped."""
        done = {r.key for r in self.rows}
        points = list(range(len(self.points)))
        for rung, budget in enumerate(self.budgets):
            for p in points:
                for seed in self.seeds:
                    if (p, seed, rung) in done:
                        continue
                    await self._wait_while_paused()  # a pause asked for between runs holds the next one
                    if self._requests.stop_requested:
                        return True
                    row = await self._one(p, seed, rung, budget)
                    if row is None:
                        return True
                    self._store.add(row)
                    self.rows = list(self._store.rows)
                    self._publish(row)
            if self.halving is not None and rung + 1 < len(self.budgets):
                points = promoted(self.rows, rung, self.halving.eta)
        return self._requests.stop_requested

    async def _one(self, p: int, seed: int, rung: int, budget: int | None) -> SweepRunEnded | None:
        """Run one point with one seed; its row, or ``None`` when the sweep was stopped during it."""
        point = self.points[p]
        index = max((r.index for r in self.rows), default=-1) + 1
        lora, train = configs_for(point, self.lora, self.config, **self._changes(seed, budget))
        label = ", ".join(f"{k}={v}" for k, v in point.items()) + f", seed={seed}"
        self._publish(SweepRunStarted(index, p, point, seed, rung, train.max_steps, label))
        row: dict[str, Any] = {"index": index, "point": p, "settings": point, "seed": seed, "rung": rung,
                               "max_steps": train.max_steps}  # fmt: skip
        try:
            trainer = self._factory()(self.model, self.tokenizer, *self._data, lora=lora, config=train)
        except (ValueError, TypeError, RuntimeError) as exc:  # a combination no config can check alone
            reason = "bad_input" if isinstance(exc, ValueError | TypeError) else "error"
            msg = f"The run could not start: {exc}"
            return SweepRunEnded(**row, outcome="failed", step=0, elapsed_s=0.0, best_val_loss=None,
                                 final_loss=None, message=msg, reason=reason)  # fmt: skip
        self._trainer, self._skip = trainer, False
        unsubscribe = trainer.subscribe(self._subscribers.deliver)
        try:
            if self._requests.stop_requested:
                return None
            end = await trainer.run()
        finally:
            unsubscribe()
            self._trainer = None
        if isinstance(end, RunStopped) and not self._skip:
            return None  # stopped with the sweep: not recorded, so a resumed sweep runs it again
        outcome, reason = _outcome(end)
        return SweepRunEnded(
            **row, outcome=outcome, step=end.step, elapsed_s=end.elapsed_s, best_val_loss=end.best_val_loss,
            final_loss=end.final_loss, message=end.message, reason=reason,
            best_step=end.best_step if isinstance(end, RunEarlyStopped) else None,
            run_dir=str(getattr(trainer, "run_dir", None) or "") or None,
            adapter_bytes=_adapter_bytes(end.adapter_path),
            suggestions=end.suggestions if isinstance(end, RunFailed) else (),
            trainable_params=getattr(getattr(trainer, "report", None), "trainable_params", None),
            fingerprint=self._fingerprint.to_dict() if self._fingerprint is not None else None,
        )  # fmt: skip

    # -- helpers -----------------------------------------------------------------------------------------

    def _factory(self) -> Callable[..., Any]:
        if self.trainer_factory is not None:
            return self.trainer_factory
        from lora_widgets.training.trainer import LoRATrainer

        return LoRATrainer

    def _prepare(self) -> tuple[tuple[Any, Any], Fingerprint]:
        """The data every run trains and validates on, and the sweep's fingerprint. The data is prepared once,
        so that every run (every seed) is validated on the same held-out blocks: without ``eval_data`` the
        validation share would otherwise be drawn from each run's seed. With ``eval_data``, or when a data
        setting (``block_size``, ...) is swept, each run prepares its own and the preparation here (as the
        first point's first run makes it) only feeds the fingerprint."""
        from lora_widgets.training.batches import load_run_data

        swept = any(resolve(n)[1] in _DATA_SETTINGS for n in self.settings)
        config = self.config
        if swept:
            config = configs_for(
                self.points[0], self.lora, self.config, **self._changes(self.seeds[0], None)
            )[1]
        prepared = load_run_data(self.train_data, self.eval_data, self.tokenizer, config)
        fingerprint = Fingerprint(
            data_fingerprint(prepared.train, prepared.val), model_fingerprint(self.model), code_fingerprint()
        )
        if self.eval_data is not None or swept:
            return (self.train_data, self.eval_data), fingerprint
        # a RunData (train, val, how it was split) passes through each run's LoRATrainer as it is
        return (prepared, None), fingerprint

    def _reuse_current(self, fingerprint: Fingerprint) -> None:
        """Keep the stored runs this fingerprint may reuse (the rule: ``fingerprint.stale_parts``), and say it."""
        stale = self._store.keep_current(fingerprint)
        self.rows, self._stale = list(self._store.rows), len(stale)
        self.note = resume_note(len(self.rows), self._total_runs(), str(self.directory), stale)

    def _total_runs(self) -> int:
        """Every rung's runs (with halving the most there can be: settings whose every seed fails stop early)."""
        total, n = 0, len(self.points)
        for _ in self.budgets:
            total += n * len(self.seeds)
            n = max(1, n // self.halving.eta) if self.halving is not None else n
        return total

    def _budgets(self) -> list[int | None]:
        if self.halving is None:
            return [None]
        if not isinstance(self.halving, Halving):
            raise TypeError(f"halving must be a Halving or None, got {type(self.halving).__name__}")
        if self.config.max_steps is None:
            raise ValueError(
                "successive halving needs TrainConfig.max_steps (the last rung's budget), not None"
            )
        if any("max_steps" in p for p in self.points):
            raise ValueError(
                "with halving the sweep sets max_steps per rung; remove 'max_steps' from the space"
            )
        return list(self.halving.budgets(self.config.max_steps))

    def _changes(self, seed: int, budget: int | None) -> dict[str, Any]:
        changes: dict[str, Any] = {"seed": seed, "output_dir": str(self.directory / "runs")}
        if budget is not None:
            changes["max_steps"] = budget
        return changes

    def _plan(self) -> dict[str, Any]:
        train = self.config.to_dict()
        train.pop("output_dir")
        return {"points": self.points, "seeds": list(self.seeds), "lora": self.lora.to_dict(), "train": train,
                "halving": self.halving.to_dict() if self.halving is not None else None}  # fmt: skip

    def _started(self) -> SweepStarted:
        halving = self.halving.to_dict() | {"budgets": self.budgets} if self.halving is not None else None
        return SweepStarted(str(self.directory), self.settings, len(self.points), self.seeds, self.planned_runs,
                            halving, resumed=len(self.rows), rerun=self._stale, note=self.note)  # fmt: skip

    def _ended(self, stopped: bool, before: str | None, after: str | None, elapsed: float) -> SweepEnded:
        best = best_point(self.rows)
        unchanged = None if before is None else before == after
        what = "stopped" if stopped else "finished"
        shown = f"; best: {self.points[best]}" if best is not None else ""
        check = (
            ""
            if unchanged is None
            else ("; base weights unchanged" if unchanged else "; BASE WEIGHTS CHANGED")
        )
        note = f" ({self.note})" if self.note else ""
        message = f"Sweep {what} after {len(self.rows)} runs in {elapsed:.1f} s{note}{shown}{check}."
        return SweepEnded(
            "stopped" if stopped else "finished", len(self.rows), best, elapsed, message, unchanged
        )

    def _publish(self, event: Event | SweepEvent) -> None:
        super()._publish(event)  # type: ignore[arg-type]
