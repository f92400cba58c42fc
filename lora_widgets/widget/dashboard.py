"""``LoRADashboard``: controls, Train/Pause/Stop, progress, summary and live charts for a LoRA fine-tune.

Data flow (one direction, one thread)::

    controls (JS)  --traits-->  DashboardPanel  --start()-->  Trainer.run() as an asyncio task
                                                                     |
    charts, panel  <--flush (throttled, decimated)--  _on_event (records only)  <--events--+

* The trainer runs as a task on the kernel's own asyncio loop (NOTES: cells keep executing and a Stop
  click ends the task in well under a second), and every widget update is made from that loop's
  thread: updates made from other threads never reach Colab (googlecolab/colabtools#3373).
* The event handler only appends to in-memory series. A :class:`~lora_widgets.widget.throttle.Throttle`
  pushes at most one update every ``flush_interval`` seconds (0.25 s: 4 per second) and each push sends
  decimated series (``max_points`` per line, ``max_markers`` validation dots), so a 100,000-step run
  costs the browser what a 1,000-step run costs, and JupyterLab's iopub limit (1,000 messages/s) is
  never approached.
* When a run ends, a static summary (metrics table + an SVG of the loss curve) replaces a placeholder
  output shown beside the widget, so saved notebooks show results where widgets do not render.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from ipywidgets import GridBox, Layout, VBox

from lora_widgets.events import (
    CheckpointSaved,
    EvalMetrics,
    RunEnded,
    RunFailed,
    RunFinished,
    RunStarted,
    RunStopped,
    StateChanged,
    StepMetrics,
)
from lora_widgets.lora import LoRAConfig, count_parameters, has_lora, remove_lora
from lora_widgets.widget import controls
from lora_widgets.widget.charts import Charts, set_xy
from lora_widgets.widget.panel import DashboardPanel, _targets_to_text, validate_settings
from lora_widgets.widget.static_summary import loss_curve_svg, summary_table_html
from lora_widgets.widget.throttle import EMA, Series, Throttle, decimate_indices

if TYPE_CHECKING:
    from lora_widgets.trainer import TrainConfig, Trainer

__all__ = ["DashboardPanel", "DashboardRun", "LoRADashboard", "validate_settings"]

ACTIVE_STATES = ("running", "paused")
_TRAIN_FIELDS = controls.config_fields(controls.TrainConfig)


def run_label(index: int, lora: LoRAConfig, lr: float) -> str:
    """A short legend label for a run: its number and the settings a sweep varies."""
    targets = _targets_to_text(lora.target_modules)
    where = f" {targets}" if targets and len(targets) <= 16 else (" custom" if targets else "")
    mantissa, exponent = f"{lr:.1e}".split("e")
    lr_text = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"run {index}: r={lora.r} α={lora.alpha:g} lr={lr_text}{where}"


def _format_bytes(n: float | None) -> str:
    if n is None or not math.isfinite(n):
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _dir_bytes(path: str | None) -> int | None:
    if not path:
        return None
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if not p.is_dir():
        return None
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _is_token_tensor(obj: Any) -> bool:
    """True for ready-made token blocks (a tensor), which need no tokenizer."""
    import torch

    return isinstance(obj, torch.Tensor)


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


@dataclass
class _Record:
    """What the event handler has recorded for one run (the flush reads it)."""

    steps: Series = field(default_factory=lambda: Series("step", "loss", "smoothed", "lr", "tokens_per_s",
                                                          "memory", "reserved", "gpu_util", "elapsed"))  # fmt: skip
    tps_ema: EMA = field(default_factory=lambda: EMA(0.9))
    evals: Series = field(default_factory=lambda: Series("step", "val_loss", "perplexity"))
    ema: EMA = field(default_factory=lambda: EMA(0.9))
    started: RunStarted | None = None
    last_step: StepMetrics | None = None
    last_eval: EvalMetrics | None = None
    checkpoints: list[str] = field(default_factory=list)
    ended: RunEnded | None = None
    sent_steps: int = -1
    sent_evals: int = -1


@dataclass
class DashboardRun:
    """One run started from a dashboard: its settings, trainer and outcome (``dash.runs``)."""

    index: int
    label: str
    lora: LoRAConfig
    train: Any  # TrainConfig
    trainer: Any  # Trainer
    result: RunEnded | None = None
    record: _Record = field(default_factory=_Record, repr=False)
    overlaid: bool = field(default=False, repr=False)

    @property
    def final_loss(self) -> float | None:
        """Final training loss (None before the first step)."""
        return self.result.final_loss if self.result else self.record.steps.last("loss")

    @property
    def best_val_loss(self) -> float | None:
        """Best validation loss seen (None without evaluation)."""
        if self.result is not None and self.result.best_val_loss is not None:
            return self.result.best_val_loss
        vals = self.record.evals["val_loss"]
        return float(np.nanmin(vals)) if len(vals) else None


@contextlib.contextmanager
def _quiet_hub_progress() -> Iterator[None]:
    """Switch transformers' progress bars off while the dashboard loads a model, then restore them."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class LoRADashboard(VBox):
    """Train a LoRA adapter live in a notebook: controls, Train/Pause/Stop, progress, summary, charts.

    Args:
        model: a ``transformers`` causal LM, a hub id or local path (loaded with
            :func:`lora_widgets.demo.load_model`), or ``None`` for the shipped base model.
        tokenizer: the model's tokenizer (required when ``model`` is a model object).
        train_data: any source :func:`lora_widgets.data.prepare_data` accepts, token blocks
            ``[n, T]``, or a :class:`~lora_widgets.data.DataSplit` (its ``val`` part validates);
            ``None`` for the demo corpus ("python-docs"). The same rule as the trainer's
            (:func:`lora_widgets.data.train_val_blocks`).
        eval_data: validation source; ``None`` holds out ``train.val_fraction`` of ``train_data``.
        lora: the starting :class:`~lora_widgets.lora.LoRAConfig` (the controls start from it).
            ``None`` starts from r=8, alpha=16 on all linear layers: on the shipped model that lowers
            the demo corpus's validation loss by ~21% in 200 steps, where q,v alone manage ~4%
            (adapting every linear layer is the QLoRA paper's recommendation, Dettmers et al. 2023, sec. 4).
        train: the starting :class:`~lora_widgets.trainer.TrainConfig`; fields without a control
            (eval_every, output_dir, block_size, ...) are kept for every run.

    Display it (last line of a cell) to show it. ``start()``, ``stop()``, ``pause()``, ``resume()`` and
    ``await wait()`` do from Python what the buttons do.
    """

    flush_interval: float = 0.25
    """Seconds between two pushes to the browser (at most 4 per second)."""
    max_points: int = 2000
    """Points per chart line per push (min-max decimation keeps spikes)."""
    max_markers: int = 200
    """Validation dots per push: each is an SVG element in the page (a line's points are not), so they are
    capped lower; the best validation loss always survives the min-max decimation."""

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        train_data: Any = None,
        eval_data: Any = None,
        lora: LoRAConfig | None = None,
        train: TrainConfig | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            valid = "model, tokenizer, train_data, eval_data, lora, train"
            raise TypeError(
                f"LoRADashboard() got unexpected keyword argument(s) {', '.join(sorted(kwargs))}; "
                f"valid arguments are {valid} (LoRA settings go in lora=LoRAConfig(...), training "
                "settings in train=TrainConfig(...))"
            )
        if lora is not None and not isinstance(lora, LoRAConfig):
            raise TypeError(f"lora must be a LoRAConfig, got {type(lora).__name__}")
        if train is None:
            from lora_widgets.trainer import TrainConfig

            train = TrainConfig()
        missing = [f for f in _TRAIN_FIELDS if not hasattr(train, f)]
        if missing or not dataclasses.is_dataclass(train):
            raise TypeError(f"train must be a TrainConfig, got {type(train).__name__}")
        lora = lora if lora is not None else LoRAConfig(r=8, alpha=16, target_modules="all-linear")

        if model is None or isinstance(model, str | Path):
            from lora_widgets import demo

            if tokenizer is not None and model is not None:
                raise TypeError("pass tokenizer only with a model object; a hub id or path loads its own")
            with _quiet_hub_progress():  # no 'Loading weights' bar above the widget
                model, tokenizer = demo.load_base_model() if model is None else demo.load_model(str(model))
        elif tokenizer is None and not _is_token_tensor(train_data):
            raise TypeError(
                "tokenizer is required when model is a model object; pass tokenizer=..., "
                "or pass the model's hub id / local path instead"
            )
        self.model = model
        self.tokenizer = tokenizer
        self._train_source = "python-docs" if train_data is None else train_data
        self._eval_source = eval_data
        self._lora0 = lora
        self._train0: Any = train
        self._device_type = self._guess_device_type(train)
        self._data: tuple[Any, Any] = (None, None)  # (train, val) blocks, prepared once for every run
        self._n_train_blocks: int | None = None
        self._prepare_data()  # bad data raises here, naming the problem, before anything is shown

        self.runs: list[DashboardRun] = []
        self._task: asyncio.Task[RunEnded | None] | None = None
        self._unsubscribe: Callable[[], Any] | None = None
        self._throttle = Throttle(self.flush_interval)
        self._flush_handle: Any = None
        self._stop_before_start = False
        self._callouts: dict[str, dict[str, Any]] = {}
        self._display_ids: tuple[str, str] | None = None
        # test hooks: a fake clock / timer / trainer class can be swapped in
        self._clock: Callable[[], float] = time.monotonic
        self._call_later: Callable[[float, Callable[[], None]], Any] | None = None
        self._trainer_factory: Callable[..., Any] | None = None

        self.panel = DashboardPanel(**self._initial_controls(lora, train))
        self.charts = Charts(gpu=self._device_type == "cuda")
        self.panel.observe(self._on_controls, names=list(DashboardPanel.CONFIG_TRAITS))
        self.panel.observe(self._on_log_scale, names=["log_scale"])
        self.panel.on_msg(self._on_panel_msg)
        grid = GridBox(
            children=self.charts.figures,
            layout=Layout(grid_template_columns="repeat(auto-fit, minmax(440px, 1fr))", width="100%"),
        )
        super().__init__(children=[self.panel, grid], layout=Layout(width="100%"))
        self.add_class("lw-dashboard")
        self._on_controls()
        self._set_idle_summary()
        self._set_callout("status", "info", "Ready", "Adjust the settings, then press Train.")
        if self._device_type == "cpu":
            self._set_callout("device", "warning", "Training on the CPU", self._cpu_message())
        self._publish_callouts()

    # ------------------------------------------------------------------ set-up helpers
    def _cpu_message(self) -> str:
        import torch

        why = "No GPU was found" if not torch.cuda.is_available() else "The trainer is set to device='cpu'"
        millions = count_parameters(self.model)[1] / 1e6
        return (
            f"{why}, so this runs on the CPU. That is fine for a model this small ({millions:.1f} M "
            "parameters: a few thousand tokens/s on a laptop, a 200-step run in about a minute), but time "
            "per step grows with the model: a hub model of 100 M+ parameters would be roughly 50-100x "
            "slower per step. On Colab pick a GPU runtime (Runtime > Change runtime type)."
        )

    @staticmethod
    def _guess_device_type(train: Any) -> str:
        pref = str(getattr(train, "device", "auto") or "auto")
        try:
            from lora_widgets.devices import select_device

            return select_device(pref).type
        except Exception:
            import torch

            if pref == "auto":
                return "cuda" if torch.cuda.is_available() else "cpu"
            return pref.split(":")[0]

    def _prepare_data(self) -> None:
        """Tokenise and split the data once (every run reuses it), so 'batch too large' can be flagged."""
        from lora_widgets.data import train_val_blocks  # the trainer's own rule (tokenizers load lazily)

        train_blocks, eval_blocks = train_val_blocks(
            self._train_source,
            self._eval_source,
            self.tokenizer,
            int(getattr(self._train0, "block_size", 128)),
            float(getattr(self._train0, "val_fraction", 0.1)),
            int(getattr(self._train0, "seed", 0)),
        )
        self._data = (train_blocks, eval_blocks)
        self._n_train_blocks = int(train_blocks.shape[0])

    @staticmethod
    def _initial_controls(lora: LoRAConfig, train: Any) -> dict[str, Any]:
        return controls.values_from_configs(lora, train)

    def _control_values(self) -> dict[str, Any]:
        return self.panel.control_values()

    def current_configs(self) -> tuple[LoRAConfig, Any]:
        """The ``(LoRAConfig, TrainConfig)`` the next run would use, from the controls' values."""
        return controls.to_configs(self._control_values(), self._lora0, self._train0)

    # ------------------------------------------------------------------ public API
    @property
    def trainer(self) -> Trainer | None:
        """The current (or last) run's :class:`~lora_widgets.trainer.Trainer`; None before the first run."""
        return self.runs[-1].trainer if self.runs else None

    @property
    def history(self) -> Any:
        """The current (or last) run's metrics (``trainer.history``); None before the first run."""
        trainer = self.trainer
        return None if trainer is None else trainer.history

    @property
    def state(self) -> str:
        """The status line's word: idle, running, paused, stopped, finished or failed."""
        return str(self.panel.state)

    @property
    def running(self) -> bool:
        """True while a run's task has not finished (running or paused)."""
        return self._task is not None and not self._task.done()

    def start(self) -> asyncio.Task[RunEnded | None]:
        """Start a run with the controls' settings as a task on the running asyncio loop; return the task.

        Raises ``RuntimeError`` when a run is already in progress (a double click never starts two runs)
        or when no asyncio loop is running (use it from a notebook, or ``await dash.run()`` in a
        script), and ``ValueError`` naming every invalid setting.
        """
        if self.running:
            raise RuntimeError(
                "a run is already in progress; stop it (dash.stop()) or await dash.wait() first"
            )
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "start() needs a running asyncio loop, as in a Jupyter kernel; in a plain script use "
                "asyncio.run(dash.run()) or the headless Trainer.run_sync()"
            ) from None
        if self.panel.errors:
            problems = "; ".join(f"{k}: {v}" for k, v in self.panel.errors.items())
            raise ValueError(f"invalid settings, fix them before training: {problems}")
        lora, train = self.current_configs()
        index = len(self.runs) + 1
        self._archive_previous_run()
        try:
            if self.runs and has_lora(self.model):
                remove_lora(self.model)  # the previous adapter is already saved in its run_dir
            self._preflight(lora, train)
            trainer = self._make_trainer(lora, train)
        except Exception as exc:
            self._show_failure(type(exc).__name__, str(exc), [], title="Could not start the run")
            self.panel.state = "failed"
            raise
        run = DashboardRun(index=index, label=run_label(index, lora, train.learning_rate), lora=lora,
                           train=train, trainer=trainer)  # fmt: skip
        self.runs.append(run)
        self._throttle = Throttle(self.flush_interval)
        self.charts.clear_current()
        self.charts.label_current(run.label)
        self.panel.run_label = run.label
        self._preview_schedule(trainer, train)
        self._unsubscribe = trainer.subscribe(self._on_event)
        summary = {
            k: v for k, v in self.panel.summary.items() if k in ("device", "device_name", "train_blocks")
        }
        with self.panel.hold_sync():
            self.panel.summary = summary
            self.panel.state = "running"
            self.panel.progress = {"step": 0, "total": int(getattr(trainer, "total_steps", 0) or 0)}
            self._set_callout("status", "info", "Starting", "Preparing the run…")
            self._publish_callouts()
        self._stop_before_start = False
        self._task = loop.create_task(self._run(run))
        return self._task

    async def wait(self) -> RunEnded | None:
        """Wait for the current run to end; return its terminal event (None if nothing was started).

        Also (re)writes the static summary from the awaiting cell, so headless executors (nbval,
        ``nbconvert --execute``) record it.
        """
        if self._task is None:
            return None
        result = await asyncio.shield(self._task)
        self._write_static_summary()
        return result

    async def run(self) -> RunEnded | None:
        """``start()`` then ``wait()``: convenient in scripts (``asyncio.run(dash.run())``)."""
        self.start()
        return await self.wait()

    def stop(self) -> None:
        """Ask the run to stop after the current optimizer step (the adapter is saved)."""
        if self.running and self.trainer is not None:
            if not getattr(self.trainer, "running", True):
                self._stop_before_start = True  # the task has not reached trainer.run() yet
            self.trainer.stop()

    def pause(self) -> None:
        """Hold the run between two optimizer steps."""
        if self.running and self.trainer is not None:
            self.trainer.pause()

    def resume(self) -> None:
        """Continue a paused run."""
        if self.running and self.trainer is not None:
            self.trainer.resume()

    def save_adapter(self, path: str | Path) -> Path:
        """Write the last run's adapter in PEFT's format (adapter_config.json + adapter_model.safetensors)."""
        trainer = self.trainer
        if trainer is not None:
            out = trainer.save_adapter(path)
            return Path(out) if out is not None else Path(path)
        if has_lora(self.model):
            from lora_widgets.lora import save_adapter

            return save_adapter(self.model, path)
        raise ValueError("nothing to save yet: start a run first (dash.start() or the Train button)")

    # ------------------------------------------------------------------ run plumbing
    def _make_trainer(self, lora: LoRAConfig, train: Any) -> Any:
        factory = self._trainer_factory
        if factory is None:
            from lora_widgets.trainer import Trainer

            factory = Trainer
        train_data, eval_data = self._data
        return factory(self.model, self.tokenizer, train_data, eval_data, lora=lora, config=train)

    def _preflight(self, lora: LoRAConfig, train: Any) -> None:
        """Compare the memory estimate with the device's free memory; warn (the user may still start)."""
        self._callouts.pop("preflight", None)
        try:
            from lora_widgets.memory import preflight

            dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[train.precision]
            result = preflight(
                self.model,
                lora,
                batch_size=train.batch_size,
                seq_len=int(getattr(train, "block_size", 128)),
                dtype=dtype,
                device=self._device_type,
                gradient_checkpointing=bool(getattr(train, "gradient_checkpointing", False)),
            )
        except Exception:  # the estimate is advice; never block a run on it
            return
        if not result.fits:
            self._set_callout(
                "preflight",
                "warning",
                "This run may not fit in memory",
                result.message(),
                list(result.suggestions),
            )

    def _preview_schedule(self, trainer: Any, train: Any) -> None:
        lrs: Any = None
        if trainer is not None and hasattr(trainer, "lr_schedule"):
            try:
                lrs = np.asarray(trainer.lr_schedule(), dtype=np.float64)
            except Exception:
                lrs = None
        if lrs is None:
            lrs = self._schedule_from_controls(train)
        if lrs is None or len(lrs) == 0:
            return
        steps = np.arange(1, len(lrs) + 1)
        idx = decimate_indices(lrs, self.max_points)
        self.charts.set_schedule(steps[idx], lrs[idx])

    def _schedule_from_controls(self, train: Any) -> np.ndarray | None:
        total = train.max_steps
        if not total and self._n_train_blocks:
            per_step = train.batch_size * train.grad_accum_steps
            total = max(1, self._n_train_blocks // max(1, per_step)) * train.epochs
        if not total:
            return None
        try:
            from lora_widgets.schedules import lr_schedule

            return lr_schedule(
                int(total), float(train.learning_rate), int(train.warmup_steps), str(train.schedule)
            )
        except (ImportError, ValueError):
            return None

    async def _run(self, run: DashboardRun) -> RunEnded | None:
        try:
            if self._stop_before_start:
                run.record.ended = RunStopped(0, 0.0, None, None, None, "stopped before the first step")
            else:
                await run.trainer.run()
        except Exception as exc:  # the trainer should publish RunFailed itself; this is the backstop
            if run.record.ended is None:
                run.record.ended = RunFailed(
                    step=int(run.record.steps.last("step") or 0), elapsed_s=0.0, final_loss=None,
                    best_val_loss=None, adapter_path=None, message=str(exc), reason="error",
                    error_type=type(exc).__name__, suggestions=(),
                )  # fmt: skip
        finally:
            if self._unsubscribe is not None:
                self._unsubscribe()
                self._unsubscribe = None
        self._end_run(run)
        return run.result

    def _end_run(self, run: DashboardRun) -> None:
        ended = run.record.ended
        if ended is None:  # run() returned without a terminal event: treat as stopped
            ended = RunStopped(step=int(run.record.steps.last("step") or 0), elapsed_s=0.0,
                               final_loss=run.record.steps.last("loss"), best_val_loss=None,
                               adapter_path=None, message="the run ended without a final event")  # fmt: skip
            run.record.ended = ended
        run.result = ended
        self._cancel_pending_flush()
        self._flush()
        summary = dict(self.panel.summary)
        size = _dir_bytes(ended.adapter_path)
        if size is not None:
            summary.update(adapter_bytes=size, adapter_size=_format_bytes(size), adapter_estimated=False)
        summary["adapter_path"] = ended.adapter_path or ""
        if isinstance(ended, RunFailed):
            self._show_failure(ended.error_type or ended.reason, ended.message, list(ended.suggestions),
                               reason=ended.reason)  # fmt: skip
            state = "failed"
        elif isinstance(ended, RunFinished):
            state = "finished"
            self._set_callout("status", "success", f"Finished {run.label}", self._end_text(run, ended))
        else:
            state = "stopped"
            self._set_callout("status", "info", f"Stopped at step {ended.step}", self._end_text(run, ended))
        with self.panel.hold_sync():
            self.panel.summary = summary
            self.panel.state = state
            self._publish_callouts()
        self._write_static_summary()

    @staticmethod
    def _end_text(run: DashboardRun, ended: RunEnded) -> str:
        parts = [ended.message.rstrip(". ")] if ended.message else []
        if run.final_loss is not None:
            parts.append(f"final training loss {run.final_loss:.4g}")
        if run.best_val_loss is not None:
            parts.append(
                f"best validation loss {run.best_val_loss:.4g} (perplexity {math.exp(run.best_val_loss):.4g})"
            )
        if ended.adapter_path:
            parts.append(f"adapter saved in {ended.adapter_path}")
        return "; ".join(parts) + "."

    def _archive_previous_run(self) -> None:
        """Overlay the last run's smoothed loss as a labelled line before a new run clears the marks."""
        if not self.runs or self.runs[-1].overlaid:
            return
        prev = self.runs[-1]
        prev.overlaid = True
        steps, smoothed = prev.record.steps["step"], prev.record.steps["smoothed"]
        idx = decimate_indices(smoothed, 500)
        self.charts.overlay_run(prev.label, steps[idx], smoothed[idx])

    # ------------------------------------------------------------------ events -> records (no sends)
    def _on_event(self, event: Any) -> None:
        """Trainer subscription: record the event; pushing to the browser is the throttled flush's job."""
        if not self.runs:
            return
        rec = self.runs[-1].record
        if isinstance(event, StepMetrics):
            rec.last_step = event
            rec.steps.append(
                step=event.step,
                loss=event.loss,
                smoothed=rec.ema.update(event.loss),
                lr=event.learning_rate,
                tokens_per_s=rec.tps_ema.update(event.tokens_per_s),  # per-step rates are noisy
                memory=event.memory_bytes / 2**20,
                reserved=None if event.memory_reserved_bytes is None else event.memory_reserved_bytes / 2**20,
                gpu_util=event.gpu_utilization,
                elapsed=event.elapsed_s,
            )
            self._request_flush()
        elif isinstance(event, EvalMetrics):
            rec.last_eval = event
            rec.evals.append(step=event.step, val_loss=event.val_loss, perplexity=event.perplexity)
            self._request_flush()
        elif isinstance(event, RunStarted):
            rec.started = event
            self._request_flush()
        elif isinstance(event, CheckpointSaved):
            rec.checkpoints.append(event.path)
        elif isinstance(event, StateChanged):
            if event.state in ACTIVE_STATES and self.panel.state != event.state:
                self.panel.state = event.state  # rare: sent at once so the buttons follow
        elif isinstance(event, RunEnded):
            rec.ended = event  # _run() finishes the run once trainer.run() returns

    def _request_flush(self) -> None:
        delay = self._throttle.request(self._clock())
        if delay is None:
            return
        if self._call_later is not None:
            self._flush_handle = self._call_later(delay, self._flush)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a synchronous caller): flush now
            self._flush()
            return
        self._flush_handle = loop.call_later(delay, self._flush)

    def _cancel_pending_flush(self) -> None:
        handle, self._flush_handle = self._flush_handle, None
        if handle is not None and hasattr(handle, "cancel"):
            handle.cancel()
        self._throttle.cancel()

    def _flush(self) -> None:
        """Push what was recorded since the last flush: decimated series to the marks, progress to the panel."""
        self._flush_handle = None
        self._throttle.flushed(self._clock())
        if not self.runs:
            return
        rec = self.runs[-1].record
        s = rec.steps
        n = len(s)
        if n and n != rec.sent_steps:
            rec.sent_steps = n
            steps = s["step"]
            idx = decimate_indices(s["loss"], self.max_points)
            c = self.charts
            with c.raw_loss.hold_sync(), c.smooth_loss.hold_sync():
                c.raw_loss.x, c.raw_loss.y = steps[idx].astype(np.int32), s["loss"][idx].astype(np.float32)
                c.smooth_loss.x, c.smooth_loss.y = c.raw_loss.x, s["smoothed"][idx].astype(np.float32)
            mem = s["memory"]
            idx = decimate_indices(mem, self.max_points)
            set_xy(c.memory, steps[idx], mem[idx])
            if np.isfinite(s["reserved"]).any():
                set_xy(c.memory_reserved, steps[idx], s["reserved"][idx])
            if c.gpu and np.isfinite(s["gpu_util"]).any():
                set_xy(c.gpu_util, steps[idx], s["gpu_util"][idx])
            tps = s["tokens_per_s"]
            idx = decimate_indices(tps, self.max_points)
            set_xy(c.tokens_per_s, steps[idx], tps[idx])
            c.set_lr_marker(int(steps[-1]), s.last("lr"))
        if len(rec.evals) != rec.sent_evals:
            rec.sent_evals = len(rec.evals)
            e = rec.evals
            idx = decimate_indices(e["val_loss"], self.max_markers)
            set_xy(self.charts.val_loss, e["step"][idx], e["val_loss"][idx])
        if n:
            self.charts.fit_loss_range(self.charts.raw_loss.y, self.charts.val_loss.y)
        self._push_panel(rec)

    def _push_panel(self, rec: _Record) -> None:
        last = rec.last_step
        total = rec.started.total_steps if rec.started else (last.total_steps if last else 0)
        progress: dict[str, Any] = {"step": 0, "total": int(total)}
        if last is not None:
            progress = {
                "step": int(last.step),
                "total": int(last.total_steps),
                "elapsed": round(float(last.elapsed_s), 1),
                "eta": _finite(round(float(last.eta_s), 1)),
                "tokens_per_s": _finite(round(float(last.tokens_per_s), 1)),
                "epoch": round(float(last.epoch), 3),
                "loss": _finite(float(last.loss)),
            }
        summary = dict(self.panel.summary)
        if rec.started is not None:
            st = rec.started
            summary.update(
                device=st.device,
                device_name=st.device_name,
                trainable=int(st.trainable_params),
                total=int(st.total_params),
                trainable_pct=100.0 * st.trainable_params / max(1, st.total_params),
                run_dir=st.run_dir,
            )
            if summary.get("adapter_estimated", True):
                est = 4 * int(st.trainable_params)  # fp32 safetensors, before the file exists
                summary.update(
                    adapter_bytes=est, adapter_size=f"≈{_format_bytes(est)}", adapter_estimated=True
                )
        if rec.last_eval is not None:
            ev = rec.last_eval
            summary.update(
                val_loss=_finite(ev.val_loss),
                best_val_loss=_finite(ev.best_val_loss),
                perplexity=_finite(ev.perplexity),
            )
        if last is not None and self._callouts.get("status", {}).get("title") == "Starting":
            self._set_callout(
                "status", "info", "Training in the background",
                "Other cells keep working while this runs; Pause holds it between steps, Stop ends it "
                "after the current step and keeps the adapter.",
            )  # fmt: skip
        with self.panel.hold_sync():
            self.panel.progress = progress
            self.panel.summary = summary
            self._publish_callouts()

    # ------------------------------------------------------------------ panel plumbing
    def _on_panel_msg(self, _widget: Any, content: Any, _buffers: Any) -> None:
        """Button clicks from the browser. A click that is not valid in the current state is ignored."""
        kind = content.get("type") if isinstance(content, dict) else None
        if kind == "train":
            if self.running:
                return  # double click: the first one already started the run
            try:
                self.start()
            except (RuntimeError, ValueError, TypeError) as exc:
                if not self.running:
                    self._show_failure(type(exc).__name__, str(exc), [], title="Could not start the run")
                    self._publish_callouts()
        elif kind == "stop":
            self.stop()
        elif kind == "pause":
            self.pause()
        elif kind == "resume":
            self.resume()

    def _on_controls(self, _change: Any = None) -> None:
        errors = validate_settings(self._control_values(), self._device_type, self._n_train_blocks,
                                   lora=self._lora0, train=self._train0)  # fmt: skip
        if not errors and not self.running:
            self._preview_schedule(None, self.current_configs()[1])
        self.panel.errors = errors

    def _on_log_scale(self, change: Any) -> None:
        self.charts.set_log_scale(bool(change["new"]))

    def _set_idle_summary(self) -> None:
        trainable, total = count_parameters(self.model)
        device = self._device_type
        name = device.upper()
        if device == "cuda":
            import torch

            props = torch.cuda.get_device_properties(0)
            name = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
        self.panel.summary = {
            "device": device,
            "device_name": name,
            "total": int(total),
            "trainable": int(trainable),
            "trainable_pct": 100.0 * trainable / max(1, total),
            "train_blocks": self._n_train_blocks,
        }

    def _set_callout(
        self, key: str, kind: str, title: str, message: str, suggestions: list[str] | None = None
    ) -> None:
        self._callouts[key] = {
            "kind": kind,
            "title": title,
            "message": message,
            "suggestions": suggestions or [],
        }

    def _publish_callouts(self) -> None:
        order = {"danger": 0, "warning": 1, "success": 2, "info": 3}
        self.panel.callouts = sorted(self._callouts.values(), key=lambda c: order.get(c["kind"], 9))

    def _show_failure(
        self, error_type: str, message: str, suggestions: list[str], reason: str = "error", title: str = ""
    ) -> None:
        titles = {"oom": "Out of memory", "nan": "The loss became NaN", "bad_input": "Bad input"}
        heading = title or titles.get(reason, "The run failed")
        text = f"{error_type}: {message}" if error_type and error_type not in message else message
        self._set_callout("status", "danger", heading, text, suggestions)

    # ------------------------------------------------------------------ static summary
    def _ipython_display_(self) -> None:
        """Show the widget, then a placeholder that the static summary replaces when a run ends."""
        from IPython.display import display

        display(self._repr_mimebundle_(), raw=True)
        if self._display_ids is None:
            stamp = f"{id(self):x}-{time.time_ns():x}"
            self._display_ids = (f"lora-dash-table-{stamp}", f"lora-dash-svg-{stamp}")
            for display_id in self._display_ids:
                display({"text/plain": ""}, raw=True, display_id=display_id)
            if any(r.result is not None for r in self.runs):
                self._write_static_summary()
        else:
            for display_id in self._display_ids:
                display({"text/plain": ""}, raw=True, display_id=display_id)
            self._write_static_summary()

    def static_summary_html(self) -> str:
        """An HTML table of every run's outcome (what the saved notebook shows without widgets)."""
        return summary_table_html(self.runs, self.panel.summary)

    def static_summary_svg(self) -> str:
        """The last run's loss curve as a standalone SVG."""
        if not self.runs:
            return loss_curve_svg([], [])
        run = self.runs[-1]
        s, e = run.record.steps, run.record.evals
        idx = decimate_indices(s["loss"], 600)
        return loss_curve_svg(
            s["step"][idx], s["loss"][idx], s["smoothed"][idx], e["step"], e["val_loss"], title=run.label
        )

    def _write_static_summary(self) -> None:
        if self._display_ids is None or not self.runs:
            return
        try:
            from IPython.display import update_display
        except ImportError:  # pragma: no cover
            return
        table_id, svg_id = self._display_ids
        text = "; ".join(
            f"{r.label}: {r.result.kind if r.result else 'running'}, final loss "
            f"{'–' if r.final_loss is None else f'{r.final_loss:.4f}'}"
            for r in self.runs
        )
        update_display(
            {"text/html": self.static_summary_html(), "text/plain": text}, raw=True, display_id=table_id
        )
        update_display(
            {"image/svg+xml": self.static_summary_svg(), "text/plain": "loss curve"},
            raw=True,
            display_id=svg_id,
        )
