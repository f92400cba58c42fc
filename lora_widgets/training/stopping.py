"""A run's early stopping in the trainer: the pure rule plus the best evaluation's weights.

:class:`~lora_widgets.training.early_stopping.EarlyStopper` decides; this module keeps a copy of the trained
parameters at the best evaluation (on the CPU: for LoRA a few MB) so that a run stopped early saves the
adapter of its best evaluation, as ``transformers``' ``load_best_model_at_end`` does with
``EarlyStoppingCallback``. One object per run, dropped with it.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_widgets.training.checkpoint import trainable_parameters
from lora_widgets.training.early_stopping import EarlyStopper, EarlyStopping, Verdict

__all__ = ["RunStopping"]


class RunStopping:
    """Feeds the rule (``None``: no early stopping, every method does nothing) and keeps the best weights."""

    def __init__(self, rule: EarlyStopping | None, has_validation: bool = True) -> None:
        self._stopper = EarlyStopper(rule) if rule is not None else None
        self._best: dict[str, torch.Tensor] | None = None  # name -> CPU copy of each trainable parameter
        self.verdict: Verdict | None = None
        self.check_data(has_validation)

    @property
    def enabled(self) -> bool:
        """True when a rule is set."""
        return self._stopper is not None

    def check_data(self, has_validation: bool) -> None:
        """Raise ``ValueError`` when the patience rule has no validation loss to watch."""
        if self._stopper is not None and self._stopper.rule.patience is not None and not has_validation:
            raise ValueError(
                "TrainConfig.early_stopping has patience, which watches the validation loss, but the run has "
                "no validation data; give eval_data or val_fraction > 0, or use "
                "EarlyStopping(patience=None) for the divergence stop alone"
            )

    def on_loss(self, step: int, loss: float) -> bool:
        """A logged training loss; True when the run must stop."""
        if self._stopper is None or self.verdict is not None:
            return self.verdict is not None
        self.verdict = self._stopper.observe_loss(step, loss)
        return self.verdict is not None

    def on_eval(self, step: int, val_loss: float, model: nn.Module) -> bool:
        """(worker thread) An evaluation; copies the weights when it is the best so far. True: stop."""
        if self._stopper is None or self.verdict is not None:
            return self.verdict is not None
        self.verdict = self._stopper.observe_eval(step, val_loss)
        if self._stopper.improved:
            with torch.no_grad():
                self._best = {n: p.detach().to("cpu", copy=True) for n, p in trainable_parameters(model)}
        return self.verdict is not None

    def restore_best(self, model: nn.Module) -> bool:
        """(worker thread) Put the best evaluation's weights back; False when none was kept."""
        if self._best is None:
            return False
        with torch.no_grad():
            for name, param in trainable_parameters(model):
                param.copy_(self._best[name])  # same shape and dtype: copied from this parameter
        return True
