"""Legend labels of runs: the run's number and the settings a sweep varies (``run 2: r=4 α=16 lr=3e-3``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lora_widgets.events.types import RunStarted
from lora_widgets.training.diagnosis import format_lr
from lora_widgets.widget.controls import targets_to_text

__all__ = ["label_from_started", "run_label"]


def run_label(
    index: int,
    r: int,
    alpha: float,
    lr: float,
    targets: Any = None,
    base: str | None = None,
    loraplus_lr_ratio: float | None = None,
) -> str:
    """A short legend label: number, rank, alpha, learning rate (with LoRA+'s B/A ratio when set), the target
    modules when short, and the base when it is quantized (``run 3: r=8 α=16 lr=3e-3 λB=16 all-linear 4-bit``)."""
    text = targets_to_text(targets)
    where = f" {text}" if text and len(text) <= 16 else (" custom" if text else "")
    quantized = f" {base}" if base and base != "16-bit" else ""
    plus = f" λB={loraplus_lr_ratio:g}" if loraplus_lr_ratio is not None else ""
    return f"run {index}: r={r} α={alpha:g} lr={format_lr(lr)}{plus}{where}{quantized}"


def label_from_started(index: int, started: RunStarted) -> str:
    """The label of a run known only from its :class:`RunStarted` (a replay, a run started elsewhere)."""
    lr = started.config.get("learning_rate")
    lora: Mapping[str, Any] = started.lora or {}
    if "r" not in lora or not isinstance(lr, int | float):  # full fine-tuning, or adapters found on the model
        return f"run {index}: lr={format_lr(lr)}" if isinstance(lr, int | float) else f"run {index}"
    r = int(lora["r"])
    base = started.config.get("base")
    ratio = started.config.get("loraplus_lr_ratio")
    ratio = float(ratio) if isinstance(ratio, int | float) else None
    return run_label(
        index, r, float(lora.get("alpha", r)), float(lr), lora.get("target_modules"), base, ratio
    )
