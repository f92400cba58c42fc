"""``EventCallback``: a ``transformers.TrainerCallback`` that publishes our typed events and honours stop/pause.

The trainer's hooks become the events our own trainer publishes (:mod:`lora_widgets.events.types`)::

    on_train_begin  -> RunStarted            on_evaluate -> EvalMetrics
    on_log (loss)   -> StepMetrics           on_save     -> CheckpointSaved
    on_step_end     -> honours stop()/pause() and <output_dir>/control.json (StateChanged "paused"/"running")
    on_pre_optimizer_step (the first of a train()) -> AlertRaised "no_gradient" when trainable parameters
                       got no gradient (lora_widgets.health.gradient_check; read after backward, before the update)
    on_train_end    -> StateChanged(<end>), RunFinished | RunEarlyStopped | RunStopped | RunFailed (NaN seen)

Early stopping (``EventCallback(early_stopping=EarlyStopping(...))``) applies the rule of
:mod:`lora_widgets.training.early_stopping` to the logged losses and evaluations, with the semantics of
``transformers.EarlyStoppingCallback`` (patience and threshold on ``eval_loss``): it sets
``control.should_training_stop`` and the run ends in :class:`~lora_widgets.events.types.RunEarlyStopped`. The best
model is restored by the trainer itself when ``load_best_model_at_end=True`` (as with HF's callback); the end
message says which step was best either way.

Subscribers are called synchronously, in the thread that runs ``train()``; :class:`lora_widgets.hf.run.HFRun`
runs ``train()`` in a worker thread and moves each event to the event loop's thread. A user who calls
``hf_trainer.train()`` in a cell gets the events on the kernel's thread, but the cell blocks until training ends,
so no button (Stop, Pause) is handled meanwhile (ipywidgets#3468).

Controls act between optimizer steps: :meth:`EventCallback.stop` sets ``control.should_training_stop`` at the end
of the step in progress (with ``should_log``, and ``should_save`` when ``save_strategy`` is ``"steps"`` or
``"epoch"``, so the last step is charted and its checkpoint written as the arguments say);
:meth:`EventCallback.pause` holds the training thread in ``on_step_end`` on a ``threading.Event`` until
:meth:`EventCallback.resume`.

Where the figures come from: loss, learning rate, grad norm and epoch are the trainer's logged values (every
``logging_steps``); tokens/s is measured from ``state.num_input_tokens_seen`` or TRL's ``num_tokens`` when they
count, else estimated as steps x batch x accumulation x the longest of the first training rows; memory is
:func:`lora_widgets.devices.memory_in_use`; the ETA is (max_steps - step) x the mean time per step so far,
pauses excluded. Other numeric logged values (TRL's ``mean_token_accuracy``, ``num_tokens``, ``entropy``) are
carried in ``StepMetrics.extra`` / ``EvalMetrics.extra``. A non-finite logged loss or gradient norm stops the
run and ends it in ``RunFailed(reason="nan")``. Every event is also appended to ``<output_dir>/metrics.jsonl``
(readable with :func:`~lora_widgets.events.types.event_from_dict`).

Under DDP or FSDP (``torchrun``, ``accelerate launch``) transformers calls the hooks in every process: only the
world's process zero (``state.is_world_process_zero``) publishes events and writes ``metrics.jsonl``, and its stop
and pause reach every process through one ``all_reduce`` in ``on_step_end``
(:meth:`lora_widgets.training.distributed.World.agree`), since ``control.should_training_stop`` is per process.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback

from lora_widgets.devices import describe_device, gpu_utilization, memory_in_use
from lora_widgets.events.run_files import METRICS_FILE, ControlReader, MetricsWriter
from lora_widgets.events.source import Requests, Subscribers
from lora_widgets.events.types import (
    CheckpointSaved,
    EvalMetrics,
    Event,
    FailureReason,
    RunEarlyStopped,
    RunEnded,
    RunFailed,
    RunFinished,
    RunStarted,
    RunState,
    RunStopped,
    StateChanged,
    StepMetrics,
)
from lora_widgets.health.alerts import no_gradient_alert
from lora_widgets.health.gradient_check import gradient_report
from lora_widgets.hf.args import (
    STEP_KEYS,
    failure_diagnosis,
    is_finite,
    logged_extras,
    logging_advice,
    nan_failure,
    peft_lora_config,
    sample_seq_len,
    setting_notices,
    settings_of,
    strategy_of,
    tokens_seen,
)
from lora_widgets.lora.layers import count_parameters
from lora_widgets.training.distributed import World, is_main_process
from lora_widgets.training.early_stopping import EarlyStopper, EarlyStopping, Verdict

__all__ = ["EventCallback"]

logger = logging.getLogger(__name__)

_UTIL_EVERY_S = 2.0  # GPU utilisation is read through NVML at most this often


@dataclass
class _RunRecord:
    """What one ``train()`` has shown so far (reset when it begins)."""

    started: bool = False  # on_train_begin was reached
    main: bool = field(default_factory=is_main_process)  # rank 0 (or the only process): it reports
    world: World = field(default_factory=World)  # the processes of a distributed train() (one by default)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    max_steps: int = 0
    step: int = 0  # optimizer updates completed
    start_step: int = 0  # global_step when this train() began (resumed runs start later)
    log_step: int = 0
    t0: float = field(default_factory=time.monotonic)
    log_t: float = 0.0  # elapsed_s at the last log
    paused_s: float = 0.0
    tokens_per_step: int = 0
    last_tokens: float | None = None
    last_loss: float | None = None
    best_val: float | None = None
    nan_step: int | None = None
    gradients_checked: bool = False  # the first update's gradients were read
    ckpt_step: int | None = None
    ckpt_path: str | None = None
    stopper: EarlyStopper | None = None
    verdict: Verdict | None = None  # the early-stopping rule ended the run
    util: float | None = None
    util_t: float = -1e9
    unwritten: list[Event] = field(default_factory=list)  # published before metrics.jsonl was opened


class EventCallback(TrainerCallback):
    """A ``TrainerCallback`` that publishes our typed events and honours :meth:`stop` / :meth:`pause`.

    Add it to any ``transformers.Trainer`` / ``trl.SFTTrainer`` (``callbacks=[cb]`` or ``add_callback``) and
    :meth:`subscribe`: subscribers are called synchronously in the thread that runs ``train()``. To keep a
    notebook usable while training, use :class:`HFRun` instead (it attaches one of these for you).
    ``metrics_file``: append every event to ``<output_dir>/metrics.jsonl`` and, after each step, honour the
    requests another process writes to ``<output_dir>/control.json``
    (:func:`~lora_widgets.events.run_files.send_request`, a dashboard's ``watch``). ``early_stopping``: stop
    on the rule's verdict (see the module's docstring); settable between runs.
    """

    def __init__(self, *, metrics_file: bool = True, early_stopping: EarlyStopping | None = None) -> None:
        if early_stopping is not None and not isinstance(early_stopping, EarlyStopping):
            raise TypeError(
                f"early_stopping must be an EarlyStopping or None, got {type(early_stopping).__name__}"
            )
        self.early_stopping = early_stopping
        self._subscribers = Subscribers("EventCallback")
        self._metrics_file = metrics_file
        self._file: MetricsWriter | None = None
        self._control: ControlReader | None = None
        self.requests = Requests()
        """Stop / pause / resume, shared with :class:`~lora_widgets.hf.run.HFRun`."""
        self.state: RunState = "idle"
        self.last_event: RunEnded | None = None
        self._reset_run()

    # -- public API ------------------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for every event, in order, in the training thread; returns an
        unsubscribe function. An exception in a callback is logged and does not stop training."""
        return self._subscribers.add(callback)

    def stop(self) -> None:
        """End training after the step in progress (also releases a pause). Safe from any thread."""
        self.requests.stop()

    def pause(self) -> None:
        """Hold training after the step in progress until :meth:`resume`. Safe from any thread."""
        self.requests.pause()

    def resume(self) -> None:
        """Release a paused run. Safe from any thread."""
        self.requests.resume()

    def begin(self, step: int = 0) -> None:
        """Start a new run's record now, before ``train()`` reaches ``on_train_begin``: forget an earlier
        stop()/pause() and publish ``StateChanged("running")`` at once, so a view shows the click was taken."""
        self._reset_run()
        self._clear_controls()
        self._emit(StateChanged("running", step))

    def report_failure(self, exc: BaseException, hf_trainer: Any) -> RunFailed:
        """Publish ``StateChanged("failed")`` and a :class:`RunFailed` for ``train()`` having raised ``exc``,
        with the diagnosis our trainer gives; returns the event. For callers of ``train()`` (HFRun does it)."""
        step = int(getattr(getattr(hf_trainer, "state", None), "global_step", self._run.step) or 0)
        reason: FailureReason
        try:
            d = failure_diagnosis(
                exc, hf_trainer, step, started=self._run.started, max_steps=self._run.max_steps
            )
            reason, message, suggestions, error_type = d.reason, d.message, d.suggestions, d.error_type
        except Exception as why:  # the report must not fail: say what failed, plainly
            logger.exception("diagnosing the failure failed")
            reason, error_type = "error", type(exc).__name__
            message, suggestions = f"Training failed at step {step + 1}: {exc} (diagnosis failed: {why})", []
        message = message if message.endswith(".") else message + "."
        if reason == "no_gradient" and not self._run.gradients_checked:  # the alert names them in the events
            self._check_gradients(getattr(hf_trainer, "model", None), step + 1)
        end = self._failed(step, reason, message + self._saved_note(step), error_type, suggestions)
        self._finish("failed", end)
        return end

    # -- TrainerCallback hooks (called in the training thread) ------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.early_stopping is not None:  # before anything starts: train() raises, nothing has changed
            why = self.early_stopping.refusal_without_evaluations(
                strategy_of(args, "eval_strategy") != "no",
                "set TrainingArguments(eval_strategy='steps', eval_steps=50) with an eval_dataset",
            )
            if why:
                raise ValueError(why)
        announced = self._run.unwritten if self.state == "running" else []  # by begin()
        self._reset_run()
        self._run.unwritten = announced
        self._run.started = True
        self._run.main, self._run.world = bool(getattr(state, "is_world_process_zero", True)), World.current()
        self._run.stopper = EarlyStopper(self.early_stopping) if self.early_stopping is not None else None
        self._run.device = torch.device(str(args.device))
        self._run.max_steps = int(state.max_steps)
        self._run.step = self._run.start_step = self._run.log_step = int(state.global_step)
        model = kwargs.get("model")
        loader = kwargs.get("train_dataloader")
        seq_len = sample_seq_len(getattr(loader, "dataset", None), args) or 0
        world = int(getattr(args, "world_size", 1) or 1)
        self._run.tokens_per_step = (
            int(args.per_device_train_batch_size) * int(args.gradient_accumulation_steps) * world * seq_len
        )
        self._run.last_tokens = 0.0 if state.global_step == 0 else None  # counters start at 0 with the run
        self._open_file(args)
        trainable, total = count_parameters(model) if model is not None else (0, 0)
        lora = peft_lora_config(model)
        config = {"source": "transformers", **settings_of(args, model)}
        advice = logging_advice(args, self._run.max_steps)
        if advice:
            config["logging_advice"] = advice
        notices = setting_notices(args, model, self._run.max_steps)
        if any(n.key == "no_adapter" for n in notices):
            config["adapter"] = "none"  # the summary then shows no adapter size
        if self.state != "running":
            self._emit(StateChanged("running", self._run.step))
        self._emit(
            RunStarted(
                run_id=f"hf-{time.strftime('%Y%m%d-%H%M%S')}",
                run_dir=str(args.output_dir),
                config=config,
                lora=lora.to_dict() if lora is not None else None,
                device=str(self._run.device),
                device_name=describe_device(self._run.device),
                trainable_params=trainable,
                total_params=total,
                total_steps=self._run.max_steps,
                tokens_per_step=self._run.tokens_per_step,
                time=time.time(),
            )
        )
        for notice in notices:  # settings that cannot take effect, said once
            self._emit(notice)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._run.step = int(state.global_step)
        self._poll_control()
        world = self._run.world  # under DDP: rank 0's pause and anyone's stop reach every rank at this step
        world.agree(self.requests, bool(control.should_training_stop))
        if self.requests.pause_requested:
            self._emit(StateChanged("paused", self._run.step))
            poll = self._poll_control if self._control is not None else None
            self._run.paused_s += (
                world.hold(self.requests, self._poll_control, 0.25)
                if world.distributed
                else self.requests.wait_blocking(poll)
            )
            if not self.requests.stop_requested:
                self._emit(StateChanged("running", self._run.step))
        if self.requests.stop_requested and self._run.step < self._run.max_steps:
            control.should_training_stop = True
            control.should_log = True  # chart the last step
            if str(getattr(args.save_strategy, "value", args.save_strategy)) in ("steps", "epoch"):
                control.should_save = True

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # after backward (and clipping), before the update: the gradients exist until zero_grad()
        if not self._run.gradients_checked:
            self._check_gradients(kwargs.get("model"), int(state.global_step) + 1)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # after the update, before zero_grad(): the same check where on_pre_optimizer_step is not called
        self.on_pre_optimizer_step(args, state, control, **kwargs)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        if not logs or "loss" not in logs:
            return  # evaluation logs come through on_evaluate; the closing summary has no "loss"
        step = int(state.global_step)
        loss, grad_norm = logs["loss"], logs.get("grad_norm", math.nan)
        if not is_finite(loss) or (not is_finite(grad_norm) and "grad_norm" in logs):
            if not self._early_stop(control, step, math.nan, None) and self._run.nan_step is None:
                self._run.nan_step = step
            control.should_training_stop = True
            return
        self._early_stop(control, step, float(loss), None)
        now = self._elapsed()
        tokens = tokens_seen(state, logs)
        dt = max(now - self._run.log_t, 1e-9)
        if tokens is not None and self._run.last_tokens is not None and tokens > self._run.last_tokens:
            tok_s = (tokens - self._run.last_tokens) / dt
        else:
            tok_s = (step - self._run.log_step) * self._run.tokens_per_step / dt
        self._run.last_tokens, self._run.log_t, self._run.log_step = tokens, now, step
        self._run.last_loss = float(loss)
        mem, reserved = memory_in_use(self._run.device)
        if self._run.device.type == "cuda" and time.monotonic() - self._run.util_t >= _UTIL_EVERY_S:
            self._run.util, self._run.util_t = gpu_utilization(self._run.device), time.monotonic()
        done = max(step - self._run.start_step, 1)
        self._emit(
            StepMetrics(
                step=step,
                total_steps=self._run.max_steps,
                epoch=float(logs.get("epoch", state.epoch or 0.0)),
                loss=float(loss),
                learning_rate=float(logs.get("learning_rate", math.nan)),
                grad_norm=float(grad_norm),
                tokens_per_s=tok_s,
                elapsed_s=now,
                eta_s=max(self._run.max_steps - step, 0) * now / done,
                memory_bytes=mem,
                memory_reserved_bytes=reserved,
                gpu_utilization=self._run.util,
                extra=logged_extras(logs, STEP_KEYS),
            )
        )

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        val = (metrics or {}).get("eval_loss")
        if not isinstance(val, int | float):
            return  # no loss to show (e.g. the eval dataset has no labels)
        val = float(val)
        if math.isfinite(val):
            self._run.best_val = val if self._run.best_val is None else min(self._run.best_val, val)
        ppl = math.exp(val) if val < 700 else math.inf
        best = self._run.best_val if self._run.best_val is not None else val
        extra = logged_extras(metrics or {}, frozenset({"eval_loss", "epoch", "step"}))
        self._emit(EvalMetrics(int(state.global_step), val, ppl, best, extra=extra))
        self._early_stop(control, int(state.global_step), None, val)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._run.ckpt_step = int(state.global_step)
        self._run.ckpt_path = os.path.join(str(args.output_dir), f"checkpoint-{self._run.ckpt_step}")
        self._emit(CheckpointSaved(self._run.ckpt_step, self._run.ckpt_path))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = self._run.step = int(state.global_step)
        note = self._saved_note(step)
        if self._run.nan_step is not None:
            d = nan_failure(args, self._run.nan_step, self._run.max_steps)
            self._finish(
                "failed", self._failed(step, d.reason, d.message + note, d.error_type, d.suggestions)
            )
        elif (v := self._run.verdict) is not None:
            best = (
                " (restored: load_best_model_at_end)"
                if getattr(args, "load_best_model_at_end", False)
                else ""
            )
            end = RunEarlyStopped(
                **self._end_fields(step),
                message=v.message + best + note,
                reason=v.reason,
                best_step=v.best_step,
            )
            self._finish("finished", end)
        elif self.requests.stop_requested and step < self._run.max_steps:
            self._finish(
                "stopped", RunStopped(**self._end_fields(step), message=f"Stopped after step {step}.{note}")
            )
        else:
            message = f"Finished {step} steps in {self._elapsed():.1f} s.{note}"
            self._finish("finished", RunFinished(**self._end_fields(step), message=message))

    # -- internals --------------------------------------------------------------------------------------

    def _early_stop(self, control: Any, step: int, loss: float | None, val_loss: float | None) -> bool:
        """Feed the early-stopping rule a logged loss or an evaluation; on its verdict stop training."""
        stopper = self._run.stopper
        if stopper is None or self._run.verdict is not None:
            return self._run.verdict is not None
        if loss is not None:
            self._run.verdict = stopper.observe_loss(step, loss)
        if val_loss is not None:
            self._run.verdict = stopper.observe_eval(step, val_loss)
        if self._run.verdict is not None:
            control.should_training_stop = True
        return self._run.verdict is not None

    def _reset_run(self) -> None:
        self._run = _RunRecord()

    def _elapsed(self) -> float:
        return time.monotonic() - self._run.t0 - self._run.paused_s

    def _end_fields(self, step: int) -> dict[str, Any]:
        path = self._run.ckpt_path if self._run.ckpt_step == step else None
        return {
            "step": step,
            "elapsed_s": self._elapsed(),
            "final_loss": self._run.last_loss,
            "best_val_loss": self._run.best_val,
            "adapter_path": path,
        }

    def _failed(
        self, step: int, reason: FailureReason, message: str, error_type: str, suggestions: list[str]
    ) -> RunFailed:
        return RunFailed(
            **self._end_fields(step),
            message=message,
            reason=reason,
            error_type=error_type,
            suggestions=tuple(suggestions),
        )

    def _saved_note(self, step: int) -> str:
        """Where the trained weights are, after the message (nothing when no step was trained)."""
        if step <= self._run.start_step and self._run.ckpt_path is None:
            return ""
        if self._run.ckpt_path is None:
            return (
                " No checkpoint was written (save_strategy); the trained weights are in memory: "
                "hf_trainer.save_model(path) keeps them."
            )
        if self._run.ckpt_step == step:
            return f" Checkpoint of step {step}: {self._run.ckpt_path}."
        return f" Last checkpoint: {self._run.ckpt_path} (step {self._run.ckpt_step}); later steps are in memory only."

    def _check_gradients(self, model: Any, step: int) -> None:
        """Publish the "no gradient" alert if trainable parameters of ``model`` have none (once per run)."""
        self._run.gradients_checked = True
        if isinstance(model, torch.nn.Module):
            alert = no_gradient_alert(gradient_report(model), step)
            if alert is not None:
                self._emit(alert)

    def _clear_controls(self) -> None:
        self.requests.clear()

    def _poll_control(self) -> None:
        """Apply a request written to ``<output_dir>/control.json`` since the last step."""
        if self._control is not None:
            self.requests.apply(self._control.poll())

    def _finish(self, state: RunState, end: RunFinished | RunStopped | RunFailed) -> None:
        self._clear_controls()  # a stop()/pause() never carries over into the next train()
        self.last_event = end
        self._emit(StateChanged(state, end.step))
        self._emit(end)
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._control is not None:
            self._control.discard()  # a request that came too late must not stop the next train()
            self._control = None

    def _open_file(self, args: Any) -> None:
        if (
            not self._metrics_file
            or not self._run.main
            or not getattr(args, "should_save", True)
            or not args.output_dir
        ):
            return  # (under DDP only the world's process zero writes)
        try:
            os.makedirs(args.output_dir, exist_ok=True)
            self._file = MetricsWriter(os.path.join(args.output_dir, METRICS_FILE))
        except OSError:
            logger.exception(
                "cannot open metrics.jsonl in %s; events are not written to disk", args.output_dir
            )
            return
        for event in self._run.unwritten:
            self._file.write(event)
        self._control = ControlReader(args.output_dir)

    def _emit(self, event: Event) -> None:
        if isinstance(event, StateChanged):
            self.state = event.state
        if not self._run.main:  # another rank of a distributed train(): rank 0 reports
            return
        if self._file is None and not self._run.started:
            self._run.unwritten.append(event)
        elif self._file is not None:
            self._file.write(event)
        self._subscribers.deliver(event)
