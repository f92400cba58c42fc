"""Is it training? Alerts that name the evidence (with its numbers) and the fix.

The notebook this project grew from trained for minutes with LoRA layers that the forward pass never called:
the loss moved by noise and nothing said so. Each function below looks at one kind of evidence and returns an
:class:`AlertRaised` or ``None``; they are pure, so a script, a test or the dashboard can call them directly.
:class:`AlertMonitor` feeds them from a run's event stream (``AdapterStats``, ``EvalMetrics``, ``StepMetrics``,
``RunStarted``) and reports each alert once.

=====================  ==========================================================================================
key                    evidence
=====================  ==========================================================================================
``no_gradient``        after the first ``backward()``, trainable parameters (any module) have no gradient
``b_zero``             B is still exactly zero after :data:`B_ZERO_AFTER` updates, although gradients arrive
``no_trained_tokens``  a batch in which every label is ``-100``: nothing is trained
``val_flat``           validation loss has not improved by ``tolerance`` for ``window`` evaluations
``val_rising``         ... and the latest loss is above the best by more than ``tolerance``: overfitting
``lr_too_low``         the last update moved the adapted weights by less than :data:`UPDATE_RATIO_LOW` of their norm
``lr_too_high``        ... or by more than :data:`UPDATE_RATIO_HIGH`
=====================  ==========================================================================================

Where the evidence comes from, in a training loop (gradients exist only between ``backward()`` and
``zero_grad()``, so the statistics are taken there, on the first update and at every evaluation)::

    monitor = AlertMonitor(peak_learning_rate=config.learning_rate)
    loss.backward(); clip_grad_norm_(params, max_norm)
    if step == 1: alerts = monitor.check_gradients(gradient_report(model), step)
    snap = snapshot_adapters(model) if measure else None       # measure: step == 1 or an evaluation step
    optimizer.step()
    if measure:
        publish(adapter_stats(model, step, before=snap, after_backward=True, learning_rate=lr))
    optimizer.zero_grad(set_to_none=True)
    ...
    for event in published_events: alerts = monitor.feed(event)   # new alerts only, each once per run
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch

from lora_widgets.events.types import AdapterStats, AlertRaised, EvalMetrics, Event, RunStarted, StepMetrics
from lora_widgets.health.gradient_check import GradientReport, fix_steps

__all__ = [
    "B_ZERO_AFTER",
    "UPDATE_RATIO_HIGH",
    "UPDATE_RATIO_LOW",
    "VAL_TOLERANCE",
    "VAL_WINDOW",
    "AlertMonitor",
    "b_zero_alert",
    "count_trained_tokens",
    "no_gradient_alert",
    "no_trained_tokens_alert",
    "update_ratio_alert",
    "val_loss_alert",
]

UPDATE_RATIO_LOW = 5e-5
UPDATE_RATIO_HIGH = 5e-2
"""Thresholds on the median over layers of ``update_ratio`` = ``||dW_t - dW_(t-1)||_F / ||W||_F``, the size of one
optimizer step on the effective weight, read while the learning rate is at least half its peak.

Where they come from. Karpathy's rule of thumb (CS231n notes, "Neural Networks Part 3", *Ratio of
weights:updates*) is that one step should change a weight by about 1e-3 of its magnitude: much less and the rate
is probably too low, much more and it is probably too high. It is a heuristic for networks whose weights all train,
not a law; for LoRA we measured the quantity on the shipped model (one seed; r=8, alpha=16, all linear layers, batch
8 x 128, AdamW, 10 warm-up steps then cosine, 200 steps; median over the 28 layers at step 50; change of
validation loss after 200 steps)::

    lr      1e-5     1e-4     1e-3     3e-3 (default)  1e-2     3e-2     1e-1
    ratio   1.7e-5   1.9e-4   2.2e-3   6.4e-3          2.5e-2   9.9e-2   1.2e-1 (1.3 at step 20)
    val     -0.2%    -3.0%    -13.7%   -18.5%          -21.7%   -6.0%    +44% (diverged)

Healthy runs sit at 2e-3 .. 3e-2. Under Adam each element of B moves by about the learning rate per step
while B is small, so the ratio is about ``lr * scaling * sqrt(r / 3) / (sigma_W * sqrt(d_in))`` (A drawn
Kaiming-uniform, W with element std sigma_W): proportional to the rate, smaller for wider layers. Checked on a
SmolLM2-135M-shaped Llama (d=576, freshly initialised, sigma_W=0.02) at lr 2e-4: predicted 1.36e-3, measured
1.36e-3; trained weights are usually larger than initial ones, which lowers it. The thresholds leave a wide margin
on both sides: below 5e-5 the run hardly moves (lr 1e-5 above); above 5e-2 it learned less or diverged.
"""

B_ZERO_AFTER = 2
"""Updates after which B may no longer be exactly zero: with a warm-up the first update uses rate 0 (as in
transformers), but any later update with a rate > 0 and a non-zero gradient changes every element of B under Adam."""

VAL_WINDOW = 3
VAL_TOLERANCE = 0.005
"""Validation loss counts as improved only when it beats the best so far by more than 0.5% (relative); after
3 evaluations without such an improvement it is flat (or rising, if the latest is 0.5% above the best)."""


def _names(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def no_gradient_alert(report: GradientReport, step: int) -> AlertRaised | None:
    """Trainable parameters that received no gradient in update ``step``, whatever module holds them (this
    package's LoRA layers, PEFT's, a user's own, any trainable tensor): named and grouped by module pattern
    (:mod:`lora_widgets.health.gradient_check`). Read ``report`` between ``backward()`` and ``zero_grad()``.

    Causes seen in the field: a LoRA layer that was created but is not in the forward pass (the seed notebook
    attached it as an attribute and never called it); gradient checkpointing with re-entrant checkpoints and
    frozen embeddings, where no checkpoint input requires grad (transformers#26221, peft#1142); an output
    detached from the graph.
    """
    if not report.missing:
        return None
    fix = " ".join(f"{advice}." for advice in fix_steps(report))
    return AlertRaised("no_gradient", report.title(), report.evidence(step), fix, step, "danger")


def b_zero_alert(stats: AdapterStats, after: int = B_ZERO_AFTER) -> AlertRaised | None:
    """B still exactly zero after ``after`` updates (LoRA starts from B = 0, so the adapter still computes
    nothing). Layers without a gradient are left to :func:`no_gradient_alert` (read from the gradients
    themselves, not from these statistics): here gradients arrive but the
    optimizer does not apply them (learning rate 0, the adapters not in the optimizer, every update skipped)."""
    if stats.step < after:
        return None
    zero = [
        x.name
        for x in stats.layers
        if x.b_norm == 0.0 and (not stats.after_backward or x.a_grad_norm or x.b_grad_norm)
    ]
    if not zero:
        return None
    lr = f" (learning rate {stats.learning_rate:.3g})" if stats.learning_rate is not None else ""
    return AlertRaised(
        "b_zero",
        "The adapters have not changed: B is still zero",
        f"After {stats.step} optimizer updates{lr}, lora_B of {len(zero)} of {len(stats.layers)} layers is exactly "
        f"zero ({_names(zero)}), so scaling * B A = 0 and the model still computes the base model.",
        "Check that the optimizer holds the adapter parameters (build it after apply_lora, from the parameters "
        "with requires_grad), that the learning rate is > 0 after warm-up, and that updates are not all skipped "
        "(fp16 overflow, NaN gradients).",
        stats.step,
        "danger",
    )


def count_trained_tokens(labels: torch.Tensor, ignore_index: int = -100) -> tuple[int, int]:
    """(trained, predicted) token counts of ``labels`` [B, T] in the Hugging Face convention: same length as
    ``input_ids``, the model shifts them, so position 0 of each row is never a target."""
    if labels.dim() != 2:
        raise ValueError(f"labels must be [batch, seq], got shape {tuple(labels.shape)}")
    targets = labels[:, 1:]  # [B, T-1]
    return int((targets != ignore_index).sum()), int(targets.numel())


def no_trained_tokens_alert(trained: int, predicted: int, step: int | None = None) -> AlertRaised | None:
    """A batch with ``predicted`` target positions of which ``trained`` are not masked: alert when none is."""
    if trained > 0:
        return None
    return AlertRaised(
        "no_trained_tokens",
        "Nothing is trained: every label is masked",
        f"A batch{'' if step is None else f' at step {step}'} has {predicted} target positions and all of them are "
        "-100 (ignored), so its loss is 0 or NaN and its gradient zero.",
        "Check the loss mask: for prompt/completion data the completion must survive truncation (raise "
        "max_length or shorten prompts); with a chat template, the assistant turns must be found (a template "
        "that does not match marks nothing); train_on='all' trains every token.",
        step,
        "danger",
    )


def val_loss_alert(
    evals: Sequence[tuple[int, float]], window: int = VAL_WINDOW, tolerance: float = VAL_TOLERANCE
) -> AlertRaised | None:
    """Validation loss flat or rising: no evaluation of the last ``window`` beat the best before them by more
    than ``tolerance`` (relative). ``evals``: (step, val_loss) in order. Rising: the latest is above the best by
    more than ``tolerance``."""
    if window < 1 or not tolerance >= 0:
        raise ValueError(
            f"window must be >= 1 and tolerance >= 0, got window={window!r}, tolerance={tolerance!r}"
        )
    finite = [(s, v) for s, v in evals if math.isfinite(v)]
    if len(finite) <= window:
        return None
    best_i = 0
    for i, (_, v) in enumerate(finite):
        if v < finite[best_i][1] * (1 - tolerance):
            best_i = i
    if len(finite) - 1 - best_i < window:
        return None
    (best_step, best), (step, last) = finite[best_i], finite[-1]
    seen = f"over the last {window} evaluations (steps {finite[-window][0]}-{step})"
    if last > best * (1 + tolerance):
        return AlertRaised(
            "val_rising",
            "Validation loss is rising: overfitting",
            f"Validation loss {last:.4f} at step {step} is {100 * (last / best - 1):.1f}% above its best, {best:.4f} "
            f"at step {best_step}, and has not improved by more than {100 * tolerance:.1f}% {seen}.",
            f"Keep the adapter of step {best_step} (checkpoint) or stop earlier; train fewer steps or epochs, on more "
            "data, with a lower learning rate or more LoRA dropout.",
            step,
        )
    start = "since the first evaluation" if best_i == 0 else f"since step {best_step}"
    return AlertRaised(
        "val_flat",
        "Validation loss is flat",
        f"Validation loss {last:.4f} at step {step} has not improved by more than {100 * tolerance:.1f}% {start} "
        f"(best {best:.4f}), {seen}.",
        "If it never improved, check the other alerts (no gradient, B zero) and raise the learning rate; if it "
        "improved and stalled, the run has converged for this rank and data: stop, or add data or rank.",
        step,
    )


def update_ratio_alert(
    stats: AdapterStats, low: float = UPDATE_RATIO_LOW, high: float = UPDATE_RATIO_HIGH
) -> AlertRaised | None:
    """Median ``update_ratio`` over layers below ``low`` (learning rate likely too low) or above ``high`` (likely
    too high); thresholds and the measurements behind them: :data:`UPDATE_RATIO_LOW`. Needs stats taken with a
    snapshot (``adapter_stats(..., before=...)``); call it only while the rate is near its peak (the monitor
    does so), since a schedule's warm-up and decay shrink every step by design. Layers that got no gradient are
    left out (:func:`no_gradient_alert` speaks for them)."""
    ratios = [
        x.update_ratio
        for x in stats.layers
        if x.update_ratio is not None
        and math.isfinite(x.update_ratio)
        and not (
            stats.after_backward and not (x.a_grad_norm or x.b_grad_norm)
        )  # no gradient: not the rate's fault
    ]
    if not ratios:
        return None
    median = statistics.median(ratios)
    lr = f" at learning rate {stats.learning_rate:.3g}" if stats.learning_rate is not None else ""
    measured = (
        f"One optimizer step{lr} (step {stats.step}) changed the adapted weights by a median {median:.1e} of "
        f"their norm (||dW_t - dW_(t-1)|| / ||W|| over {len(ratios)} layers; range {min(ratios):.1e}-{max(ratios):.1e})"
    )
    if median < low:
        return AlertRaised(
            "lr_too_low",
            "Updates are tiny: the learning rate is likely too low",
            f"{measured}, below {low:.0e}. Healthy LoRA runs of the shipped model step 2e-3 .. 3e-2; Karpathy's "
            "rule of thumb for weights is about 1e-3 per step.",
            "Raise the learning rate about tenfold (LoRA usually trains at 1e-4 .. 3e-3, higher than full "
            "fine-tuning), or raise LoRA alpha (the update scales with alpha / r).",
            stats.step,
        )
    if median > high:
        return AlertRaised(
            "lr_too_high",
            "Updates are huge: the learning rate is likely too high",
            f"{measured}, above {high:.0e}. Healthy LoRA runs of the shipped model step 2e-3 .. 3e-2; Karpathy's "
            "rule of thumb for weights is about 1e-3 per step.",
            "Lower the learning rate three- to tenfold, keep gradient clipping on (max_grad_norm=1.0), use a "
            "warm-up; with a large rank, rsLoRA scaling (use_rslora=True) or a smaller alpha.",
            stats.step,
        )
    return None


class AlertMonitor:
    """Feed it a run's events; it returns each alert once, when first seen. A ``RunStarted`` starts afresh.

    Reads ``AdapterStats`` (B zero, update size), ``EvalMetrics`` (flat or rising validation loss)
    and ``StepMetrics`` (the learning rate, to know its peak); :meth:`check_labels` takes a batch's labels and
    :meth:`check_gradients` a :class:`~lora_widgets.health.gradient_check.GradientReport` read after ``backward()``. The
    update-size rule runs only while the learning rate is at least half its peak (``peak_learning_rate``, else
    the ``learning_rate`` of ``RunStarted.config``, else the largest rate seen so far).
    """

    def __init__(
        self,
        peak_learning_rate: float | None = None,
        *,
        val_window: int = VAL_WINDOW,
        val_tolerance: float = VAL_TOLERANCE,
        ratio_low: float = UPDATE_RATIO_LOW,
        ratio_high: float = UPDATE_RATIO_HIGH,
    ) -> None:
        if peak_learning_rate is not None and not peak_learning_rate > 0:
            raise ValueError(f"peak_learning_rate must be > 0 or None, got {peak_learning_rate!r}")
        if not 0 < ratio_low < ratio_high:
            raise ValueError(f"need 0 < ratio_low < ratio_high, got {ratio_low!r} and {ratio_high!r}")
        val_loss_alert([], val_window, val_tolerance)  # validates window and tolerance
        self._given_peak = peak_learning_rate
        self._settings = (val_window, val_tolerance, ratio_low, ratio_high)
        self.alerts: list[AlertRaised] = []
        self._reset()

    def _reset(self) -> None:
        self.alerts = []
        self._keys: set[str] = set()
        self._evals: list[tuple[int, float]] = []
        self._peak = self._given_peak
        self._max_lr = 0.0

    def _new(self, candidates: Sequence[AlertRaised | None]) -> list[AlertRaised]:
        fresh = [a for a in candidates if a is not None and a.key not in self._keys]
        for a in fresh:
            self._keys.add(a.key)
        self.alerts.extend(fresh)
        return fresh

    def _lr_near_peak(self, lr: float | None) -> bool:
        if lr is None:
            return True  # unknown rate: trust the caller
        peak = self._peak if self._peak is not None else self._max_lr
        return lr > 0 and lr >= 0.5 * peak

    def feed(self, event: Event) -> list[AlertRaised]:
        """Take one event; return the alerts it raised that were not raised before in this run."""
        if isinstance(event, RunStarted):
            self._reset()
            lr = event.config.get("learning_rate")
            if self._peak is None and isinstance(lr, int | float) and lr > 0:
                self._peak = float(lr)
            return []
        if isinstance(event, StepMetrics):
            self._max_lr = max(self._max_lr, event.learning_rate)
            return []
        if isinstance(event, EvalMetrics):
            self._evals.append((event.step, event.val_loss))
            return self._new([val_loss_alert(self._evals, self._settings[0], self._settings[1])])
        if isinstance(event, AdapterStats):
            if event.learning_rate is not None:
                self._max_lr = max(self._max_lr, event.learning_rate)
            found = [b_zero_alert(event)]
            if self._lr_near_peak(event.learning_rate):
                found.append(update_ratio_alert(event, self._settings[2], self._settings[3]))
            return self._new(found)
        return []

    def check_labels(
        self, labels: torch.Tensor, step: int | None = None, ignore_index: int = -100
    ) -> list[AlertRaised]:
        """Take a batch's labels ([B, T], Hugging Face convention); alert if no token in it is trained."""
        return self._new([no_trained_tokens_alert(*count_trained_tokens(labels, ignore_index), step)])

    def check_gradients(self, report: GradientReport, step: int) -> list[AlertRaised]:
        """Take what the gradients of update ``step`` show (read after ``backward()``); alert, once per run,
        if trainable parameters got none."""
        return self._new([no_gradient_alert(report, step)])
