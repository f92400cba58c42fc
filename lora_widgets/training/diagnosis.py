"""What went wrong in a training run, said so that the user knows what to change.

One job: turn a fault (out of memory, a non-finite loss, bad input, a checkpoint that could not be
written, any other exception) into a :class:`Diagnosis` -- a reason, a message naming the values in play
and where the run was, and concrete suggestions with numbers in them. The trainer reports it as
:class:`~lora_widgets.events.types.RunFailed`; the dashboard shows it as a danger callout. Pure functions of
the run's settings: no model is touched, nothing is retried.

Steps are counted as the events count them: ``step`` is the number of optimizer updates completed, so a
fault during an update happened "at step ``step + 1``", and ``BEFORE_FIRST_STEP`` (-1) marks the set-up
(data, model, optimizer) before any update.

For out-of-memory errors the memory estimator (:func:`lora_widgets.memory.fit.suggest_fit`) is asked for
settings that fit the device's total memory, when it can model the architecture; simple halvings
follow in any case.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from lora_widgets.devices import describe_device, format_bytes, total_memory
from lora_widgets.events.types import FailureReason
from lora_widgets.health.gradient_check import (
    GradientReport,
    failure_text,
    fix_steps,
    gradient_report,
    is_no_gradient_error,
)
from lora_widgets.lora.layers import LoRAConfig
from lora_widgets.training.config import TrainConfig
from lora_widgets.training.schedules import lr_at

__all__ = [
    "BEFORE_FIRST_STEP",
    "Diagnosis",
    "Phase",
    "checkpoint_diagnosis",
    "diagnose",
    "error_diagnosis",
    "format_lr",
    "is_out_of_memory",
    "nan_diagnosis",
    "no_gradient_diagnosis",
    "oom_diagnosis",
]

logger = logging.getLogger(__name__)

BEFORE_FIRST_STEP = -1
"""The ``step`` of a fault in the set-up, before any optimizer update."""

Phase = Literal["data", "setup", "eval", "step", "checkpoint"]
"""Where a run was when it failed: preparing the data, setting up the model and optimizer, evaluating,
making an update, or writing a checkpoint."""

# torch >= 2.5 has torch.OutOfMemoryError; torch.cuda.OutOfMemoryError is the same class there.
_OOM_TYPES: tuple[type[BaseException], ...] = tuple(
    {t for t in (getattr(torch, "OutOfMemoryError", None), torch.cuda.OutOfMemoryError) if t is not None}
)
# RuntimeError texts of allocation failures: CUDA (older builds), MPS, and the CPU allocator
# ("DefaultCPUAllocator: can't allocate memory" on Linux/macOS, "... not enough memory" on Windows).
_OOM_TEXTS = ("out of memory", "can't allocate memory", "not enough memory")


@dataclass
class Diagnosis:
    """Why a run failed: ``reason`` (oom, nan, bad_input, error), ``message``, ``suggestions``."""

    reason: FailureReason
    message: str
    suggestions: list[str] = field(default_factory=list)
    error_type: str = ""


def format_lr(lr: float) -> str:
    """A learning rate as people write it: ``3e-4``, ``1.5e-3``."""
    mantissa, exponent = f"{lr:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}"


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an allocation failure on any device: torch's ``OutOfMemoryError``, Python's ``MemoryError``,
    or a ``RuntimeError`` from the CUDA, MPS or CPU allocator."""
    if isinstance(exc, (*_OOM_TYPES, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc).lower() for t in _OOM_TEXTS)


def _at(step: int) -> str:
    return "before the first step" if step < 0 else f"at step {step + 1}"


def oom_diagnosis(
    exc: BaseException,
    step: int,
    *,
    config: TrainConfig,
    device: torch.device,
    model: torch.nn.Module,
    lora: LoRAConfig | None,
    seq_len: int,
    where: str | None = None,
) -> Diagnosis:
    """Out of memory after ``step`` completed updates (``BEFORE_FIRST_STEP``: while setting up): the
    settings, the device's total memory, and smaller settings to try, the estimator's fits first.
    ``where`` overrides the place named (default: "at step N", or "while moving the model to the device")."""
    c = config
    rank = lora.r if lora is not None else None
    total = total_memory(device)
    what = "GPU" if device.type == "cuda" else "device"
    if where is None:
        where = "while moving the model to the device" if step < 0 else f"at step {step + 1}"
    kept = (
        "Training did not start."
        if step < 0
        else f"The adapter of the last completed step ({step}) was kept."
    )
    first_line = (str(exc).splitlines() or [""])[0][:200]
    message = (
        f"Out of memory {where} on {describe_device(device)}: batch_size={c.batch_size} "
        f"(x grad_accum_steps {c.grad_accum_steps}), LoRA rank r={rank if rank is not None else 'n/a (full fine-tuning)'}, "
        f"sequence length {seq_len}, precision {c.precision}; the {what} has {format_bytes(total)} in total. "
        f"{kept} ({first_line})"
    )
    suggestions: list[str] = []
    try:  # the memory estimator's concrete fits, when it can model this model
        from lora_widgets.memory import fit as memory

        if total:
            suggestions += memory.suggest_fit(
                model,
                lora,
                c.batch_size,
                int(seq_len),
                c.precision,  # "fp32"/"bf16"/"fp16": memory parses TrainConfig's names
                int(total),
                gradient_checkpointing=c.gradient_checkpointing,
                cuda=device.type == "cuda",
            )
    except Exception:
        logger.debug("memory.suggest_fit could not help", exc_info=True)
    if c.batch_size > 1:
        half = c.batch_size // 2
        suggestions.append(
            f"batch_size={half} with grad_accum_steps={c.grad_accum_steps * c.batch_size // half} "
            f"(same effective batch of {c.batch_size * c.grad_accum_steps} sequences)"
        )
    if rank is not None and rank > 1:
        suggestions.append(f"LoRA rank r={rank // 2}")
    if seq_len >= 32:
        suggestions.append(f"block_size={int(seq_len) // 2} (shorter sequences)")
    if not c.gradient_checkpointing:
        suggestions.append("gradient_checkpointing=True (recompute activations: less memory, ~30% slower)")
    if c.precision == "fp32" and device.type == "cuda":
        suggestions.append("precision='bf16' (or 'fp16' on GPUs without bf16)")
    return Diagnosis("oom", message, suggestions, type(exc).__name__)


def nan_diagnosis(bad_step: int, skipped: bool, *, config: TrainConfig, total_steps: int) -> Diagnosis:
    """A non-finite loss or gradient first seen at 1-based ``bad_step``; ``skipped``: its update was not
    applied. Suggests a lower learning rate (a third), longer warm-up, clipping, bf16 over fp16."""
    c = config
    lr = lr_at(bad_step - 1, max(total_steps, 1), c.learning_rate, c.warmup_steps, c.schedule)
    kept = (
        f"its update was not applied, so the adapter is that of step {bad_step - 1}"
        if skipped
        else "it was detected at the next logged step (log_every > 1), so later updates may have spread it"
    )
    message = f"The loss (or gradient) became NaN/inf at step {bad_step} (learning rate {lr:.3g}); {kept}."
    suggestions = [
        f"lower learning_rate, e.g. {format_lr(c.learning_rate / 3)} (now {format_lr(c.learning_rate)})"
    ]
    if c.warmup_steps < 20:
        suggestions.append(f"longer warm-up, e.g. warmup_steps={max(20, 2 * c.warmup_steps)}")
    if c.max_grad_norm is None:
        suggestions.append("clip gradients: max_grad_norm=1.0")
    if c.precision == "fp16":
        suggestions.append("precision='bf16' instead of 'fp16' (bf16 has fp32's range)")
    return Diagnosis("nan", message, suggestions, "FloatingPointError")


def no_gradient_diagnosis(report: GradientReport, step: int) -> Diagnosis:
    """No trainable parameter receives a gradient in update ``step`` (1-based): the parameters grouped by
    module, what that means (not on the forward path, or detached) and what to check, never torch's
    "element 0 of tensors does not require grad" (:mod:`lora_widgets.health.gradient_check`)."""
    return Diagnosis("no_gradient", failure_text(report, step), fix_steps(report), "NoGradientError")


def error_diagnosis(
    exc: BaseException, step: int, bad_input: bool = False, where: str | None = None
) -> Diagnosis:
    """Bad input (the data or settings were refused before training) or any other error after ``step``
    completed updates (``where`` overrides the place named: default "at step N" or "before the first step")."""
    if bad_input:
        return Diagnosis("bad_input", f"Bad input: {exc}", [], type(exc).__name__)
    return Diagnosis(
        "error",
        f"Training failed {where or _at(step)} with {type(exc).__name__}: {exc}",
        ["see the traceback in the log (logger 'lora_widgets.training')"],
        type(exc).__name__,
    )


def checkpoint_diagnosis(exc: BaseException, step: int, directory: str | Path) -> Diagnosis:
    """Writing the checkpoint of ``step`` into ``directory`` failed (a full disk, a permission): names the
    file (from the ``OSError``) and the step; the earlier checkpoints are intact."""
    name = getattr(exc, "filename", None) or str(directory)
    detail = getattr(exc, "strerror", None) or str(exc)
    message = (
        f"Could not write the checkpoint of step {step}: {detail} ({type(exc).__name__} on {str(name)!r}). "
        "Earlier checkpoints are intact."
    )
    suggestions = [
        f"free disk space where the runs are written ({Path(directory).parent.parent})",
        "write fewer checkpoints (a larger checkpoint_every) or none (checkpoint_every=None)",
    ]
    return Diagnosis("error", message, suggestions, type(exc).__name__)


def diagnose(
    exc: BaseException,
    step: int,
    phase: Phase,
    *,
    config: TrainConfig,
    device: torch.device,
    model: torch.nn.Module,
    lora: LoRAConfig | None,
    seq_len: int,
    checkpoint: str | Path | None = None,
) -> Diagnosis:
    """Classify an exception that ended a run in ``phase`` after ``step`` completed updates.

    Out of memory is recognised on every device and in every phase; anything refused while preparing the
    data, and a ``ValueError``/``FileNotFoundError`` while setting up (an unsuitable model or checkpoint),
    is bad input; a failed checkpoint write names its file and step; the rest is an error, located.
    """
    if phase == "data":
        return error_diagnosis(exc, step, bad_input=True)
    started = phase != "setup" and not (phase == "eval" and step == 0)  # any update made yet?
    at = step if started else BEFORE_FIRST_STEP
    where = {
        "setup": None,
        "eval": f"during the evaluation {'before the first step' if at < 0 else f'at step {step}'}",
        "step": None,
        "checkpoint": f"while writing the checkpoint of step {step}",
    }[phase]
    if phase == "step" and is_no_gradient_error(exc):
        report = getattr(exc, "report", None) or gradient_report(model)
        return no_gradient_diagnosis(report, step + 1)
    if is_out_of_memory(exc):
        return oom_diagnosis(
            exc, at, config=config, device=device, model=model, lora=lora, seq_len=seq_len, where=where
        )
    if phase == "setup" and isinstance(exc, ValueError | FileNotFoundError):
        return error_diagnosis(exc, step, bad_input=True)
    if phase == "checkpoint" and checkpoint is not None:
        return checkpoint_diagnosis(exc, step, checkpoint)
    return error_diagnosis(exc, at, where=where)
