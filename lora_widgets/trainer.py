"""A headless, asyncio-native training loop for LoRA (or full) fine-tuning of causal language models.

The loop is written in plain phases, nanoGPT-style, so that a student can read what one step does::

    run()                                  on the caller's event loop (a Jupyter kernel's, or asyncio.run's)
                                           -> StateChanged("running")
      prepare data, seed, build optimizer  -> RunStarted
      evaluate at step 0                   -> EvalMetrics
      for each optimizer step:
        honour stop() / pause()            -> StateChanged("paused"/"running")
        await asyncio.to_thread(step)      forward/backward for each grad-accum micro-batch, clip, update
        publish                            -> StepMetrics (every log_every steps), EvalMetrics, CheckpointSaved
      save the adapter, release memory     -> StateChanged(<end>), RunFinished | RunStopped | RunFailed

Why a worker thread per step: the event loop (and with it the Jupyter kernel) stays free while a step
computes, so other cells run and a Stop click is received. Why publish from the loop's thread only:
widget updates sent from other threads never reach the page in Colab (googlecolab/colabtools#3373).

Failures never escape as exceptions: out-of-memory, a non-finite loss, bad input and any other error end
the run with :class:`~lora_widgets.events.RunFailed` (a reason, a message and concrete suggestions), the
adapter of the last completed step is saved, and the model is left usable. Misuse of the API (a second
concurrent ``run()``, ``run_sync()`` inside a running loop) does raise.

Every event is also appended, one JSON line each, to ``<output_dir>/<run_id>/metrics.jsonl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lora_widgets import checkpoint as ckpt
from lora_widgets.devices import describe_device, gpu_utilization, memory_in_use, select_device
from lora_widgets.diagnosis import Diagnosis, error_diagnosis, format_lr, nan_diagnosis, oom_diagnosis
from lora_widgets.events import (
    CheckpointSaved,
    EvalMetrics,
    Event,
    RunEnded,
    RunFailed,
    RunFinished,
    RunStarted,
    RunState,
    RunStopped,
    StateChanged,
    StepMetrics,
)
from lora_widgets.history import History
from lora_widgets.lora import (
    LoRAConfig,
    LoRAReport,
    apply_lora,
    count_parameters,
    has_lora,
    lora_layers,
    remove_lora,
)
from lora_widgets.schedules import lr_at
from lora_widgets.schedules import lr_schedule as _lr_schedule
from lora_widgets.train_config import TrainConfig

__all__ = ["TrainConfig", "Trainer"]

logger = logging.getLogger(__name__)


# torch >= 2.5 has torch.OutOfMemoryError; torch.cuda.OutOfMemoryError is the same class there.
_OOM_TYPES: tuple[type[BaseException], ...] = tuple(
    {t for t in (getattr(torch, "OutOfMemoryError", None), torch.cuda.OutOfMemoryError) if t is not None}
)

# Models being trained right now, so that two Trainers never update one model at the same time.
_ACTIVE_MODELS: weakref.WeakSet[nn.Module] = weakref.WeakSet()

# Set on a model whose adapters a Trainer created, so that a later Trainer may replace them.
_OWNED_MARK = "_lora_widgets_trainer_lora"

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------------
# Per-run working state (lives only while a run is in progress)
# ----------------------------------------------------------------------------------------------------


@dataclass
class _Data:
    train: torch.Tensor  # [n_train, T] token ids (CPU)
    val: torch.Tensor | None  # [n_val, T] or None
    steps_per_epoch: int


@dataclass
class _StepOut:
    loss: float | None  # None on steps that are not logged (no device sync)
    grad_norm: float | None
    memory: tuple[int, int | None] | None
    gpu_util: float | None
    bad_step: int | None  # first update (1-based) with a non-finite loss/gradient, when detected
    skipped_update: bool


class _CancelledAfter(asyncio.CancelledError):
    """The run's task was cancelled while a worker thread ran; ``result`` is what the thread returned
    (``None`` if it raised), so the loop can count a step that finished before the cancellation."""

    def __init__(self, result: Any) -> None:
        super().__init__()
        self.result = result


class _RunContext:
    """Everything one run allocates; dropped as a whole at the end so nothing keeps memory alive."""

    def __init__(self, data: _Data, optimizer: torch.optim.Optimizer, scaler: Any, device: torch.device):
        self.data = data
        self.optimizer = optimizer
        self.scaler = scaler
        self.device = device
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)  # sticky NaN marker
        self.perm_epoch = -1
        self.perm: torch.Tensor | None = None
        self.last_util_t = -1e9
        self.last_util: float | None = None


# ----------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------


class Trainer:
    """Fine-tune ``model`` on ``train_data`` as an asyncio task that streams typed events.

    Args:
        model: a causal LM returning logits (``out.logits``, ``out[0]`` or a tensor) for ``input_ids``.
        tokenizer: needed when the data is text (a corpus name, list of strings, file, dataset).
        train_data: ``LongTensor[n_blocks, block_size]`` of token ids, a ``data.DataSplit`` (its ``val``
            part then serves as validation data), or any source :func:`lora_widgets.data.as_blocks`
            accepts.
        eval_data: validation blocks or source; ``None`` holds out ``config.val_fraction`` of the training
            blocks (deterministically from the seed).
        lora: a :class:`LoRAConfig` to apply adapters now (each ``run()`` re-initialises them from the
            seed), or ``None`` to train whatever already has ``requires_grad`` (adapters you applied
            yourself, a PEFT model, or the whole model for full fine-tuning).
        config: a :class:`TrainConfig`.

    Raises:
        TypeError: a wrong type of model, lora or config.
        ValueError: the model already has adapters the Trainer did not create (with ``lora`` given),
            nothing is trainable, or the precision does not suit the device.
        RuntimeError: the configured device is not available.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        train_data: Any = None,
        eval_data: Any = None,
        lora: LoRAConfig | None = None,
        config: TrainConfig | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if lora is not None and not isinstance(lora, LoRAConfig):
            raise TypeError(f"lora must be a LoRAConfig or None, got {type(lora).__name__}")
        config = TrainConfig() if config is None else config
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if train_data is None:
            raise ValueError(
                "train_data is required: token blocks, a DataSplit, texts, a file or a corpus name"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.train_data = train_data
        self.eval_data = eval_data
        self.config = config
        self.device: torch.device = select_device(config.device)
        self._check_precision()

        self.report: LoRAReport | None = None
        self._owns_lora = False
        if lora is not None:
            if has_lora(model):
                if getattr(model, _OWNED_MARK, False) and lora_layers(model):
                    remove_lora(model)  # adapters a previous Trainer made: replace them
                else:
                    raise ValueError(
                        "this model already has LoRA adapters; pass lora=None to train them as they are, "
                        "or call lora_widgets.remove_lora(model) first to start from the base model"
                    )
            self.report = apply_lora(model, lora)
            setattr(model, _OWNED_MARK, True)
            self._owns_lora = True
        elif has_lora(model):
            trainable, total = count_parameters(model)
            self.report = LoRAReport(sorted(lora_layers(model)), trainable, total, None)
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(
                "the model has no trainable parameters (every requires_grad is False); pass "
                "lora=LoRAConfig(...) to add adapters, or unfreeze the parameters to fine-tune"
            )
        self.lora = lora

        self.state: RunState = "idle"
        self.history = History()
        self.run_dir: Path | None = None
        self.run_id: str | None = None
        self.last_event: RunEnded | None = None
        self._subscribers: list[Callable[[Event], None]] = []
        self._data_cache: _Data | None = None
        self._data_lock = threading.Lock()
        self._running = False
        self._stop_requested = False
        self._pause_requested = False
        self._resume_event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._metrics_file: IO[str] | None = None

    # -- public API --------------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for every event, on the event loop's thread, in order.

        Returns a function that unsubscribes. An exception in a callback is logged and does not stop
        the run.
        """
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    @property
    def running(self) -> bool:
        """True while ``run()`` is in progress (also while paused)."""
        return self._running

    @property
    def total_steps(self) -> int:
        """Optimizer updates the run will make (prepares the data on first use; ``ValueError`` if bad)."""
        return self._total_steps(self._data())

    def lr_schedule(self) -> np.ndarray:
        """Learning rate of every update ``[total_steps]``, exactly as the run will use them.

        Entry ``i`` is the rate of update ``i + 1``, i.e. of the :class:`StepMetrics` with ``step == i + 1``.
        """
        c = self.config
        return _lr_schedule(self.total_steps, c.learning_rate, c.warmup_steps, c.schedule)

    def stop(self) -> None:
        """Ask the run to stop; it ends after the step in progress (at most one more update).

        Safe to call from any thread and when no run is in progress (then it does nothing).
        """
        if not self._running:
            return
        self._stop_requested = True
        self._call_in_loop(self._wake)

    def pause(self) -> None:
        """Pause after the step in progress; :meth:`resume` continues. Safe from any thread."""
        if self._running:
            self._pause_requested = True
            self._call_in_loop(self._clear_resume)

    def resume(self) -> None:
        """Continue a paused run. Safe from any thread."""
        self._pause_requested = False
        if self._running:
            self._call_in_loop(self._wake)

    async def run(self, resume_from: str | os.PathLike[str] | None = None) -> RunEnded:
        """Train to the end (or until stopped or failed) and return the final event.

        ``resume_from``: a checkpoint directory (``<run_dir>/checkpoints/step-NNNNNN``); the run continues
        from its step with its optimizer, schedule, data order and RNG state, in a new run directory.

        Raises:
            RuntimeError: this Trainer (or another one on the same model) is already running.
        """
        if self._running:
            raise RuntimeError(
                "this Trainer is already running; wait for it (await the first run) or call stop() "
                "before starting another run"
            )
        if self.model in _ACTIVE_MODELS:
            raise RuntimeError("another Trainer is training this model right now; stop it first")
        self._running = True
        _ACTIVE_MODELS.add(self.model)
        self._loop = asyncio.get_running_loop()
        self._stop_requested = False
        self._pause_requested = False
        self._resume_event = asyncio.Event()
        self._resume_event.set()
        try:
            end = await self._run(resume_from)
            self.last_event = end
            return end
        finally:
            _ACTIVE_MODELS.discard(self.model)
            self._running = False
            self._resume_event = None
            self._loop = None

    def run_sync(self, resume_from: str | os.PathLike[str] | None = None) -> RunEnded:
        """Run to the end from a script (blocks). In a notebook use ``await trainer.run()`` instead."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.run(resume_from))
        raise RuntimeError(
            "run_sync() cannot be used while an event loop is running (as in a Jupyter cell); "
            "use `await trainer.run()` there, or `asyncio.get_running_loop().create_task(trainer.run())` "
            "to train in the background"
        )

    def save_adapter(self, path: str | os.PathLike[str]) -> Path:
        """Save the trained weights now (PEFT-format adapter for LoRA). Not while a step is in flight."""
        if self._running and self.state != "paused":
            raise RuntimeError("the run is in progress; pause() or stop() it before saving")
        return ckpt.save_trained_weights(self.model, path, self._base_name())

    # -- loop-thread helpers -------------------------------------------------------------------------

    def _call_in_loop(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            fn()
        else:
            with contextlib.suppress(RuntimeError):  # loop closed in between
                loop.call_soon_threadsafe(fn)

    def _wake(self) -> None:
        if self._resume_event is not None:
            self._resume_event.set()

    def _clear_resume(self) -> None:
        if self._resume_event is not None and self._pause_requested:
            self._resume_event.clear()

    def _publish(self, event: Event) -> None:
        """Record ``event`` (state, history, metrics.jsonl) and hand it to every subscriber, in order."""
        if isinstance(event, StateChanged):
            self.state = event.state
        if isinstance(event, StepMetrics | EvalMetrics):
            self.history.append(event)
        if self._metrics_file is not None:
            try:
                self._metrics_file.write(json.dumps(event.to_dict()) + "\n")
                self._metrics_file.flush()
            except OSError:
                logger.exception("could not append to metrics.jsonl")
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:
                logger.exception("a Trainer subscriber raised on %s; the run continues", event.kind)

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``await asyncio.to_thread(fn, *args)``, but if this task is cancelled the thread is still awaited
        (so that nothing touches the model while clean-up runs) before the cancellation propagates, as a
        :class:`_CancelledAfter` carrying what the thread returned (so a finished step is counted)."""
        task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            self._stop_requested = True
            with contextlib.suppress(BaseException):
                await task
            finished = task.done() and not task.cancelled() and task.exception() is None
            raise _CancelledAfter(task.result() if finished else None) from None

    # -- data ----------------------------------------------------------------------------------------

    def _data(self) -> _Data:
        with self._data_lock:
            if self._data_cache is None:
                self._data_cache = self._prepare_data()
            return self._data_cache

    def _prepare_data(self) -> _Data:
        from lora_widgets import data as data_mod  # heavy deps (tokenizers) only when needed

        c = self.config
        train, val = data_mod.train_val_blocks(  # [n, T], [n_val, T] or None
            self.train_data, self.eval_data, self.tokenizer, c.block_size, c.val_fraction, c.seed
        )
        vocab = self._vocab_size()
        for name, blocks in (("train_data", train), ("eval_data", val)):
            if blocks is not None and vocab is not None and int(blocks.max()) >= vocab:
                raise ValueError(
                    f"{name} holds token id {int(blocks.max())} but the model's vocabulary has {vocab} "
                    "entries; tokenise with the model's own tokenizer"
                )
        if val is not None and val.shape[1] != train.shape[1]:
            raise ValueError(
                f"eval_data blocks have {val.shape[1]} tokens but train_data blocks {train.shape[1]}; use one block_size"
            )
        micro = train.shape[0] // c.batch_size
        steps_per_epoch = micro // c.grad_accum_steps
        if steps_per_epoch < 1:
            need = c.batch_size * c.grad_accum_steps
            raise ValueError(
                f"train_data has {train.shape[0]} block(s) of {train.shape[1]} tokens, fewer than one "
                f"update needs (batch_size {c.batch_size} x grad_accum_steps {c.grad_accum_steps} = {need}); "
                "lower batch_size or grad_accum_steps, lower block_size, or add data"
            )
        return _Data(train=train, val=val, steps_per_epoch=steps_per_epoch)

    def _vocab_size(self) -> int | None:
        get = getattr(self.model, "get_input_embeddings", None)
        if callable(get):
            with contextlib.suppress(Exception):
                emb = get()
                if isinstance(emb, nn.Embedding):
                    return int(emb.num_embeddings)
        return None

    def _total_steps(self, data: _Data) -> int:
        c = self.config
        return c.max_steps if c.max_steps is not None else c.epochs * data.steps_per_epoch

    def _batch(self, ctx: _RunContext, micro_index: int) -> torch.Tensor:
        """Micro-batch number ``micro_index`` (global, 0-based) as ``LongTensor[B, T]`` on the device.

        Each epoch visits the training blocks in a fresh order drawn from a generator seeded by
        (seed, epoch) alone, so the order depends on nothing else and a resumed run sees the same batches.
        """
        c = self.config
        per_epoch = ctx.data.steps_per_epoch * c.grad_accum_steps  # micro-batches used per epoch
        epoch, pos = divmod(micro_index, per_epoch)
        if epoch != ctx.perm_epoch:
            g = torch.Generator().manual_seed((c.seed * 1_000_003 + epoch) % 2**63)
            ctx.perm = torch.randperm(ctx.data.train.shape[0], generator=g)
            ctx.perm_epoch = epoch
        assert ctx.perm is not None
        idx = ctx.perm[pos * c.batch_size : (pos + 1) * c.batch_size]  # [B]
        return ctx.data.train[idx].to(ctx.device, non_blocking=True)  # [B, T]

    # -- model helpers -------------------------------------------------------------------------------

    def _check_precision(self) -> None:
        p, d = self.config.precision, self.device
        if p == "fp16" and d.type != "cuda":
            raise ValueError(
                f"TrainConfig.precision='fp16' needs a CUDA GPU (it uses a GradScaler); the device is "
                f"{d.type!r}. Use precision='bf16' or 'fp32' here"
            )
        if p == "bf16" and d.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(
                "TrainConfig.precision='bf16' is not supported by this GPU (it needs compute capability "
                ">= 8.0, e.g. A100/L4/H100); use precision='fp16' on a T4/V100"
            )

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        p = self.config.precision
        if p == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if p == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _forward_loss(self, x: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy of ``x`` [B, T] (mean over the B*(T-1) predicted tokens, or sum)."""
        kwargs: dict[str, Any] = {}
        if getattr(getattr(self.model, "config", None), "use_cache", None) is not None:
            kwargs["use_cache"] = False  # no KV cache while training
        with self._autocast():
            out = self.model(input_ids=x, **kwargs)
        logits = (
            out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out
        )  # [B, T, V]
        # Targets are x shifted left by one; the last position has none (-100 is ignored). Padding the
        # targets instead of slicing the logits avoids copying the [B, T, V] logits.
        targets = F.pad(x[:, 1:], (0, 1), value=-100)  # [B, T]
        return F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction=reduction
        )

    def _checkpointing_enabled(self) -> bool:
        for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5 / 4
            if hasattr(type(self.model), name):
                return bool(getattr(self.model, name))
        return False

    def _checkpointing_method(self, action: str) -> Callable[..., Any] | None:
        """``model.activation_checkpointing_<action>`` (transformers 5) or ``gradient_checkpointing_<action>``."""
        for prefix in ("activation", "gradient"):
            method = getattr(self.model, f"{prefix}_checkpointing_{action}", None)
            if callable(method):
                return method
        return None

    def _base_name(self) -> str | None:
        name = getattr(getattr(self.model, "config", None), "_name_or_path", None)
        return str(name) if name else None

    def _lora_rank(self) -> int | None:
        if self.report is not None and self.report.config is not None:
            return self.report.config.r
        layers = lora_layers(self.model)
        return next(iter(layers.values())).r if layers else None

    # -- phases run in the worker thread --------------------------------------------------------------

    def _setup(self, resume_from: str | os.PathLike[str] | None) -> tuple[_RunContext, int, dict[str, Any]]:
        """Seed, (re)initialise adapters, move to the device, build the optimizer; restore a checkpoint."""
        c = self.config
        data = self._data()
        ckpt.seed_everything(c.seed)
        model = self.model
        if self._owns_lora and resume_from is None:
            for layer in lora_layers(model).values():  # fresh adapters drawn from the seed
                layer.reset_lora_parameters()
        model.to(self.device)
        if self.report is not None:
            # Keep adapter factors in fp32 (as PEFT does) so fp16/bf16 bases train with a GradScaler.
            for p in model.parameters():
                if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
                    p.data = p.data.float()
        elif c.precision == "fp16" and any(
            p.requires_grad and p.dtype == torch.float16 for p in model.parameters()
        ):
            raise ValueError(
                "full fine-tuning of float16 weights with precision='fp16' cannot use a GradScaler; load "
                "the model in float32 (mixed precision keeps fp32 master weights) or use LoRA"
            )
        if c.gradient_checkpointing:
            enable = self._checkpointing_method("enable")
            if enable is None:
                raise ValueError(
                    f"gradient_checkpointing=True but {type(model).__name__} has no gradient_checkpointing_enable(); "
                    "use a transformers model or set gradient_checkpointing=False"
                )
            if getattr(enable, "__name__", "").startswith("activation"):
                enable()  # transformers 5: non-reentrant by default
            else:
                enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        params = ckpt.trainable_parameters(model)
        decay = [p for _, p in params if p.dim() >= 2]
        no_decay = [p for _, p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": c.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        optimizer = torch.optim.AdamW(groups, lr=c.learning_rate, betas=(0.9, 0.999), eps=1e-8)
        scaler: Any = None
        if (
            c.precision == "fp16"
        ):  # loss scaling (Micikevicius et al. 2018, "Mixed Precision Training", sec. 3.2)
            amp_scaler = getattr(torch.amp, "GradScaler", None)  # torch >= 2.3; torch.cuda.amp before
            scaler = amp_scaler("cuda") if amp_scaler is not None else torch.cuda.amp.GradScaler()
        ctx = _RunContext(data, optimizer, scaler, self.device)
        start_step = 0
        info: dict[str, Any] = {}
        if resume_from is not None:
            state = ckpt.load_checkpoint(resume_from, model, optimizer, scaler)
            start_step = state.step
            info = {"resumed_from": str(state.path), "resumed_step": state.step}
            state.restore_rng()
            self._load_earlier_history(state.path, state.step)
        model.train()
        return ctx, start_step, info

    def _load_earlier_history(self, checkpoint_dir: Path, step: int) -> None:
        """Put the checkpointed run's metrics up to ``step`` into :attr:`history`, so that plots of a
        resumed run show the whole curve (read from ``<run_dir>/metrics.jsonl`` when it is there)."""
        from lora_widgets.events import event_from_dict

        metrics = checkpoint_dir.parent.parent / "metrics.jsonl"
        if not metrics.is_file():
            return
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError), open(metrics) as f:
            for line in f:
                event = event_from_dict(json.loads(line))
                if isinstance(event, StepMetrics | EvalMetrics) and event.step <= step:
                    self.history.append(event)

    def _train_step(self, ctx: _RunContext, step: int, log: bool) -> _StepOut:
        """One optimizer update (0-based ``step``): grad-accum micro-batches, clip, AdamW step.

        Non-finite check, chosen to avoid a GPU sync on steps that are not logged: a device-side marker
        records the first update whose loss (or gradient norm, outside fp16) was NaN/inf. On logged steps
        the loss, gradient norm and marker are read in one transfer *before* the update is applied, so a
        NaN appearing on a logged step never reaches the weights; one appearing on an unlogged step is
        caught at the next logged step (within ``log_every`` updates). With the default ``log_every=1``
        every update is checked before it is applied.
        """
        c, opt = self.config, ctx.optimizer
        lr = lr_at(step, self._total_steps(ctx.data), c.learning_rate, c.warmup_steps, c.schedule)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=ctx.device)
        for m in range(c.grad_accum_steps):
            x = self._batch(ctx, step * c.grad_accum_steps + m)  # [B, T]
            loss = self._forward_loss(x) / c.grad_accum_steps
            if ctx.scaler is not None:
                ctx.scaler.scale(loss).backward()
            else:
                loss.backward()
            loss_sum += loss.detach()
            del loss, x
        if ctx.scaler is not None:
            ctx.scaler.unscale_(opt)
        params = [p for g in opt.param_groups for p in g["params"]]
        max_norm = c.max_grad_norm if c.max_grad_norm is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        # fp16 overflows are routine: the GradScaler skips those updates itself, so only the loss counts.
        finite = (
            torch.isfinite(loss_sum)
            if ctx.scaler is not None
            else torch.isfinite(loss_sum) & torch.isfinite(grad_norm)
        )
        ctx.first_bad = torch.where((ctx.first_bad < 0) & ~finite, step + 1, ctx.first_bad)
        out = _StepOut(None, None, None, None, None, False)
        if log:
            loss_v, norm_v, bad_v = torch.stack(
                [loss_sum.float(), grad_norm.float(), ctx.first_bad.float()]
            ).tolist()
            out.loss, out.grad_norm = loss_v, norm_v
            if bad_v >= 0:
                out.bad_step = int(bad_v)
                out.skipped_update = int(bad_v) == step + 1
                opt.zero_grad(set_to_none=True)
                return out
        if ctx.scaler is not None:
            ctx.scaler.step(opt)
            ctx.scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        if log:
            out.memory = memory_in_use(ctx.device)
            if ctx.device.type == "cuda" and time.monotonic() - ctx.last_util_t > 1.0:
                ctx.last_util = gpu_utilization(ctx.device)  # at most once a second (nvidia-smi is slow)
                ctx.last_util_t = time.monotonic()
            out.gpu_util = ctx.last_util
        return out

    @torch.no_grad()
    def _evaluate(self, ctx: _RunContext) -> float:
        """Mean next-token cross-entropy over the first ``eval_batches`` validation batches (fixed order)."""
        val = ctx.data.val
        assert val is not None
        c = self.config
        n_batches = -(-val.shape[0] // c.batch_size)
        if c.eval_batches is not None:
            n_batches = min(n_batches, c.eval_batches)
        self.model.eval()
        try:
            total = torch.zeros((), dtype=torch.float64, device=ctx.device)
            count = 0
            for i in range(n_batches):
                x = val[i * c.batch_size : (i + 1) * c.batch_size].to(ctx.device)  # [b, T]
                total += self._forward_loss(x, reduction="sum").double()
                count += x.shape[0] * (x.shape[1] - 1)
            return float(total.item()) / max(count, 1)
        finally:
            self.model.train()

    def _save_checkpoint(self, ctx: _RunContext, step: int, run_info: dict[str, Any]) -> Path:
        assert self.run_dir is not None
        extra = {
            "config": self.config.to_dict(),
            "lora": self.lora.to_dict() if self.lora is not None else None,
            "run_id": self.run_id,
            "data_position": {
                "micro_batch": step * self.config.grad_accum_steps,
                "epoch": step // ctx.data.steps_per_epoch,
                "step_in_epoch": step % ctx.data.steps_per_epoch,
            },
            **run_info,
        }
        path = self.run_dir / "checkpoints" / f"step-{step:06d}"
        return ckpt.save_checkpoint(path, self.model, ctx.optimizer, step, extra, ctx.scaler)

    def _save_final(self) -> tuple[str | None, str]:
        """Save the trained weights to ``run_dir/adapter``; returns (path, note for the message)."""
        assert self.run_dir is not None
        bad = [n for n, p in ckpt.trainable_parameters(self.model) if not bool(torch.isfinite(p).all())]
        if bad:
            return None, f" The weights hold non-finite values ({bad[0]}, ...), so no adapter was saved."
        try:
            path = ckpt.save_trained_weights(self.model, self.run_dir / "adapter", self._base_name())
        except Exception as exc:
            logger.exception("saving the final adapter failed")
            return None, f" Saving the adapter failed: {type(exc).__name__}: {exc}."
        return str(path), ""

    def _cleanup(self, was_training: bool, gc_enabled_before: bool, failed: bool) -> None:
        """Release gradients and cached memory; restore the model's mode.

        The optimizer state and activations are freed by reference counting once the run context is
        dropped. A full ``gc.collect()`` (a few hundred ms in a large process, blocking the loop) runs only
        when a failure's traceback may hold tensors in reference cycles, or before CUDA's ``empty_cache``.
        """
        for p in self.model.parameters():
            p.grad = None
        if self.config.gradient_checkpointing and not gc_enabled_before:
            disable = self._checkpointing_method("disable")
            if disable is not None:
                with contextlib.suppress(Exception):
                    disable()
        self.model.train(was_training)
        if failed or self.device.type != "cpu":
            gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        elif self.device.type == "mps":
            with contextlib.suppress(Exception):
                torch.mps.empty_cache()

    # -- failure reports (the wording lives in diagnosis.py) ------------------------------------------

    def _oom_failure(self, step: int, exc: BaseException) -> Diagnosis:
        seq = self._data_cache.train.shape[1] if self._data_cache is not None else self.config.block_size
        return oom_diagnosis(
            exc,
            step,
            config=self.config,
            device=self.device,
            model=self.model,
            lora=self.report.config if self.report is not None else None,
            seq_len=int(seq),
        )

    def _nan_failure(self, bad_step: int, skipped: bool) -> Diagnosis:
        return nan_diagnosis(bad_step, skipped, config=self.config, total_steps=self.total_steps)

    # -- run directory ---------------------------------------------------------------------------------

    def _make_run_dir(self) -> None:
        c = self.config
        rank = self._lora_rank()
        tag = f"r{rank}" if rank is not None else ("lora" if self.report is not None else "full")
        stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{tag}-lr{format_lr(c.learning_rate)}"
        root = Path(c.output_dir)
        root.mkdir(parents=True, exist_ok=True)
        for n in range(1, 10_000):
            run_id = stem if n == 1 else f"{stem}-{n}"
            try:
                (root / run_id).mkdir()
            except FileExistsError:
                continue
            self.run_id, self.run_dir = run_id, root / run_id
            return
        raise RuntimeError(f"could not create a unique run directory under {str(root)!r}")

    def _write_config(self, resume_from: Any, data: _Data | None) -> None:
        assert self.run_dir is not None
        import lora_widgets

        trainable, total = count_parameters(self.model)
        doc = {
            "run_id": self.run_id,
            "train": self.config.to_dict(),
            "lora": self.lora.to_dict() if self.lora is not None else None,
            "model": {"class": type(self.model).__name__, "name_or_path": self._base_name()},
            "trainable_params": trainable,
            "total_params": total,
            "device": str(self.device),
            "device_name": describe_device(self.device),
            "resumed_from": str(resume_from) if resume_from is not None else None,
            "data": None
            if data is None
            else {
                "train_blocks": int(data.train.shape[0]),
                "val_blocks": int(data.val.shape[0]) if data.val is not None else 0,
                "block_size": int(data.train.shape[1]),
                "steps_per_epoch": data.steps_per_epoch,
            },
            "versions": {"lora_widgets": lora_widgets.__version__, "torch": torch.__version__},
        }
        tmp = self.run_dir / ".config.json.tmp"
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, self.run_dir / "config.json")

    # -- the run ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _metrics_log(self) -> Iterator[None]:
        assert self.run_dir is not None
        self._metrics_file = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        try:
            yield
        finally:
            self._metrics_file.close()
            self._metrics_file = None

    async def _run(self, resume_from: str | os.PathLike[str] | None) -> RunEnded:
        c = self.config
        self.history = History()
        self._make_run_dir()
        with self._metrics_log():
            return await self._run_logged(resume_from, c)

    async def _run_logged(self, resume_from: str | os.PathLike[str] | None, c: TrainConfig) -> RunEnded:
        t_start = time.monotonic()
        paused_s = 0.0
        model = self.model
        was_training = model.training
        gc_before = c.gradient_checkpointing and self._checkpointing_enabled()
        ctx: _RunContext | None = None
        step = 0
        start_step = 0
        total = 0
        last_loss: float | None = None
        best_val: float | None = None
        failure: Diagnosis | None = None
        cancelled = False
        last_eval_step = -1
        last_ckpt_step = -1
        run_info: dict[str, Any] = {}

        def elapsed() -> float:
            return time.monotonic() - t_start - paused_s

        async def evaluate(at_step: int) -> None:
            nonlocal best_val, last_eval_step
            assert ctx is not None
            val_loss = await self._in_thread(self._evaluate, ctx)
            last_eval_step = at_step
            if math.isfinite(val_loss):
                best_val = val_loss if best_val is None else min(best_val, val_loss)
            ppl = math.exp(val_loss) if val_loss < 700 else math.inf
            self._publish(EvalMetrics(at_step, val_loss, ppl, best_val if best_val is not None else val_loss))

        async def checkpoint(at_step: int) -> None:
            nonlocal last_ckpt_step
            assert ctx is not None
            path = await self._in_thread(self._save_checkpoint, ctx, at_step, run_info)
            last_ckpt_step = at_step
            self._publish(CheckpointSaved(at_step, str(path)))

        # Phase 1: data (bad input ends the run before it starts).
        self._publish(StateChanged("running", 0))  # at once, so a UI shows the click was taken
        data: _Data | None = None
        try:
            data = await self._in_thread(self._data)
        except (ValueError, TypeError, FileNotFoundError) as exc:
            failure = error_diagnosis(exc, 0, bad_input=True)
        except asyncio.CancelledError:
            cancelled = True
        except Exception as exc:
            logger.exception("preparing the data failed")
            failure = error_diagnosis(exc, 0, bad_input=True)
        self._write_config(resume_from, data)

        try:
            # Phase 2: seed, adapters, optimizer, checkpoint.
            if data is not None and failure is None and not cancelled:
                try:
                    ctx, start_step, run_info = await self._in_thread(self._setup, resume_from)
                except (ValueError, FileNotFoundError) as exc:  # an unsuitable model or checkpoint
                    failure = error_diagnosis(exc, 0, bad_input=True)
                except _OOM_TYPES as exc:  # e.g. the model does not fit on the GPU at all
                    failure = self._oom_failure(-1, exc)
                    del exc
                step = start_step
            if ctx is not None and data is not None:
                total = self._total_steps(data)
                trainable, total_params = count_parameters(model)
                tokens_per_step = c.batch_size * c.grad_accum_steps * int(data.train.shape[1])
                assert self.run_id is not None and self.run_dir is not None
                self._publish(
                    RunStarted(
                        run_id=self.run_id,
                        run_dir=str(self.run_dir),
                        config=c.to_dict(),
                        lora=self.lora.to_dict() if self.lora is not None else None,
                        device=str(self.device),
                        device_name=describe_device(self.device),
                        trainable_params=trainable,
                        total_params=total_params,
                        total_steps=total,
                        tokens_per_step=tokens_per_step,
                        time=time.time(),
                    )
                )
                if data.val is not None and step == 0:
                    await evaluate(0)  # the base model's validation loss, for comparison

                # Phase 3: the loop.
                log_t, log_step = elapsed(), step
                while step < total:
                    if self._stop_requested:
                        break
                    assert self._resume_event is not None
                    if not self._resume_event.is_set():
                        self._publish(StateChanged("paused", step))
                        t_pause = time.monotonic()
                        await self._resume_event.wait()
                        paused_s += time.monotonic() - t_pause
                        if self._stop_requested:
                            break
                        self._publish(StateChanged("running", step))
                    is_log = (step + 1) % c.log_every == 0 or step + 1 == total
                    try:
                        out = await self._in_thread(self._train_step, ctx, step, is_log)
                    except _CancelledAfter as cancel:
                        done = cancel.result
                        if isinstance(done, _StepOut) and done.bad_step is None:
                            step += 1  # the step's update was applied before the cancellation took effect
                            last_loss = done.loss if done.loss is not None else last_loss
                        raise
                    except _OOM_TYPES as exc:
                        failure = self._oom_failure(step, exc)
                        del exc
                        break
                    except RuntimeError as exc:
                        if "out of memory" in str(exc).lower():  # MPS and older CUDA builds
                            failure = self._oom_failure(step, exc)
                        else:
                            logger.exception("training step %d failed", step + 1)
                            failure = error_diagnosis(exc, step)
                        del exc
                        break
                    except Exception as exc:
                        logger.exception("training step %d failed", step + 1)
                        failure = error_diagnosis(exc, step)
                        del exc
                        break
                    if out.bad_step is not None:
                        failure = self._nan_failure(out.bad_step, out.skipped_update)
                        step = out.bad_step - 1 if out.skipped_update else step + 1
                        break
                    step += 1
                    if is_log:
                        assert out.loss is not None and out.grad_norm is not None
                        now = elapsed()
                        tok_s = (step - log_step) * tokens_per_step / max(now - log_t, 1e-9)
                        log_t, log_step = now, step
                        done = step - start_step
                        eta = (total - step) * now / max(done, 1)
                        last_loss = out.loss
                        mem, reserved = out.memory if out.memory is not None else (0, None)
                        self._publish(
                            StepMetrics(
                                step=step,
                                total_steps=total,
                                epoch=step / data.steps_per_epoch,
                                loss=out.loss,
                                learning_rate=lr_at(
                                    step - 1, total, c.learning_rate, c.warmup_steps, c.schedule
                                ),
                                grad_norm=out.grad_norm,
                                tokens_per_s=tok_s,
                                elapsed_s=now,
                                eta_s=eta,
                                memory_bytes=mem,
                                memory_reserved_bytes=reserved,
                                gpu_utilization=out.gpu_util,
                            )
                        )
                    if data.val is not None and c.eval_every is not None and step % c.eval_every == 0:
                        await evaluate(step)
                    if c.checkpoint_every is not None and step % c.checkpoint_every == 0:
                        await checkpoint(step)

                # Phase 4: closing evaluation and checkpoint of a run that ended normally.
                if (
                    failure is None
                    and not self._stop_requested
                    and data.val is not None
                    and last_eval_step != step
                ):
                    await evaluate(step)
                if (
                    failure is None
                    and c.checkpoint_every is not None
                    and last_ckpt_step != step
                    and step > start_step
                ):
                    await checkpoint(step)
        except asyncio.CancelledError:
            cancelled = True
        except Exception as exc:  # an error outside the step (evaluation, checkpoint writing, ...)
            logger.exception("the run failed")
            failure = error_diagnosis(exc, step)
            del exc

        # Phase 5: save, release, report. Runs however the run ended.
        adapter_path: str | None = None
        note = ""
        if ctx is not None:
            try:
                adapter_path, note = await asyncio.shield(asyncio.to_thread(self._save_final))
            except asyncio.CancelledError:
                cancelled = True
        ctx = None  # drops the optimizer state, the scaler and the data-order permutation
        self._cleanup(was_training, gc_before, failure is not None or cancelled)
        end: RunEnded
        base: dict[str, Any] = {
            "step": step,
            "elapsed_s": elapsed(),
            "final_loss": last_loss,
            "best_val_loss": best_val,
            "adapter_path": adapter_path,
        }
        if failure is not None:
            self._publish(StateChanged("failed", step))
            end = RunFailed(
                **base,
                message=failure.message + note,
                reason=failure.reason,
                error_type=failure.error_type,
                suggestions=tuple(failure.suggestions),
            )
        elif cancelled or step < total:  # a stop() that arrives after the last step changes nothing
            self._publish(StateChanged("stopped", step))
            why = "cancelled" if cancelled else "stopped by the user"
            end = RunStopped(**base, message=f"Run {why} after step {step}.{note}")
        else:
            self._publish(StateChanged("finished", step))
            end = RunFinished(**base, message=f"Finished {step} steps in {elapsed():.1f} s.{note}")
        self._publish(end)
        if cancelled:
            self.last_event = end
            raise asyncio.CancelledError
        return end
