"""Watch and steer a Hugging Face ``transformers.Trainer`` or TRL ``SFTTrainer`` as a run source.

:class:`HFRun` wraps an existing trainer and satisfies :class:`~lora_widgets.events.types.RunSource`, so the dashboard
drives it as it drives our own trainer: ``await run()`` starts ``hf_trainer.train()`` in a worker thread, so the
kernel's event loop stays free (other cells run, Stop is received), and every event crosses to the loop's thread
with ``loop.call_soon_threadsafe`` before any subscriber sees it: widget updates sent from other threads never
reach the page in Colab (googlecolab/colabtools#3373).

The events come from :class:`~lora_widgets.hf.callback.EventCallback`, which ``HFRun`` attaches (see there for
what each figure is and how Stop and Pause act). Failures never escape :meth:`HFRun.run`: an exception from
``train()`` (out of memory, an error in the user's ``compute_loss``, bad data) and a non-finite logged loss or
gradient norm end in :class:`~lora_widgets.events.types.RunFailed` with the diagnosis our trainer gives
(:mod:`lora_widgets.hf.args`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
from pathlib import Path
from typing import Any

import torch

from lora_widgets.events.source import RunBase
from lora_widgets.events.types import RunEnded, RunFailed
from lora_widgets.health.gradient_check import is_no_gradient_error
from lora_widgets.hf.args import describe_settings, expected_max_steps, logging_advice
from lora_widgets.hf.callback import EventCallback
from lora_widgets.hf.guard import _TRAINING, check_checkpoint, check_settings, refuse_if_trainer_busy
from lora_widgets.paths import as_path
from lora_widgets.training import ownership
from lora_widgets.training.early_stopping import EarlyStopping

__all__ = ["EventCallback", "HFRun", "describe_settings", "logging_advice"]

logger = logging.getLogger(__name__)

_BUSY = "this trainer is already training; stop() it or await the run in progress"


class HFRun(RunBase):
    """An existing ``transformers.Trainer`` / ``trl.SFTTrainer`` as a :class:`~lora_widgets.events.types.RunSource`.

    ``HFRun(hf_trainer)`` attaches an :class:`EventCallback` (or reuses one already attached);
    ``await run()`` trains in a worker thread and returns the terminal event; subscribers are called on the
    event loop's thread only. The trainer keeps its own settings: :attr:`settings` describes them,
    :meth:`advice` warns when ``logging_steps`` would leave the chart nearly empty. ``early_stopping``: an
    :class:`~lora_widgets.training.early_stopping.EarlyStopping` rule for the callback (see
    :mod:`lora_widgets.hf.callback`).

    State, subscribers, history, the hop to the loop's thread, stop/pause/resume (shared with the callback,
    which honours them in the training thread) and the cancel shield are
    :class:`~lora_widgets.events.source.RunBase`'s; the callback writes ``metrics.jsonl``.

    Raises:
        TypeError: ``hf_trainer`` is not a transformers ``Trainer`` (no ``train``/``add_callback``/``args``).
    """

    owner = "HFRun"

    def __init__(self, hf_trainer: Any, early_stopping: EarlyStopping | None = None) -> None:
        missing = [
            a for a in ("train", "add_callback", "args", "callback_handler") if not hasattr(hf_trainer, a)
        ]
        if missing:
            raise TypeError(
                f"hf_trainer must be a transformers.Trainer or trl.SFTTrainer, got {type(hf_trainer).__name__} "
                f"(it lacks {', '.join(missing)})"
            )
        self.hf_trainer = hf_trainer
        found = [cb for cb in hf_trainer.callback_handler.callbacks if isinstance(cb, EventCallback)]
        self.callback: EventCallback = found[0] if found else EventCallback(early_stopping=early_stopping)
        self.added_callback = not found  # detach() on a failed dashboard construction removes it again
        if not found:
            hf_trainer.add_callback(self.callback)
        elif early_stopping is not None:
            self.callback.early_stopping = early_stopping
        super().__init__(requests=self.callback.requests)
        self._unforward = self.callback.subscribe(self._publish_from_thread)

    # -- RunSource -------------------------------------------------------------------------------------

    def check_can_start(self) -> None:
        """Raise if :meth:`run` cannot start now, changing nothing: a run of this trainer is in progress (the
        dashboard's, or a ``train()`` the user called in any thread or cell: :mod:`lora_widgets.hf.guard`), a
        lora_widgets ``LoRATrainer`` is training its model, or ``hf_trainer.args`` holds a value that
        transformers would fail on part-way (``logging_steps=0``).

        Raises:
            RuntimeError: a run is in progress (the message says which, and how to stop it).
            ValueError: a bad setting (named, with the fix).
        """
        refuse_if_trainer_busy(self.hf_trainer)
        if self._running:
            raise RuntimeError(_BUSY)
        model = getattr(self.hf_trainer, "model", None)
        if isinstance(model, torch.nn.Module):
            ownership.refuse_if_training(model)
        check_settings(self.hf_trainer.args)

    async def run(self, resume_from_checkpoint: str | bool | None = None) -> RunEnded:
        """Run ``hf_trainer.train(resume_from_checkpoint=...)`` in a worker thread until it ends; return the
        terminal event. A failed run returns :class:`RunFailed` (never raises); if this task is cancelled,
        training is stopped after the current step and awaited before the cancellation propagates.

        Raises:
            RuntimeError, ValueError: :meth:`check_can_start` refused, or a file of the checkpoint to resume
                from does not read (:func:`~lora_widgets.hf.guard.check_checkpoint`); nothing was changed.
        """
        self.check_can_start()
        check_checkpoint(self.hf_trainer, resume_from_checkpoint)
        hold = contextlib.ExitStack()  # the model, so a LoRATrainer does not start on it meanwhile
        if isinstance(model := getattr(self.hf_trainer, "model", None), torch.nn.Module):
            hold.enter_context(ownership.training(model))
        self._begin_run(_BUSY)
        _TRAINING.add(self.hf_trainer)
        self.callback.begin(int(getattr(self.hf_trainer.state, "global_step", 0) or 0))
        try:
            end = await self._in_thread(self._train, resume_from_checkpoint)
        finally:
            # Every event of this run was handed to the loop before the worker returned; from now on a
            # train() called directly delivers in its own thread (this loop may be closed, as after asyncio.run).
            self._end_run()
            _TRAINING.discard(self.hf_trainer)
            hold.close()
        self.last_event = end
        return end

    # -- extras for a view -----------------------------------------------------------------------------

    @property
    def settings(self) -> dict[str, Any]:
        """The trainer's settings, to show read-only: :func:`describe_settings`."""
        return describe_settings(self.hf_trainer)

    @property
    def total_steps(self) -> int | None:
        """Optimizer updates ``train()`` will make (``None`` if the dataset has no length)."""
        return expected_max_steps(self.hf_trainer)

    def advice(self) -> str | None:
        """A warning with a suggested ``logging_steps`` when the chart would be nearly empty, else ``None``."""
        return logging_advice(self.hf_trainer.args, self.total_steps)

    def save_adapter(self, path: str | Path) -> Path:
        """Write the model as it is now with ``hf_trainer.save_model(path)`` (a PEFT model: its adapter, in
        PEFT's format); returns the path. What ``LoRADashboard.save_adapter`` calls for an attached trainer.

        Raises:
            TypeError: ``path`` is not a path (checked before anything is written: ``str(3)`` would save to ``./3``).
            FileExistsError: ``path`` is a file.
        """
        if as_path(path, "save_adapter", "path").is_file():
            raise FileExistsError(f"save_adapter: {str(path)!r} is a file; pass a folder to save into")
        self.hf_trainer.save_model(str(path))
        return Path(path)

    def detach(self) -> None:
        """Remove the event bridge from the trainer: the :class:`EventCallback` this ``HFRun`` added (one that
        was already attached stays, unsubscribed from); its other callbacks are untouched."""
        self._unforward()
        if self.added_callback:
            with contextlib.suppress(ValueError):
                self.hf_trainer.remove_callback(self.callback)

    # -- internals --------------------------------------------------------------------------------------

    def _train(self, resume_from_checkpoint: str | bool | None) -> RunEnded:
        """The worker thread: train, and turn any exception into a published RunFailed."""
        failed: RunFailed | None = None
        try:
            self.hf_trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        except Exception as exc:
            if is_no_gradient_error(exc):  # diagnosed in full in the RunFailed; torch's traceback says less
                logger.info("hf_trainer.train() failed: no trainable parameter receives a gradient")
            else:
                logger.exception("hf_trainer.train() failed")
            failed = self.callback.report_failure(exc, self.hf_trainer)
        if failed is not None:  # outside the handler, so the traceback's tensors can be freed
            self._release_memory()
            return failed
        if self.callback.last_event is None:  # train() returned without on_train_end: say so, do not hang
            return self.callback.report_failure(
                RuntimeError("train() ended without on_train_end"), self.hf_trainer
            )
        return self.callback.last_event

    def _release_memory(self) -> None:
        model = getattr(self.hf_trainer, "model", None)
        if isinstance(model, torch.nn.Module):
            model.zero_grad(set_to_none=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
