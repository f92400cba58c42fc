"""``LoRATrainer``: a headless, asyncio-native training loop for LoRA (or full) fine-tuning of causal LMs.

:meth:`LoRATrainer.run` reads top to bottom as the phases of a run, nanoGPT-style::

    run()                                   on the caller's event loop (a Jupyter kernel's, or asyncio.run's)
      open the run directory                -> StateChanged("running")
      prepare: data, seed, model, optimizer -> DataPrepared, RunStarted
      evaluate the base model               -> EvalMetrics(step=0)
      loop until the last step or stop():
        wait if paused                      -> StateChanged("paused"), StateChanged("running")
        one update in a worker thread       forward/backward per micro-batch, clip, AdamW
        publish                             -> StepMetrics (every log_every steps and the last)
                                               AdapterStats (first update, every eval_every, last)
        evaluate when due                   -> EvalMetrics, SampleGenerations
        checkpoint when due                 -> CheckpointSaved
        early stopping (config.early_stopping) ends the loop: RunEarlyStopped, with the best adapter
      finish: save the adapter, release     -> StateChanged(<end>), RunFinished | RunStopped | RunFailed

Steps are counted one way everywhere: ``step`` is the number of optimizer updates completed (so the first
update publishes ``StepMetrics.step == 1``). Events are published from the loop's thread only: widget
updates sent from other threads never reach the page in Colab (googlecolab/colabtools#3373).

Failures never escape as exceptions: out-of-memory (on any device), a non-finite loss, bad input (data,
settings, ``output_dir``), a failed checkpoint write and any other error end the run with
:class:`~lora_widgets.events.types.RunFailed` (reason, message, suggestions), the adapter of the last completed
step is saved, and the model is left usable. Misuse of the API (a second concurrent ``run()``,
``run_sync()`` inside a running loop) raises. Every event is also appended to
``<output_dir>/<run_id>/metrics.jsonl``; "is it training?" alerts (:mod:`lora_widgets.health.alerts`) on what the
events show follow them as :class:`~lora_widgets.events.types.AlertRaised` (see :mod:`.insight`). Stop, pause
and resume can also come from another process, through the run directory's ``control.json`` (read before
every step; :mod:`lora_widgets.events.run_files`).

Under ``torchrun`` or ``accelerate launch`` (``WORLD_SIZE`` > 1) every process runs the same script and the run is
data-parallel (:mod:`lora_widgets.training.distributed`): each rank trains on its slice of each global batch of
``batch_size x processes x grad_accum_steps`` sequences, only rank 0 writes the run directory (events, checkpoints,
adapter), and every rank stops at the same step.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lora_widgets.data.sources import require_train_data
from lora_widgets.devices import describe_device, select_device
from lora_widgets.events.run_files import ControlReader
from lora_widgets.events.source import RunBase
from lora_widgets.events.types import (
    AlertRaised,
    CheckpointSaved,
    EvalMetrics,
    Event,
    RunEnded,
    StateChanged,
)
from lora_widgets.health.gradient_check import NoGradientError
from lora_widgets.lora.layers import LoRAConfig, LoRAReport, count_parameters, lora_layers
from lora_widgets.paths import as_path
from lora_widgets.quantization import base_of
from lora_widgets.training import checkpoint as ckpt
from lora_widgets.training import ownership, precision
from lora_widgets.training.batches import Blocks, data_prepared, eval_batches, prepare_blocks, vocab_size
from lora_widgets.training.config import TrainConfig
from lora_widgets.training.diagnosis import Diagnosis, diagnose, nan_diagnosis
from lora_widgets.training.distributed import World
from lora_widgets.training.insight import Insight
from lora_widgets.training.meter import Meter
from lora_widgets.training.run_dir import RunDirectory, config_document, run_stem
from lora_widgets.training.run_state import Progress, Session, ending
from lora_widgets.training.schedules import lr_schedule as _lr_schedule
from lora_widgets.training.schedules import total_steps
from lora_widgets.training.step import evaluate
from lora_widgets.training.stopping import RunStopping

__all__ = ["LoRATrainer"]

logger = logging.getLogger(__name__)


class LoRATrainer(RunBase):
    """Fine-tune ``model`` on ``train_data`` as an asyncio task that streams typed events.

    Args:
        model: a causal LM returning logits (``out.logits``, ``out[0]`` or a tensor) for ``input_ids``.
        tokenizer: needed when the data is text (a corpus name, list of strings, file, dataset).
        train_data: ``LongTensor[n_blocks, block_size]`` of token ids, a ``data.DataSplit`` (its ``val``
            part then serves as validation data), a ``training.batches.RunData``, or any source :func:`lora_widgets.data.text.as_blocks`
            accepts (text, packed into blocks); or instruction/chat rows in any TRL format
            (:mod:`lora_widgets.data.rows`: a list, ``.jsonl``/``.json``, ``datasets.Dataset``,
            ``"python-instruct"``), tokenised by :func:`lora_widgets.data.sft.prepare_sft` with
            ``config.max_length``/``config.train_on``, padded per batch, loss on the answers.
        eval_data: validation blocks, source or rows; ``None`` holds out ``config.val_fraction`` of the
            training data, seeded, by :mod:`lora_widgets.data.split` (``DataPrepared.split`` says how); a built-in
            instruction set uses its validation split.
        lora: a :class:`LoRAConfig` to apply adapters now (each ``run()`` re-initialises them from the
            seed; adapters an earlier LoRATrainer made are replaced), or ``None`` to train whatever already has
            ``requires_grad`` (adapters you applied yourself, a PEFT model, or the whole model).
        config: a :class:`TrainConfig`.

    Raises:
        TypeError: a wrong type of model, lora or config.
        ValueError: the model already has adapters the LoRATrainer did not create (with ``lora`` given), its
            adapters are merged, nothing is trainable, the precision does not suit the device, or a multi-process
            launch is unusable (:meth:`World.from_env <lora_widgets.training.distributed.World.from_env>`).
        RuntimeError: the configured device is not available, or (with ``lora`` given) another run is
            training this model right now.

    State, subscribers, history, ``metrics.jsonl``, stop/pause/resume (also through ``control.json`` in the run
    directory, from another process) and cancellation are :class:`~lora_widgets.events.source.RunBase`'s.
    ``world`` says which process this is of a ``torchrun`` launch (:mod:`lora_widgets.training.distributed`).
    """

    owner = "LoRATrainer"

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
        require_train_data(train_data)
        self.model = model
        self.tokenizer = tokenizer
        self.train_data = train_data
        self.eval_data = eval_data
        self.lora = lora
        chosen = select_device(config.device)
        self.world = World.from_env(chosen.type)  # under torchrun: this process among the run's processes
        self.device: torch.device = self.world.device(config.device, chosen)
        self.config = config.for_run(self.device, base_of(model))  # checked as the dashboard does
        self.report: LoRAReport | None
        self.report, self._owns_lora = ownership.attach_adapters(model, lora)  # checks, then changes

        super().__init__()
        self.run_dir: Path | None = None
        self.run_id: str | None = None
        self._dir: RunDirectory | None = None
        self._blocks_cache: Blocks | None = None
        self._blocks_lock = threading.Lock()
        self._insight = Insight()  # the run's adapter statistics, samples and alerts (from _prepare on)

    # -- public API --------------------------------------------------------------------------------

    @property
    def total_steps(self) -> int:
        """Optimizer updates the run will make (prepares the data on first use; ``ValueError`` if bad)."""
        c = self.config
        return total_steps(c.max_steps, c.epochs, self._blocks().steps_per_epoch)

    def lr_schedule(self) -> np.ndarray:
        """Learning rate of every update ``[total_steps]``, exactly as the run will use them.

        Entry ``i`` is the rate of update ``i + 1``, i.e. of the :class:`StepMetrics` with ``step == i + 1``.
        """
        c = self.config
        return _lr_schedule(self.total_steps, c.learning_rate, c.warmup_steps, c.schedule)

    async def run(self, resume_from: str | os.PathLike[str] | None = None) -> RunEnded:
        """Train to the end (or until stopped or failed) and return the final event.

        ``resume_from``: a checkpoint directory (``<run_dir>/checkpoints/step-NNNNNN``); the run continues
        from its step with its optimizer, schedule, data order and RNG state, in a new run directory.

        Raises:
            RuntimeError: this LoRATrainer (or another one on the same model) is already running.
            TypeError: ``resume_from`` is not a path (nothing has started).
        """
        if resume_from is not None:
            as_path(resume_from, "LoRATrainer.run", "resume_from")
        self._begin_run(
            "this LoRATrainer is already running; wait for it (await the first run) or call stop() "
            "before starting another run"
        )
        try:
            with ownership.training(self.model):
                return await self._run(resume_from)
        finally:
            self._end_run()  # closes metrics.jsonl, discards a control request that came too late

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
        if self.running and self.state != "paused":
            raise RuntimeError("the run is in progress; pause() or stop() it before saving")
        return ckpt.save_trained_weights(self.model, path, self._base_name())

    # -- the run, phase by phase ---------------------------------------------------------------------

    async def _run(self, resume_from: str | os.PathLike[str] | None) -> RunEnded:
        c, p, meter = self.config, Progress(), Meter()
        mode = precision.ModelMode.of(self.model, c.gradient_checkpointing)
        self._insight, self._stopping = Insight(), RunStopping(None)
        run: Session | None = None
        try:
            self._start(resume_from)
            run = await self._prepare(p, resume_from)
            meter.start(p.step, run.tokens_per_step())
            assert self.run_id is not None and self.run_dir is not None
            self._publish(run.run_started(p, self.run_id, self.run_dir, self.lora, self.device))
            if p.step == 0:
                await self._evaluate(run, p)  # the base model's validation loss, for comparison
            while p.step < p.total and not self._agreed_stop():  # stop(), control.json, early stopping
                if self._requests.pause_requested:
                    await self._hold(p, meter)
                    continue
                p.phase = "step"
                log = (p.step + 1) % c.log_every == 0 or p.step + 1 == p.total
                probe = (
                    self._insight.probe(p.step + 1, run.lr(p.step + 1, p.total))
                    if self.world.is_main
                    else None
                )
                out, usage = await self._in_thread(run.update, p, log, probe)
                if out.gradients is not None:  # the first update: trainable parameters without a gradient
                    self._publish_all(self._insight.gradient_alerts(out.gradients, p.start_step + 1))
                if out.bad_step is not None:  # non-finite: a failure, or a divergence stop if watched
                    p.failure = nan_diagnosis(out.bad_step, not out.applied, config=c, total_steps=p.total)
                    p.failure = None if self._stopping.on_loss(out.bad_step, math.nan) else p.failure
                    break
                if log:
                    self._publish(run.step_metrics(p, out, usage, meter.lap(p.step, p.total)))
                    if out.loss is not None and self._stopping.on_loss(p.step, out.loss):
                        break
                if out.probed is not None:  # AdapterStats of a measured update
                    self._publish(out.probed)
                if c.eval_every is not None and p.step % c.eval_every == 0:
                    await self._evaluate(run, p)
                if c.checkpoint_every is not None and p.step % c.checkpoint_every == 0:
                    await self._checkpoint(run, p)
            # a run that ended normally: a closing evaluation and checkpoint, unless just done
            ended = p.failure is not None or self._stopping.verdict is not None
            if not ended and not self._agreed_stop() and p.evaluated_at != p.step:
                await self._evaluate(run, p)
            if not ended and c.checkpoint_every and p.step not in (p.start_step, p.checkpointed_at):
                await self._checkpoint(run, p)
        except asyncio.CancelledError:
            p.cancelled = True
        except Exception as exc:
            p.failure = self._diagnose(exc, p, run)
        if self._stopping.verdict is not None and p.failure is None and not p.cancelled:
            await asyncio.to_thread(self._stopping.restore_best, self.model)  # the best evaluation's adapter
        adapter, note = await self._save_final(run, p)
        run = None  # drops the optimizer state, the scaler and the batch order before memory is released
        mode.restore(self.model)
        precision.release_memory(self.device, collect=p.failure is not None or p.cancelled)
        end = self._end(p, meter, adapter, note)
        if p.cancelled:
            raise asyncio.CancelledError
        return end

    def _start(self, resume_from: str | os.PathLike[str] | None) -> None:
        """Open the run directory, then say "running" at once (so a UI shows the click was taken; it is
        the first line of metrics.jsonl). A bad ``output_dir`` raises after "running", as other bad input."""
        try:
            self._open_run_dir(resume_from)
        finally:
            self._publish(StateChanged("running", 0))

    def _open_run_dir(self, resume_from: str | os.PathLike[str] | None) -> None:
        """Rank 0 creates the run directory and writes to it; the other ranks of a multi-process run only learn
        its path (or that rank 0 could not create it)."""
        self.run_dir, self.run_id, self._dir = None, None, None
        try:
            if self.world.is_main:
                self._create_run_dir(resume_from)
        finally:
            where = self.world.share(self.run_dir)  # reached by rank 0 on failure too: no rank waits forever
        if not isinstance(where, Path):
            raise ValueError(f"rank 0 could not create the run directory in {str(self.config.output_dir)!r}")
        self.run_dir, self.run_id = where, where.name

    def _create_run_dir(self, resume_from: str | os.PathLike[str] | None) -> None:
        rank = self.report.config.r if self.report is not None and self.report.config is not None else None
        if rank is None and lora_layers(self.model):
            rank = next(iter(lora_layers(self.model).values())).r
        trainable = count_parameters(self.model)
        stem = run_stem(self.config, rank, adapters=self.report is not None, trainable=trainable)
        self._dir = RunDirectory.create(self.config.output_dir, stem)
        self.run_dir, self.run_id = self._dir.path, self._dir.run_id
        self._write_config(None, resume_from)
        self._writer = self._dir.open_metrics()
        self._control = ControlReader(self._dir.path)

    async def _prepare(self, p: Progress, resume_from: str | os.PathLike[str] | None) -> Session:
        """Data (bad input ends the run here), then seed, adapters, model, optimizer and checkpoint."""
        p.phase = "data"
        blocks = await self._in_thread(self._blocks)
        self._write_config(blocks, resume_from)
        p.phase = "setup"
        run = await self._in_thread(
            Session.open,
            self.model,
            self.config,
            self.device,
            blocks,
            p,
            adapters=self.report is not None,
            fresh_adapters=self._owns_lora,
            resume_from=resume_from,
            world=self.world,
        )
        for event in run.earlier:  # a resumed run's plots show the whole curve
            self.history.record(event)
        c = self.config
        p.total = total_steps(c.max_steps, c.epochs, blocks.steps_per_epoch)
        # what the data became, for views and metrics.jsonl
        self._publish(
            data_prepared(blocks.train, blocks.val, self.world.data_config(c), blocks.split, run.order.packed)
        )
        self._insight = Insight.for_run(self.model, self.tokenizer, c, blocks.val, p.total)
        self._stopping = RunStopping(c.early_stopping, has_validation=blocks.val is not None)
        return run

    async def _hold(self, p: Progress, meter: Meter) -> None:
        """Paused: publish it, wait for resume() or stop() (every rank of a multi-process run, in rounds of
        agreement: :meth:`World.hold`), and leave the pause out of the clock."""
        self._publish(StateChanged("paused", p.step))
        if self.world.distributed:
            meter.paused(
                await self._in_thread(
                    self.world.hold, self._requests, self._check_control, self.control_poll_s
                )
            )
        else:
            meter.paused(await self._wait_while_paused())
        if not self._requests.stop_requested:
            self._publish(StateChanged("running", p.step))

    async def _evaluate(self, run: Session, p: Progress) -> None:
        val = run.blocks.val
        if val is None:
            return
        p.phase = "eval"
        c = self.config
        w = self.world
        batches = eval_batches(
            val, w.data_config(c).batch_size, c.eval_batches, self.device, (w.rank, w.size)
        )
        val_loss = await self._in_thread(evaluate, self.model, batches, run.autocast, w)
        p.evaluated_at = p.step
        if math.isfinite(val_loss):
            p.best_val = val_loss if p.best_val is None else min(p.best_val, val_loss)
        ppl = math.exp(val_loss) if val_loss < 700 else math.inf
        self._publish(EvalMetrics(p.step, val_loss, ppl, p.best_val if p.best_val is not None else val_loss))
        if w.is_main and (samples := await self._in_thread(self._insight.samples, p.step, run.autocast)):
            self._publish(samples)
        await self._in_thread(self._stopping.on_eval, p.step, val_loss, self.model)

    async def _checkpoint(self, run: Session, p: Progress) -> None:
        if self._dir is None:  # another rank than 0 of a multi-process run: rank 0 writes the checkpoints
            return
        p.phase = "checkpoint"
        extra = run.checkpoint_extra(
            p.step, self.lora.to_dict() if self.lora is not None else None, self.run_id
        )
        path = await self._in_thread(
            ckpt.save_checkpoint,
            self._dir.checkpoint_dir(p.step),
            self.model,
            run.optimizer,
            p.step,
            extra,
            run.scaler,
        )
        p.checkpointed_at = p.step
        self._publish(CheckpointSaved(p.step, str(path)))

    async def _save_final(self, run: Session | None, p: Progress) -> tuple[str | None, str]:
        """Save the trained weights to ``run_dir/adapter`` however the run ended (not if nothing trained
        or the weights are non-finite); returns (path, a note for the end message). Rank 0 only."""
        if run is None or self._dir is None:
            w = self.world
            note = f" (Process {w.rank} of {w.size}: rank 0 writes the run directory {self.run_dir}.)"
            return None, "" if run is None or w.is_main else note
        if p.failure is not None and p.failure.reason == "no_gradient":
            return None, " Nothing was trained, so nothing was saved."
        try:
            return await asyncio.shield(
                asyncio.to_thread(self._dir.save_adapter, self.model, self._base_name())
            )
        except asyncio.CancelledError:
            p.cancelled = True
            return None, " The run was cancelled while its adapter was being saved."

    def _end(self, p: Progress, meter: Meter, adapter: str | None, note: str) -> RunEnded:
        """Publish the end state and the terminal event (:func:`ending`); remember it as :attr:`last_event`."""
        saved = ckpt.trained_weights_kind(self.model) if adapter is not None else ""
        state, end = ending(p, self._stopping.verdict, meter.elapsed(), adapter, saved, note)
        self._publish(StateChanged(state, p.step))
        self._publish(end)  # also remembered as last_event
        return end

    # -- helpers ---------------------------------------------------------------------------------------

    def _agreed_stop(self) -> bool:
        """Whether the run stops now: a request another process wrote to control.json, ``stop()``, an
        early-stopping verdict; in a multi-process run agreed by every rank (:meth:`World.agree`)."""
        self._check_control()
        return self.world.agree(self._requests, self._stopping.verdict is not None)

    def _publish(self, event: Event) -> None:
        """Publish ``event`` (:meth:`RunBase._publish`), then the "is it training?" alerts it raises."""
        super()._publish(event)
        for alert in self._insight.alerts(event):
            self._publish(alert)

    def _publish_all(self, events: list[AlertRaised]) -> None:
        for event in events:
            self._publish(event)

    def _diagnose(self, exc: Exception, p: Progress, run: Session | None) -> Diagnosis:
        failure = diagnose(
            exc,
            p.step,
            p.phase,
            config=self.config,
            device=self.device,
            model=self.model,
            lora=self.report.config if self.report is not None else None,
            seq_len=run.blocks.block_size if run is not None else self.config.block_size,
            checkpoint=self._dir.checkpoint_dir(p.step) if self._dir is not None else None,
        )
        if isinstance(exc, NoGradientError):  # the run ends; the alert names the parameters in the events too
            self._publish_all(self._insight.gradient_alerts(exc.report, exc.step))
        if failure.reason == "error":
            logger.error("the run failed %s", failure.message, exc_info=exc)
        return failure

    def _blocks(self) -> Blocks:
        with self._blocks_lock:
            if self._blocks_cache is None:
                self._blocks_cache = prepare_blocks(  # one update's global batch: batch_size x processes
                    self.train_data,
                    self.eval_data,
                    self.tokenizer,
                    self.world.data_config(self.config),
                    vocab_size(self.model),
                )
            return self._blocks_cache

    def _write_config(self, blocks: Blocks | None, resume_from: str | os.PathLike[str] | None) -> None:
        if self._dir is None:  # (rank 0 writes it)
            return
        doc = config_document(
            run_id=self._dir.run_id,
            config=self.config,
            lora=self.lora,
            model=self.model,
            base_name=self._base_name(),
            device=self.device,
            device_name=describe_device(self.device),
            blocks=blocks,
            resumed_from=resume_from,
        )
        self._dir.write_config(doc)

    def _base_name(self) -> str | None:
        name = getattr(getattr(self.model, "config", None), "_name_or_path", None)
        return str(name) if name else None
