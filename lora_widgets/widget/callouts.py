"""The dashboard's messages to the user: every callout it shows is built here, and kept one per key.

Each part of the dashboard owns a key (``"status"`` for the run's state, ``"starting"`` while a run has
not made its first step, ``"device"``, ``"preflight"``, ``"adapters"``, ``"alert:<key>"`` for each "is it
training?" alert of the run, :func:`alert_callout`; ``"notice:<key>"`` for a source's notices) and sets or clears its callout by that key; nothing is
found by its title. The panel shows them most severe first.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from lora_widgets.events.types import AlertRaised, Notice, RunEarlyStopped, RunEnded, RunFailed, RunFinished
from lora_widgets.lora.config import LoRAConfig
from lora_widgets.lora.layers import count_parameters
from lora_widgets.widget.readouts import schedule_note

logger = logging.getLogger(__name__)

__all__ = ["ADAPTERS_GIVEN", "ALERT_PREFIX", "NOTICE_PREFIX", "READY", "STARTING", "TRAINING", "Callout", "Callouts",
           "advice_callout", "alert_callout", "cpu_callout", "failure_callout", "lr_note_callout",
           "notice_callout", "outcome_callout", "preflight_callout", "ready_callout"]  # fmt: skip

Kind = Literal["danger", "warning", "success", "info"]
_ORDER: dict[str, int] = {"danger": 0, "warning": 1, "success": 2, "info": 3}
_FAILURE_TITLES = {
    "oom": "Out of memory",
    "nan": "The loss became NaN",
    "bad_input": "Bad input",
    "no_gradient": "No trainable parameter receives a gradient",
}


@dataclass(frozen=True)
class Callout:
    """One message: its severity, a title, the text, and concrete suggestions."""

    kind: Kind
    title: str
    message: str
    suggestions: list[str] = field(default_factory=list)


READY = Callout("info", "Ready", "Adjust the settings, then press Train.")
STARTING = Callout("info", "Starting", "Preparing the run…")
TRAINING = Callout(
    "info",
    "Training in the background",
    "Other cells keep working while this runs; Pause holds it between steps, Stop ends it after the current "
    "step and keeps the adapter.",
)
ADAPTERS_GIVEN = Callout(
    "info",
    "Training the model's own adapters",
    "This model already carries LoRA adapters, so every run trains them as they are (as LoRATrainer(lora=None) "
    "does), continuing from their current weights; the rank, alpha, dropout and target-module controls do "
    "not apply. To try other LoRA settings, pass the base model.",
)


def failure_callout(
    error_type: str, message: str, suggestions: list[str] | tuple[str, ...] = (), reason: str = "error",
    title: str = "",
) -> Callout:  # fmt: skip
    """A danger callout for a failure: a title from the failure's reason, the message with its error type."""
    heading = title or _FAILURE_TITLES.get(reason, "The run failed")
    text = f"{error_type}: {message}" if error_type and error_type not in message else message
    return Callout("danger", heading, text, list(suggestions))


ALERT_PREFIX = "alert:"
"""Keys of the alerts' callouts: ``"alert:no_gradient"``, ... (cleared together when a new run starts)."""


def alert_callout(alert: AlertRaised) -> Callout:
    """An "is it training?" alert as a callout: its title (with the step), the evidence, the fix to try."""
    seen = f" (step {alert.step})" if alert.step is not None else ""
    return Callout(alert.severity, f"{alert.title}{seen}", alert.evidence, [alert.fix])


NOTICE_PREFIX = "notice:"
"""Keys of a source's own notices (a replay's skipped lines, a watch that waits), cleared when a new run starts."""


def notice_callout(notice: Notice) -> Callout | None:
    """A source's :class:`~lora_widgets.events.types.Notice` as a callout (``None``: the notice clears its key)."""
    return Callout(notice.severity, notice.title, notice.message) if notice.message else None


def outcome_callout(
    label: str, ended: RunEnded, final_loss: float | None, best_val_loss: float | None
) -> Callout:
    """How a run ended: success (finished or stopped early), info (stopped) or danger (failed, with the suggestions)."""
    if isinstance(ended, RunFailed):
        return failure_callout(
            ended.error_type or ended.reason, ended.message, ended.suggestions, ended.reason
        )
    parts = [ended.message.rstrip(". ")] if ended.message else []
    if final_loss is not None:
        parts.append(f"final training loss {final_loss:.4g}")
    if best_val_loss is not None:
        parts.append(f"best validation loss {best_val_loss:.4g} (perplexity {math.exp(best_val_loss):.4g})")
    if ended.adapter_path:
        parts.append(f"adapter saved in {ended.adapter_path}")
    text = "; ".join(parts) + "."
    if isinstance(ended, RunEarlyStopped):  # its message says at which step and which step was best
        return Callout("success", f"Stopped early: {label}", text)
    if isinstance(ended, RunFinished):
        return Callout("success", f"Finished {label}", text)
    return Callout("info", f"Stopped at step {ended.step}", text)


class Callouts:
    """Callouts by key; :meth:`as_list` gives what the panel's ``callouts`` trait shows."""

    def __init__(self) -> None:
        self._items: dict[str, Callout] = {}

    def set(self, key: str, callout: Callout) -> None:
        """Show ``callout`` under ``key`` (replacing that key's previous one)."""
        self._items[key] = callout

    def put(self, key: str, callout: Callout | None) -> None:
        """Show ``callout`` under ``key``, or clear that key when it is ``None``."""
        if callout is None:
            self.clear(key)
        else:
            self.set(key, callout)

    def clear(self, *keys: str) -> None:
        """Remove the callouts of ``keys`` (missing keys are fine)."""
        for key in keys:
            self._items.pop(key, None)

    def clear_prefix(self, *prefixes: str) -> None:
        """Remove every callout whose key starts with one of ``prefixes`` (e.g. :data:`ALERT_PREFIX`)."""
        for key in [k for k in self._items if k.startswith(prefixes)]:
            del self._items[key]

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def get(self, key: str) -> Callout | None:
        """The callout under ``key``, if any."""
        return self._items.get(key)

    def as_list(self) -> list[dict[str, Any]]:
        """Every callout as a dict, most severe first (danger, warning, success, info)."""
        ordered = sorted(self._items.values(), key=lambda c: _ORDER[c.kind])
        return [asdict(c) for c in ordered]


def cpu_callout(model: Any) -> Callout:
    """A warning: why training runs on the CPU here, and what that means for time per step."""
    why = "No GPU was found" if not torch.cuda.is_available() else "The trainer is set to device='cpu'"
    millions = count_parameters(model)[1] / 1e6
    return Callout("warning", "Training on the CPU", (
        f"{why}, so this runs on the CPU. That is fine for a model this small ({millions:.1f} M "
        "parameters: a few thousand tokens/s on a laptop, a 200-step run in about a minute), but time "
        "per step grows with the model: a hub model of 100 M+ parameters would be roughly 50-100x "
        "slower per step. On Colab pick a GPU runtime (Runtime > Change runtime type)."
    ))  # fmt: skip


def preflight_callout(
    model: Any, lora: LoRAConfig | None, train: Any, device_type: str, seq_len: int | None = None
) -> Callout | None:
    """A warning when the memory estimate says the run may not fit on the device (the user may still start).

    ``seq_len``: the data's longest sequence: the block size for packed text, the longest padded length for
    instruction examples (the length-grouped order puts that batch first, so it is the peak); default
    ``train.block_size``.
    """
    from lora_widgets.memory.fit import preflight

    try:
        result = preflight(
            model,
            lora,
            batch_size=train.batch_size,
            seq_len=int(seq_len if seq_len is not None else getattr(train, "block_size", 128)),
            dtype=train.resolved(device_type).precision if hasattr(train, "resolved") else train.precision,
            device=device_type,
            gradient_checkpointing=bool(getattr(train, "gradient_checkpointing", False)),
        )
    except Exception as exc:  # the estimate is advice: never block a run on it, but say why it is missing
        logger.warning("memory preflight skipped: %s: %s", type(exc).__name__, exc)
        return None
    if result.fits:
        return None
    return Callout("warning", "This run may not fit in memory", result.message(), list(result.suggestions))


def ready_callout(settings: Mapping[str, Any]) -> Callout:
    """The status before the first run of an attached trainer: what Train does and who owns the settings."""
    name = str(settings.get("trainer") or "trainer")
    return Callout("info", f"Attached to your {name}", (
        f"Train calls {name}.train() in a background thread, so other cells keep working; Pause holds it "
        "between optimizer steps, Stop ends it after the current one (saved as save_strategy says). Its "
        "TrainingArguments own the settings, shown read-only: change them on hf_trainer.args, then press Train."
    ))  # fmt: skip


def advice_callout(source: Any) -> Callout | None:
    """The source's warning that ``logging_steps`` would leave the chart nearly empty (``HFRun.advice()``),
    shown before the run starts; ``None`` when there is none."""
    advice = getattr(source, "advice", None)
    text = advice() if callable(advice) else None
    if not text:
        return None
    return Callout("warning", "The loss chart will be nearly empty", str(text))


def lr_note_callout(config: Mapping[str, Any]) -> Callout | None:
    """Why the learning-rate chart shows only the logged rates (:func:`~lora_widgets.widget.readouts.schedule_note`);
    ``None`` when the schedule is previewed."""
    note = schedule_note(config)
    return None if note is None else Callout("info", "Learning rate: logged values only", note)
