"""Early stopping as a pure rule: the caller feeds losses, the rule says when to stop and why.

Two rules, each its own outcome (a run that stops early has done its job; it is not a failure):

- **patience** on the validation loss, with the semantics of ``transformers.EarlyStoppingCallback``
  (``early_stopping_patience``, ``early_stopping_threshold``): an evaluation *improves* when its loss is
  below the best so far by more than ``min_delta``; after ``patience`` evaluations in a row that do not
  improve, the run stops. The best value tracks the lowest loss seen (as the HF trainer's
  ``state.best_metric`` does), so a gain smaller than ``min_delta`` moves the best without resetting the
  count. Stopping when the validation loss stops falling is Prechelt's "early stopping" criterion
  (Prechelt 1998, "Early Stopping - But When?", in *Neural Networks: Tricks of the Trade*, sec. 2.1, the
  ``UP_s`` family: stop after ``s`` successive strips without improvement).
- **divergence**: the training loss is non-finite, or above ``divergence_factor`` times its first logged
  value ("far above its start"); a non-finite validation loss diverges too. A diverged run will not
  recover within a short run (a rate too high for Adam, Kingma & Ba 2015 sec. 2.1), so waiting is wasted
  time.

No clock and no I/O, as :mod:`lora_widgets.training.schedules`: our trainer and the attached HF/TRL callback
(:mod:`lora_widgets.hf.callback`) both feed an :class:`EarlyStopper` and act on its :class:`Verdict`, so
the rule is written once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = ["EarlyStopper", "EarlyStopping", "StopReason", "Verdict"]

StopReason = Literal["patience", "diverged"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


@dataclass(frozen=True)
class EarlyStopping:
    """When to end a run before its last step.

    Args:
        patience: evaluations in a row without improvement before the run stops (>= 1); ``None`` turns the
            patience rule off (divergence alone). Needs validation data and ``TrainConfig.eval_every``.
        min_delta: how much lower than the best so far a validation loss must be to count as an improvement
            (>= 0, in nats; ``transformers``' ``early_stopping_threshold``).
        divergence_factor: stop when the training loss exceeds this multiple of its first logged value or is
            non-finite (> 1; 2.0: a doubled loss, which for a pretrained base means it is heading to
            uniform guessing); ``None`` turns the divergence rule off (a non-finite loss then fails the run).
    """

    patience: int | None = 3
    min_delta: float = 0.0
    divergence_factor: float | None = 2.0

    def __post_init__(self) -> None:
        p, d, f = self.patience, self.min_delta, self.divergence_factor
        if p is not None and not (_is_int(p) and p >= 1):
            raise ValueError(
                f"EarlyStopping.patience={p!r} is invalid: patience must be None (no patience rule) or an "
                "integer >= 1 (evaluations without improvement), e.g. 3"
            )
        if not (_is_num(d) and math.isfinite(d) and d >= 0):
            raise ValueError(
                f"EarlyStopping.min_delta={d!r} is invalid: min_delta must be a finite number >= 0 (nats)"
            )
        if f is not None and not (_is_num(f) and math.isfinite(f) and f > 1):
            raise ValueError(
                f"EarlyStopping.divergence_factor={f!r} is invalid: divergence_factor must be None (no "
                "divergence rule) or a finite number > 1 (a multiple of the first loss), e.g. 2.0"
            )
        if p is None and f is None:
            raise ValueError(
                "EarlyStopping(patience=None, divergence_factor=None) stops nothing; set one of them, or "
                "use early_stopping=None to turn early stopping off"
            )

    def refusal_without_evaluations(self, evaluates: bool, how: str) -> str | None:
        """Why this rule cannot run where nothing is evaluated (``evaluates`` False), or ``None`` if it can.
        Patience counts evaluations, so without them it would never act; ``how`` says how to turn them on
        (``"set eval_every (e.g. 10)"`` for our trainer, the ``TrainingArguments`` for an HF trainer)."""
        if evaluates or self.patience is None:
            return None
        return (f"EarlyStopping(patience={self.patience}) counts evaluations, but this run makes none: {how}, "
                "or use EarlyStopping(patience=None) for the divergence stop alone")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EarlyStopping:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        unknown = sorted(set(data) - {"patience", "min_delta", "divergence_factor"})
        if unknown:
            raise ValueError(f"unknown EarlyStopping field(s) {unknown}")
        return cls(**data)


@dataclass(frozen=True)
class Verdict:
    """Stop now: ``reason``, the ``step`` it was seen at, the best evaluation so far and a sentence."""

    reason: StopReason
    step: int
    best_step: int | None
    best_loss: float | None
    detail: str

    @property
    def message(self) -> str:
        """``"Stopped early at step N, best at step M (...)"``: the outcome as a run's end message says it."""
        best = (
            f", best at step {self.best_step} (validation loss {self.best_loss:.4g})"
            if self.best_step is not None and self.best_loss is not None
            else ""
        )
        return f"Stopped early at step {self.step}{best}: {self.detail}."


class EarlyStopper:
    """The state of the rule during one run: feed :meth:`observe_eval` and :meth:`observe_loss`.

    Each returns a :class:`Verdict` when the run should stop, else ``None``. :attr:`improved` says whether
    the last evaluation set a new best (the caller keeps that step's weights as the best checkpoint).
    """

    def __init__(self, rule: EarlyStopping) -> None:
        if not isinstance(rule, EarlyStopping):
            raise TypeError(f"rule must be an EarlyStopping, got {type(rule).__name__}")
        self.rule = rule
        self.best_loss: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.first_loss: float | None = None
        self.improved = False

    def observe_eval(self, step: int, val_loss: float) -> Verdict | None:
        """One evaluation's loss after ``step`` updates."""
        self.improved = False
        if not math.isfinite(val_loss):
            if self.rule.divergence_factor is None:
                return None
            return self._verdict("diverged", step, f"the validation loss is {val_loss}")
        best = self.best_loss
        if best is None or val_loss < best - self.rule.min_delta:
            self.bad_evals = 0
        else:
            self.bad_evals += 1
        if best is None or val_loss < best:  # the lowest seen, as transformers' state.best_metric
            self.best_loss, self.best_step, self.improved = val_loss, step, True
        patience = self.rule.patience
        if patience is not None and self.bad_evals >= patience:
            delta = f" by more than {self.rule.min_delta:g}" if self.rule.min_delta else ""
            return self._verdict(
                "patience", step, f"the validation loss did not improve{delta} in {patience} evaluations"
            )
        return None

    def observe_loss(self, step: int, loss: float) -> Verdict | None:
        """One logged training loss after ``step`` updates (only the divergence rule reads it)."""
        factor = self.rule.divergence_factor
        if factor is None:
            return None
        if not math.isfinite(loss):
            return self._verdict("diverged", step, f"the training loss is {loss}")
        if self.first_loss is None:
            self.first_loss = loss
            return None
        if self.first_loss > 0 and loss > factor * self.first_loss:
            return self._verdict(
                "diverged",
                step,
                f"the training loss {loss:.4g} is over {factor:g} x its first value {self.first_loss:.4g} "
                "(a lower learning rate usually fixes this)",
            )
        return None

    def _verdict(self, reason: StopReason, step: int, detail: str) -> Verdict:
        return Verdict(reason, step, self.best_step, self.best_loss, detail)
