"""Refuse a start of an attached trainer that cannot run well: one already training, or settings it would fail on.

One trainer trains once at a time, whoever started it. Two ``train()`` calls on one ``transformers.Trainer``
share its model, optimizer, gradients and ``state``: the second replaces ``hf_trainer.state`` under the
first and zeroes the gradients that the first is clipping, which was seen to end in a segmentation fault
(the kernel dies) or a run that "finished" at step 31 of 30. So before :class:`~lora_widgets.hf.run.HFRun`
starts one, and before the dashboard attaches to a trainer (attaching removes its progress display, which
would change a run in progress), :func:`refuse_if_trainer_busy` asks :func:`training_now`:

- a run an ``HFRun`` started is in :data:`_TRAINING` (set before its worker thread calls ``train()``);
- a ``train()`` the user called in any thread is found on that thread's stack: a ``train`` or
  ``_inner_training_loop`` frame whose ``self`` is this trainer. transformers' own ``is_in_train`` flag is
  only the quick first test: it stays True after a ``train()`` that raised, although the trainer may be
  trained again, so alone it would refuse forever after one failure.

:func:`check_settings` names the ``TrainingArguments`` values that transformers accepts when changed after
construction (``hf_trainer.args.logging_steps = 0``) but fails on part-way through the run, and
:func:`check_checkpoint` a checkpoint file to resume from that does not read.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import weakref
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["check_checkpoint", "check_settings", "refuse_if_trainer_busy", "training_now"]

_TRAINING: weakref.WeakSet[Any] = weakref.WeakSet()
"""Trainers an ``HFRun`` is training right now (from before its worker thread starts ``train()``)."""

_TRAIN_FRAMES = frozenset({"train", "_inner_training_loop"})


def _thread_in_train(hf_trainer: Any) -> threading.Thread | None:
    """The thread whose stack is inside ``hf_trainer.train()`` now, or ``None``."""
    threads = {t.ident: t for t in threading.enumerate()}
    for ident, frame in sys._current_frames().items():
        f: FrameType | None = frame
        while f is not None:
            if f.f_code.co_name in _TRAIN_FRAMES and f.f_locals.get("self") is hf_trainer:
                return threads.get(ident)
            f = f.f_back
    return None


def training_now(hf_trainer: Any) -> str | None:
    """Who is training ``hf_trainer`` right now, in words (``None``: nobody)."""
    if hf_trainer in _TRAINING:
        return "the dashboard (HFRun) is already training it"
    if not getattr(hf_trainer, "is_in_train", False):
        return None
    thread = _thread_in_train(hf_trainer)
    if thread is None:
        return None  # is_in_train left True by a train() that raised
    return f"{type(hf_trainer).__name__}.train() is running in thread {thread.name!r}"


def refuse_if_trainer_busy(hf_trainer: Any, action: str = "start another training run") -> None:
    """Raise ``RuntimeError`` saying who is training ``hf_trainer`` and how to stop it, if anyone is."""
    who = training_now(hf_trainer)
    if who is None:
        return
    if hf_trainer in _TRAINING:
        how = "press Stop (or dash.stop()) and wait for the run to end (await dash.wait())"
    else:
        how = (
            "wait for that train() call to return, or stop it first (interrupt its cell: Kernel > Interrupt, "
            "or set hf_trainer.control.should_training_stop = True from a callback)"
        )
    raise RuntimeError(
        f"cannot {action}: {who}, and one trainer trains once at a time (two train() calls on one trainer "
        f"share its model, optimizer and state, and can crash the kernel). To go on, {how}; nothing about "
        "the run in progress was changed"
    )


def _bad_steps(args: Any, strategy: str, steps: str) -> str | None:
    value = getattr(args, steps, None)
    if str(getattr(getattr(args, strategy, None), "value", getattr(args, strategy, None))) != "steps":
        return None
    if value is None and steps == "eval_steps":
        return None  # falls back to logging_steps, checked on its own
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        return f"{steps}={value!r} with {strategy}='steps'"
    if value > 1 and value != int(value):
        return f"{steps}={value!r} (above 1 it must be a whole number of steps)"
    return None


def check_settings(args: Any) -> None:
    """Refuse the ``TrainingArguments`` values transformers fails on only part-way through a run.

    ``TrainingArguments`` validates its values when built, not when they are changed afterwards; a
    ``logging_steps`` (``eval_steps``, ``save_steps``) of 0 then ends in ``ZeroDivisionError`` at the second step.

    Raises:
        ValueError: naming each bad value and the fix.
    """
    bad = [
        problem
        for strategy, steps in (
            ("logging_strategy", "logging_steps"),
            ("eval_strategy", "eval_steps"),
            ("save_strategy", "save_steps"),
        )
        if (problem := _bad_steps(args, strategy, steps)) is not None
    ]
    if bad:
        raise ValueError(
            f"hf_trainer.args has {'; '.join(bad)}: transformers divides by it part-way through the run. Set "
            "it to a whole number of steps >= 1 (e.g. hf_trainer.args.logging_steps = 10) or a fraction of "
            "the run in (0, 1), then start again"
        )


def _unreadable_file(directory: Path) -> tuple[Path, str] | None:
    """The first file of a transformers checkpoint that does not parse (JSON, or a safetensors header and
    size), with the reason; ``None`` when all do."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(directory.iterdir()):
        try:
            if path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".safetensors":
                with safe_open(str(path), "pt") as f:
                    f.keys()
        except (SafetensorError, OSError, ValueError) as exc:
            return path, f"{type(exc).__name__}: {exc}"
    return None


def check_checkpoint(hf_trainer: Any, resume_from_checkpoint: str | bool | None) -> None:
    """Refuse to resume from a transformers checkpoint with a file that does not read (truncated by a full disk
    or a killed process), naming the file and the latest earlier checkpoint that reads; transformers would
    fail part-way with the raw JSON or safetensors error, naming neither.

    Raises:
        ValueError: the file, why, and which checkpoint to resume from instead.
    """
    if resume_from_checkpoint is True:
        from transformers.trainer_utils import get_last_checkpoint

        output_dir = getattr(hf_trainer.args, "output_dir", None)
        found = get_last_checkpoint(output_dir) if output_dir and os.path.isdir(output_dir) else None
        resume_from_checkpoint = found
    if not isinstance(resume_from_checkpoint, str | os.PathLike) or not os.path.isdir(resume_from_checkpoint):
        return  # nothing to resume from, or transformers' own message for a missing directory
    directory = Path(resume_from_checkpoint)
    bad = _unreadable_file(directory)
    if bad is None:
        return

    def number(d: Path) -> int:
        return int(d.name.rsplit("-", 1)[-1]) if d.name.rsplit("-", 1)[-1].isdigit() else -1

    earlier = sorted(
        (
            d
            for d in directory.parent.glob("checkpoint-*")
            if d.is_dir() and -1 < number(d) < number(directory)
        ),
        key=number,
        reverse=True,
    )
    good = next((d for d in earlier if _unreadable_file(d) is None), None)
    fix = (
        f"resume from the earlier checkpoint: train(resume_from_checkpoint={str(good)!r})"
        if good is not None
        else "no earlier checkpoint reads either: train from the start (resume_from_checkpoint=None)"
    )
    raise ValueError(f"checkpoint file {str(bad[0])!r} cannot be read ({bad[1]}); {fix}")
