"""The anywidget half of the dashboard: synced traits for every control, and their validation.

``DashboardPanel`` mirrors ``static/dashboard.d.ts`` (the typed front-end model); the ES module and CSS
are plain files under ``static/`` (no build step). ``validate_settings`` flags combinations that cannot
work before Train is pressed, so the button is disabled with a reason instead of a run failing later.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import anywidget
import traitlets as t

from lora_widgets.schedules import SCHEDULES
from lora_widgets.train_config import PRECISIONS

__all__ = ["DashboardPanel", "validate_settings"]

_STATIC = Path(__file__).parent / "static"


class DashboardPanel(anywidget.AnyWidget):
    """The anywidget half of the dashboard: controls, buttons, status, progress, summary and callouts.

    Every control is a synced trait; the buttons send custom messages (``{"type": "train"}``, ``"pause"``,
    ``"resume"``, ``"stop"``) that :class:`LoRADashboard` handles in Python.
    """

    _esm = _STATIC / "dashboard.js"
    _css = _STATIC / "dashboard.css"

    # LoRA
    rank = t.Int(8, help="LoRA rank r (>= 1): the inner dimension of B·A.").tag(sync=True)
    alpha = t.Float(16.0, help="LoRA alpha (> 0): the update is scaled by alpha / r.").tag(sync=True)
    dropout = t.Float(0.0, help="Dropout on the LoRA branch's input, in [0, 1).").tag(sync=True)
    target_modules = t.Unicode(
        "",
        help="Modules to adapt: empty for the architecture's default, 'all-linear', or a comma-separated "
        "list of module-name suffixes such as 'q_proj,v_proj'.",
    ).tag(sync=True)
    target_choices = t.List(t.Unicode(), help="Suggestions offered for target_modules.").tag(sync=True)
    # training
    learning_rate = t.Float(3e-3, help="Peak learning rate (> 0).").tag(sync=True)
    schedule = t.Unicode("cosine", help="Learning-rate schedule: constant, linear or cosine.").tag(sync=True)
    warmup_steps = t.Int(0, help="Linear warm-up steps (>= 0, fewer than max_steps).").tag(sync=True)
    batch_size = t.Int(8, help="Sequences per micro-batch (>= 1).").tag(sync=True)
    grad_accum_steps = t.Int(1, help="Micro-batches accumulated per optimizer step (>= 1).").tag(sync=True)
    epochs = t.Int(1, help="Passes over the training data when max_steps is 0.").tag(sync=True)
    max_steps = t.Int(200, help="Optimizer steps; 0 means 'use epochs'.").tag(sync=True)
    precision = t.Unicode("fp32", help="fp32, bf16 or fp16 (fp16 needs a GPU).").tag(sync=True)
    seed = t.Int(0, help="Random seed of the run.").tag(sync=True)
    # run
    state = t.Unicode("idle", help="idle, running, paused, stopped, finished or failed.").tag(sync=True)
    progress = t.Dict(help="step, total, elapsed, eta, tokens_per_s, epoch of the current run.").tag(
        sync=True
    )
    summary = t.Dict(
        help="device, trainable/total parameters and %, adapter size on disk, validation loss, perplexity."
    ).tag(sync=True)
    callouts = t.List(
        t.Dict(), help="Messages: {kind: success|warning|danger|info, title, message, suggestions}."
    ).tag(sync=True)
    errors = t.Dict(help="Invalid settings, control name -> why; Train is disabled while any.").tag(sync=True)
    log_scale = t.Bool(False, help="Show the loss chart on a logarithmic y axis.").tag(sync=True)
    run_label = t.Unicode("", help="Configuration label of the current or last run.").tag(sync=True)

    CONFIG_TRAITS: ClassVar[tuple[str, ...]] = (
        "rank", "alpha", "dropout", "target_modules", "learning_rate", "schedule", "warmup_steps",
        "batch_size", "grad_accum_steps", "epochs", "max_steps", "precision", "seed",
    )  # fmt: skip


def validate_settings(
    values: dict[str, Any], device_type: str = "cpu", n_train_blocks: int | None = None
) -> dict[str, str]:
    """Check a set of control values before Train is pressed; return ``{control: message}`` for bad ones.

    Catches what would otherwise fail (or silently misbehave) only after a run has started: a
    non-positive alpha or learning rate, warm-up as long as the run, fp16 on a CPU, an effective batch
    larger than the training data.
    """
    errors: dict[str, str] = {}
    if values["rank"] < 1:
        errors["rank"] = f"rank must be at least 1, got {values['rank']}"
    if not values["alpha"] > 0:
        errors["alpha"] = f"alpha must be > 0, got {values['alpha']}"
    if not 0.0 <= values["dropout"] < 1.0:
        errors["dropout"] = f"dropout must be in [0, 1), got {values['dropout']}"
    lr = values["learning_rate"]
    if not (lr > 0 and math.isfinite(lr)):
        errors["learning_rate"] = f"learning rate must be > 0, got {lr}"
    elif lr >= 1.0:
        errors["learning_rate"] = f"learning rate {lr} is far too high for AdamW; try 1e-4 to 1e-2"
    if values["schedule"] not in SCHEDULES:
        errors["schedule"] = f"schedule must be one of {', '.join(SCHEDULES)}, got {values['schedule']!r}"
    if values["batch_size"] < 1:
        errors["batch_size"] = f"batch size must be at least 1, got {values['batch_size']}"
    if values["grad_accum_steps"] < 1:
        errors["grad_accum_steps"] = (
            f"gradient accumulation must be at least 1, got {values['grad_accum_steps']}"
        )
    if values["max_steps"] < 0:
        errors["max_steps"] = f"max steps must be >= 0 (0 = use epochs), got {values['max_steps']}"
    if values["max_steps"] == 0 and values["epochs"] < 1:
        errors["epochs"] = f"epochs must be at least 1 when max steps is 0, got {values['epochs']}"
    if values["warmup_steps"] < 0:
        errors["warmup_steps"] = f"warm-up must be >= 0, got {values['warmup_steps']}"
    elif values["max_steps"] > 0 and values["warmup_steps"] >= values["max_steps"]:
        errors["warmup_steps"] = (
            f"warm-up ({values['warmup_steps']} steps) must be shorter than max steps ({values['max_steps']})"
        )
    if values["precision"] not in PRECISIONS:
        errors["precision"] = f"precision must be one of {', '.join(PRECISIONS)}, got {values['precision']!r}"
    elif values["precision"] == "fp16" and device_type == "cpu":
        errors["precision"] = "fp16 needs a GPU; on a CPU use fp32 (or bf16)"
    if (
        n_train_blocks is not None
        and "batch_size" not in errors
        and "grad_accum_steps" not in errors
        and values["batch_size"] * values["grad_accum_steps"] > n_train_blocks
    ):
        errors["batch_size"] = (
            f"batch size x accumulation = {values['batch_size'] * values['grad_accum_steps']} sequences per step, "
            f"but the training data has only {n_train_blocks} blocks; lower one of them"
        )
    return errors


def _targets_to_text(targets: Any) -> str:
    if targets is None:
        return ""
    if isinstance(targets, str):
        return targets
    return ",".join(str(x) for x in targets)


def _targets_from_text(text: str) -> str | list[str] | None:
    text = text.strip()
    if not text or text == "default":
        return None
    if text == "all-linear":
        return "all-linear"
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if len(parts) == 1 and any(c in parts[0] for c in "*()[]|\\^$+?"):
        return parts[0]  # a regular expression, full-matched against module paths
    return parts
