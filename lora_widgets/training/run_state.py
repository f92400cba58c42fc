"""One run's working state: where it stands (:class:`Progress`) and what it allocated (:class:`Session`).

A :class:`Session` holds the optimizer, the loss scaler, the batch order and the non-finite marker of
one run and nothing else, so that dropping it at the end frees all of them at once. Its methods are the
blocking phases the trainer runs in a worker thread: :meth:`Session.open` (seed, adapters, model,
optimizer, checkpoint) and :meth:`Session.update` (one optimizer update); it also words the run's
:class:`~lora_widgets.events.types.RunStarted` and :class:`~lora_widgets.events.types.StepMetrics`, and
:func:`ending` words its terminal event.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lora_widgets.devices import describe_device
from lora_widgets.events.types import (
    EvalMetrics,
    RunEarlyStopped,
    RunFailed,
    RunFinished,
    RunStarted,
    RunState,
    RunStopped,
    StepMetrics,
)
from lora_widgets.lora.layers import LoRAConfig, count_parameters, lora_layers
from lora_widgets.training import checkpoint as ckpt
from lora_widgets.training import precision
from lora_widgets.training.batches import BatchOrder, Blocks, data_position, resolve_packing
from lora_widgets.training.config import TrainConfig
from lora_widgets.training.diagnosis import Diagnosis, Phase
from lora_widgets.training.distributed import World
from lora_widgets.training.early_stopping import Verdict
from lora_widgets.training.meter import DeviceUsage, Lap
from lora_widgets.training.packed_attention import switch_to_packed_sdpa
from lora_widgets.training.run_dir import read_metrics
from lora_widgets.training.schedules import lr_at
from lora_widgets.training.step import Probe, StepResult, make_optimizer, train_step

__all__ = ["Progress", "Session", "Usage", "ending"]

Usage = tuple[int, int | None, float | None]  # memory bytes, reserved bytes, GPU utilisation %


@dataclass
class Progress:
    """Where a run stands. ``step`` counts completed updates (the events' numbering); the worker thread
    advances it as it applies each update, so it is right however the run ends (even cancelled mid-step)."""

    phase: Phase = "data"
    step: int = 0
    start_step: int = 0
    total: int = 0
    last_loss: float | None = None
    best_val: float | None = None
    evaluated_at: int = -1
    checkpointed_at: int = -1
    failure: Diagnosis | None = None
    cancelled: bool = False


@dataclass
class Session:
    """Everything one run allocates; dropped as a whole at the end so that nothing keeps memory alive."""

    model: nn.Module
    config: TrainConfig
    blocks: Blocks
    order: BatchOrder
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: Callable[[], contextlib.AbstractContextManager[Any]]
    usage: DeviceUsage
    first_bad: torch.Tensor  # [] long: first update with a non-finite loss, -1 while none
    world: World = field(default_factory=World)  # the processes of a multi-process run (one by default)
    ddp: DistributedDataParallel | None = None  # the model as DDP runs it, for the passes of an update
    earlier: list[StepMetrics | EvalMetrics] = field(default_factory=list)  # a resumed run's history
    resume_info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(
        cls,
        model: nn.Module,
        config: TrainConfig,
        device: torch.device,
        blocks: Blocks,
        progress: Progress,
        *,
        adapters: bool,
        fresh_adapters: bool,
        resume_from: str | os.PathLike[str] | None,
        world: World | None = None,
    ) -> Session:
        """(worker thread) Seed; draw fresh adapters (``fresh_adapters``, unless resuming); put the model on
        ``device``; build the optimizer and scaler; restore a checkpoint (``resume_from``) into them; in a
        multi-process run (``world``), wrap the model in DDP and take this rank's share of each batch."""
        world = world or World()
        c = config
        ckpt.seed_everything(c.seed)
        if fresh_adapters and resume_from is None:
            for layer in lora_layers(model).values():  # fresh adapters drawn from the seed
                layer.reset_lora_parameters()
        precision.prepare_model(
            model,
            device,
            adapters=adapters,
            precision=c.precision,
            gradient_checkpointing=c.gradient_checkpointing,
        )
        session = cls(
            model=model,
            config=c,
            blocks=blocks,
            order=BatchOrder(
                blocks,
                world.data_config(c),
                device,
                resolve_packing(c.packing, model),
                (world.rank, world.size),
            ),
            optimizer=make_optimizer(model, c),
            scaler=precision.grad_scaler(c.precision, device),
            autocast=precision.autocast(c.precision, device),
            usage=DeviceUsage(device),
            first_bad=torch.full((), -1, dtype=torch.long, device=device),
            world=world,
        )
        if session.order.packed:  # SDPA attends per example in packed rows, not over the whole row's mask
            switch_to_packed_sdpa(model)  # put back by the run's ModelMode.restore
        if resume_from is not None:
            state = ckpt.load_checkpoint(resume_from, model, session.optimizer, session.scaler)
            progress.step = progress.start_step = state.step
            session.resume_info = {"resumed_from": str(state.path), "resumed_step": state.step}
            session.earlier = read_metrics(state.path, state.step)
            state.restore_rng()
        session.ddp = world.wrap(
            model, device
        )  # after a checkpoint's weights are in (rank 0's are broadcast)
        return session

    def lr(self, step: int, total: int) -> float:
        """Rate of update ``step`` (1-based; the schedule counts from 0)."""
        c = self.config
        return lr_at(step - 1, total, c.learning_rate, c.warmup_steps, c.schedule)

    def update(
        self, progress: Progress, read: bool, probe: Probe | None = None
    ) -> tuple[StepResult, Usage | None]:
        """(worker thread) Update number ``progress.step + 1``; counts it in ``progress`` once applied.
        With ``read``: the loss and gradient norm, and the device's memory afterwards; with ``probe``, what it
        found (``StepResult.probed``); on the run's first update, which parameters got a gradient
        (``StepResult.gradients``)."""
        step = progress.step + 1
        out = train_step(
            self.model,
            self.optimizer,
            self.scaler,
            self.order.micro_batches(step),
            step=step,
            lr=self.lr(step, progress.total),
            max_grad_norm=self.config.max_grad_norm,
            autocast=self.autocast,
            first_bad=self.first_bad,
            read=read,
            probe=probe,
            check_gradients=step == progress.start_step + 1,  # the first update of this run
            world=self.world,
            ddp=self.ddp,
        )
        if out.applied:
            progress.step = step
            progress.last_loss = out.loss if out.loss is not None else progress.last_loss
        return out, (self.usage.sample() if read else None)

    def tokens_per_step(self) -> int:
        """Tokens one update consumes, on every rank together."""
        return self.blocks.tokens_per_step(
            self.config.batch_size * self.world.size, self.config.grad_accum_steps
        )

    def step_metrics(self, progress: Progress, out: StepResult, usage: Usage | None, lap: Lap) -> StepMetrics:
        """The event of a read update."""
        assert out.loss is not None and out.grad_norm is not None and usage is not None
        memory, reserved, utilization = usage
        p = progress
        return StepMetrics(
            step=p.step,
            total_steps=p.total,
            epoch=p.step / self.blocks.steps_per_epoch,
            loss=out.loss,
            learning_rate=self.lr(p.step, p.total),
            grad_norm=out.grad_norm,
            tokens_per_s=lap.tokens_per_s,
            elapsed_s=lap.elapsed_s,
            eta_s=lap.eta_s,
            memory_bytes=memory,
            memory_reserved_bytes=reserved,
            gpu_utilization=utilization,
        )

    def run_started(
        self, progress: Progress, run_id: str, run_dir: Path, lora: LoRAConfig | None, device: torch.device
    ) -> RunStarted:
        """The event that opens the run: what it trains, where, and how long it will take."""
        c = self.config
        trainable, total_params = count_parameters(self.model)
        return RunStarted(
            run_id=run_id,
            run_dir=str(run_dir),
            config=c.to_dict() | ({"world_size": self.world.size} if self.world.distributed else {}),
            lora=lora.to_dict() if lora is not None else None,
            device=str(device),
            device_name=describe_device(device),
            trainable_params=trainable,
            total_params=total_params,
            total_steps=progress.total,
            tokens_per_step=self.tokens_per_step(),
            time=time.time(),
        )

    def checkpoint_extra(self, step: int, lora: dict[str, Any] | None, run_id: str | None) -> dict[str, Any]:
        """What a checkpoint stores besides the tensors: the settings and where the data stands."""
        return {
            "config": self.config.to_dict(),
            "lora": lora,
            "run_id": run_id,
            "data_position": data_position(step, self.config, self.blocks.steps_per_epoch),
            **self.resume_info,
        }


def ending(
    p: Progress, verdict: Verdict | None, elapsed_s: float, adapter: str | None, saved: str, note: str
) -> tuple[RunState, RunFinished | RunEarlyStopped | RunStopped | RunFailed]:
    """How a run ended, from where it stands: the end state and the terminal event (failed, stopped early by
    the ``verdict`` of early stopping, stopped or cancelled, or finished); ``note`` closes its message."""
    base: dict[str, Any] = {
        "step": p.step,
        "elapsed_s": elapsed_s,
        "final_loss": p.last_loss,
        "best_val_loss": p.best_val,
        "adapter_path": adapter,
        "saved": saved,
    }
    if (f := p.failure) is not None:
        failed = RunFailed(
            **base,
            message=f.message + note,
            reason=f.reason,
            error_type=f.error_type,
            suggestions=tuple(f.suggestions),
        )
        return "failed", failed
    if verdict is not None and not p.cancelled:
        message = verdict.message + note
        return "finished", RunEarlyStopped(
            **base, message=message, reason=verdict.reason, best_step=verdict.best_step
        )
    if p.cancelled or p.step < p.total:  # a stop() that arrives after the last step changes nothing
        why = "cancelled" if p.cancelled else "stopped by the user"
        return "stopped", RunStopped(**base, message=f"Run {why} after step {p.step}.{note}")
    return "finished", RunFinished(**base, message=f"Finished {p.step} steps in {elapsed_s:.1f} s.{note}")
