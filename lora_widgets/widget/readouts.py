"""What the panel's progress line and summary show, computed from a run's record or from the settings.

Pure functions (no widgets): the dashboard assigns their results to the panel's ``progress`` and ``summary``
traits. Before a run, the summary shows what the current settings *will* train (:func:`planned_params`,
counted on a meta-device copy, never on the user's model) and the learning-rate schedule is drawn from
the settings (:func:`schedule_preview`); during a run both follow the run's events.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from lora_widgets.devices import describe_device, format_bytes
from lora_widgets.events.history import History
from lora_widgets.events.types import SampleGenerations
from lora_widgets.lora.layers import LoRAConfig, count_parameters
from lora_widgets.training.schedules import lr_schedule, steps_per_epoch, total_steps

__all__ = [
    "adapter_summary",
    "idle_summary",
    "planned_params",
    "planned_total_steps",
    "progress_of",
    "samples_of",
    "schedule_note",
    "schedule_preview",
    "summary_of",
]

SHOWN_EXTRAS: tuple[str, ...] = ("mean_token_accuracy", "entropy", "num_tokens")
"""``StepMetrics.extra`` values the progress line shows when a run logs them (TRL's ``SFTTrainer`` does); the
rest stay in the history only, so the progress trait stays a few numbers whatever a trainer logs."""


logger = logging.getLogger(__name__)


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def planned_params(model: nn.Module, lora: LoRAConfig | None) -> tuple[int, int]:
    """``(trainable, total)`` parameters a run with ``lora`` will train on ``model``, without touching it.

    ``lora=None`` (a model that already carries its adapters, such as a PEFT model): counted as it is.
    Otherwise the architecture is instantiated on the meta device with ``lora`` applied (the memory
    planner's :func:`~lora_widgets.memory.arch.param_plan`, cached per architecture), whatever adapters an
    earlier run left on the model. A model without a ``transformers`` config is counted as it is.
    """
    from lora_widgets.memory.arch import param_plan

    config = getattr(model, "config", None)
    if lora is None or not hasattr(config, "to_json_string"):
        return count_parameters(model)
    try:
        plan = param_plan(config, None, lora)
    except (ValueError, KeyError, TypeError) as exc:  # an architecture transformers cannot rebuild
        logger.warning("could not plan the parameters of %s: %s", type(model).__name__, exc)
        return count_parameters(model)
    return plan.trainable, plan.total


def params_summary(trainable: int, total: int) -> dict[str, Any]:
    """The summary's parameter fields."""
    return {
        "trainable": int(trainable),
        "total": int(total),
        "trainable_pct": 100.0 * trainable / max(1, total),
    }


def idle_summary(device_type: str, trainable: int, total: int, n_train_blocks: int | None) -> dict[str, Any]:
    """The summary before any run: the device, what the settings will train, the data's size."""
    name = device_type.upper() if device_type == "cpu" else describe_device(device_type)
    return {
        "device": device_type,
        "device_name": name,
        **params_summary(trainable, total),
        "train_blocks": n_train_blocks,
    }


def progress_of(history: History) -> dict[str, Any]:
    """The progress line: step, total, elapsed, ETA, tokens/s, epoch and loss of the last step."""
    last, started = history.last_step, history.started
    if last is None:
        return {"step": 0, "total": int(started.total_steps) if started else 0}
    return {
        "step": int(last.step),
        "total": int(last.total_steps),
        "elapsed": round(float(last.elapsed_s), 1),
        "eta": _finite(round(float(last.eta_s), 1)),
        "tokens_per_s": _finite(round(float(last.tokens_per_s), 1)),
        "epoch": round(float(last.epoch), 3),
        "loss": _finite(float(last.loss)),
        **_extras(last.extra),
    }


def _extras(extra: Mapping[str, float]) -> dict[str, Any]:
    """The :data:`SHOWN_EXTRAS` a step carries, under ``"extra"`` (nothing when it carries none)."""
    shown = {k: _finite(float(extra[k])) for k in SHOWN_EXTRAS if k in extra}
    return {"extra": shown} if shown else {}


def summary_of(summary: Mapping[str, Any], history: History) -> dict[str, Any]:
    """``summary`` updated with what the run's events say: device, parameters, adapter size, validation."""
    out = dict(summary)
    st = history.started
    if st is not None:
        out.update(device=st.device, device_name=st.device_name, run_dir=st.run_dir)
        out.update(params_summary(st.trainable_params, st.total_params))
        if out.get("adapter_estimated", True):
            est = 4 * int(st.trainable_params)  # fp32 safetensors, before the file exists
            out.update(adapter_bytes=est, adapter_size=f"≈{format_bytes(est)}", adapter_estimated=True)
    ev = history.last_eval
    if ev is not None:
        out.update(
            val_loss=_finite(ev.val_loss),
            best_val_loss=_finite(ev.best_val_loss),
            perplexity=_finite(ev.perplexity),
        )
        accuracy = ev.extra.get("eval_mean_token_accuracy")
        if accuracy is not None:
            out["val_token_accuracy"] = _finite(float(accuracy))
    return out


def adapter_summary(adapter_path: str | None) -> dict[str, Any]:
    """The summary's adapter fields once the run has ended: its size on disk and its path."""
    out: dict[str, Any] = {"adapter_path": adapter_path or ""}
    size = _dir_bytes(adapter_path)
    if size is not None:
        out.update(adapter_bytes=size, adapter_size=format_bytes(size), adapter_estimated=False)
    return out


def _dir_bytes(path: str | None) -> int | None:
    if not path:
        return None
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if not p.is_dir():
        return None
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def planned_total_steps(train: Any, n_train_blocks: int | None) -> int | None:
    """Optimizer updates a run with ``train`` makes on ``n_train_blocks`` blocks (the trainer's rule:
    ``max_steps``, else ``epochs`` x updates per epoch); ``None`` when unknown."""
    if not (train.max_steps or n_train_blocks):
        return None
    per_epoch = steps_per_epoch(n_train_blocks or 0, train.batch_size, train.grad_accum_steps)
    return total_steps(train.max_steps or None, int(train.epochs), max(1, per_epoch))


def schedule_preview(
    config: Mapping[str, Any], total_steps: int | None
) -> tuple[np.ndarray, np.ndarray] | None:
    """``(steps, rates)`` of the whole learning-rate schedule, steps 1-based as in ``StepMetrics``.

    ``config`` holds ``learning_rate``, ``warmup_steps`` and ``schedule`` (a ``TrainConfig``'s fields, or
    the ``config`` of a :class:`~lora_widgets.events.types.RunStarted`), or a transformers ``TrainingArguments``
    description (``lr_scheduler_type``: the settings of an attached trainer, see :func:`schedule_note`).
    ``None`` when they do not make a schedule (the controls flag that separately).
    """
    if not total_steps:
        return None
    if "schedule" not in config and "lr_scheduler_type" in config:
        hf = _hf_schedule(config, int(total_steps))
        if hf is None:
            return None
        config = hf
    try:
        lrs = lr_schedule(
            int(total_steps),
            float(config["learning_rate"]),
            int(config["warmup_steps"]),
            str(config["schedule"]),
        )
    except (KeyError, ValueError, TypeError):  # invalid settings: the panel's errors already say why
        return None
    return np.arange(1, len(lrs) + 1), lrs


def _hf_schedule(config: Mapping[str, Any], total_steps: int) -> dict[str, Any] | None:
    """Our schedule settings for a ``TrainingArguments`` description, when its scheduler is one we compute
    identically (no ``lr_scheduler_kwargs``); ``None`` otherwise. A ``warmup_steps`` below 1 is a fraction of
    the run, rounded up, as ``TrainingArguments.get_warmup_steps`` reads it."""
    from lora_widgets.hf.args import hf_schedule  # the one table of scheduler names and warm-up rule

    shape = hf_schedule(config, total_steps)
    if shape is None or not shape[2]:
        return None
    return {"learning_rate": config.get("learning_rate"), "warmup_steps": shape[1], "schedule": shape[0]}


def schedule_note(config: Mapping[str, Any]) -> str | None:
    """Why the learning-rate chart shows only the logged rates (no preview) for a transformers run with these
    settings; ``None`` when :func:`schedule_preview` draws the schedule, or the settings are not a
    ``TrainingArguments`` description."""
    if "schedule" in config:
        return None
    from lora_widgets.hf.args import hf_schedule

    if config.get("lr_scheduler_type") is None:
        return None
    shape = hf_schedule(config, 1)
    if shape is not None and shape[2]:
        return None
    return (
        f"lr_scheduler_type={config.get('lr_scheduler_type')!r}"
        + (" with lr_scheduler_kwargs" if config.get("lr_scheduler_kwargs") else "")
        + " is not previewed here: the chart shows the rates the trainer logs."
    )


ENDED_LEGEND = (
    "✓ the reply ended its turn (it produced the end-of-turn token within the token limit); ✗ it was cut at the "
    "limit. Neither mark says whether the answer is right."
)
"""What the samples table's marks mean, written in the table (the live widget's dashboard.js carries the same
sentence; a test checks they agree): students read a bare ✓ as "correct"."""


def samples_of(record: SampleGenerations | None) -> tuple[list[dict[str, Any]], str]:
    """The panel's ``samples`` (one dict per prompt, with the step) and ``samples_note`` (what they cost)."""
    if record is None:
        return [], ""
    rows = [{**dataclasses.asdict(pair), "step": record.step} for pair in record.samples]
    seconds = record.base_seconds + record.current_seconds
    n = len(record.samples)
    base = "base answers reused" if record.base_reused else "base and current generated"
    note = (
        f"{n} prompt{'s' if n != 1 else ''}, up to {record.max_new_tokens} new tokens each, greedy; {base} in "
        f"{seconds:.2f} s at step {record.step}"
    )
    return rows, note


def run_state_of(run: Any, state: str, previous: Mapping[str, Any]) -> dict[str, Any]:
    """The panel's ``run_state``: the current or last run (a RunRecord, or None) as plain JSON values.

    ``serial`` grows by one at every change, so a reader can tell two states apart even when they look alike
    (two runs that both finished); ``adapter_path`` is only set once the run has ended.
    """
    out: dict[str, Any] = {"serial": int(previous.get("serial", 0)) + 1, "state": state, "run": None,
                           "step": None, "adapter_path": None, "final_loss": None, "best_val_loss": None,
                           "ended": state in ("stopped", "finished", "failed")}  # fmt: skip
    if run is None:
        return out
    ended = run.result
    last = run.history.last_step
    out.update(run=run.label, step=None if last is None else int(last.step), final_loss=_finite(run.final_loss),
               best_val_loss=_finite(run.best_val_loss))  # fmt: skip
    if ended is not None:
        out.update(step=ended.step, adapter_path=ended.adapter_path)
    return out
