"""A dashboard attached to a trainer that owns its settings: ``LoRADashboard(trainer=hf_trainer)``.

One job: turn the ``trainer=`` argument into the :class:`~lora_widgets.events.types.RunSource` the dashboard drives
(a ``transformers.Trainer`` or TRL ``SFTTrainer`` is wrapped in :class:`~lora_widgets.hf.run.HFRun`, imported
only then, so importing the dashboard does not import transformers' trainer), and say what the panel shows for
it instead of its own controls: the trainer's settings read-only, the logging advice before the run starts, and
why the learning-rate chart shows only the logged rates when the schedule cannot be previewed.

A source "describes its settings" when it has a ``settings`` mapping (``HFRun.settings``); ``advice()`` and
``total_steps`` are used when present. Nothing here reads anything else from a source: the run itself is seen
through its events, as every run is.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch

from lora_widgets.events.types import RunSource
from lora_widgets.widget import callouts as callouts_mod
from lora_widgets.widget.callouts import Callouts
from lora_widgets.widget.loading import Loaded, is_hf_trainer
from lora_widgets.widget.readouts import schedule_preview

__all__ = [
    "attached_source",
    "check_can_start",
    "device_type_of",
    "model_of",
    "panel_traits",
    "rolled_back",
    "show_source",
    "source_settings",
    "total_steps_of",
    "train_rows_of",
]

_PROGRESS_VIEWS = frozenset({"NotebookProgressCallback", "ProgressCallback", "PrinterCallback"})
"""transformers' own progress displays, which the dashboard replaces for a trainer attached to it."""


def attached_source(trainer: Any, **others: Any) -> RunSource | None:
    """The run source for ``LoRADashboard(trainer=...)``: an ``HFRun`` around a transformers/TRL trainer, or
    ``trainer`` itself when it already is a :class:`~lora_widgets.events.types.RunSource` (an ``HFRun``).

    ``others``: the dashboard's other arguments; any that is set is refused (the trainer brings its model,
    data and settings). A trainer that is training now (its ``train()`` running in another thread or cell)
    is refused too: attaching would change the run in progress (see :func:`rolled_back`).

    ``None`` for ``trainer=None`` (the dashboard trains with its own ``LoRATrainer``).

    Raises:
        TypeError: ``trainer`` is neither, or other arguments were given with it.
        RuntimeError: the trainer is training now (:func:`lora_widgets.hf.guard.refuse_if_trainer_busy`).
    """
    if trainer is None:
        return None
    given = sorted(k for k, v in others.items() if v is not None)
    if given:
        raise TypeError(
            f"LoRADashboard(trainer=...) got {', '.join(given)} too; an attached trainer brings its own model, "
            "data and settings: set them on the trainer (its TrainingArguments), or build the dashboard "
            "without trainer= to train with lora_widgets' own LoRATrainer"
        )
    if is_hf_trainer(trainer):
        from lora_widgets.hf.guard import refuse_if_trainer_busy
        from lora_widgets.hf.run import HFRun  # imports transformers' Trainer: only for an attached one

        refuse_if_trainer_busy(trainer, "attach a dashboard to this trainer now")
        source = HFRun(trainer)
        source.made_by_dashboard = True  # type: ignore[attr-defined]  # rolled_back may detach it
        return source
    if isinstance(trainer, RunSource):
        return trainer
    raise TypeError(
        f"trainer must be a transformers.Trainer or trl.SFTTrainer (or a lora_widgets RunSource such as "
        f"HFRun(hf_trainer)), got {type(trainer).__name__}; to train with lora_widgets' own Trainer, pass "
        "model=, train_data=, lora= and train= instead"
    )


def rolled_back(init: Callable[..., None]) -> Callable[..., None]:
    """``LoRADashboard.__init__`` wrapped so that, for an attached transformers trainer, the dashboard becomes
    the trainer's view only once it is built: then transformers' own progress display
    (``NotebookProgressCallback``, ``ProgressCallback``, ``PrinterCallback``) is removed from it, since it would
    print from the worker thread into whichever cell ran last (``hf_trainer.add_callback(...)`` puts one back).
    If the construction fails, the trainer is left as it was: its callbacks untouched, and the event bridge
    the ``HFRun`` made here attached removed again."""

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except BaseException:
            source = getattr(self, "_attached", None)
            if getattr(source, "made_by_dashboard", False):
                source.detach()  # type: ignore[union-attr]
            raise
        source = self._attached
        if getattr(source, "made_by_dashboard", False):
            trainer = source.hf_trainer
            for callback in list(trainer.callback_handler.callbacks):
                if type(callback).__name__ in _PROGRESS_VIEWS:
                    trainer.remove_callback(callback)

    return wrapper


def check_can_start(source: Any) -> None:
    """Raise if ``source`` says it cannot start now (``HFRun.check_can_start``: a run of its trainer in
    progress, whoever started it, or a setting transformers would fail on), before anything is changed."""
    check = getattr(source, "check_can_start", None)
    if callable(check):
        check()


def model_of(source: Any) -> Any:
    """The model an attached source trains (``HFRun.hf_trainer.model``, or the source's ``model``); None if
    it does not say."""
    hf = getattr(source, "hf_trainer", None)
    return getattr(hf, "model", None) if hf is not None else getattr(source, "model", None)


def device_type_of(model: Any) -> str:
    """Where ``model``'s parameters are (``cpu``, ``cuda``, ``mps``): transformers' Trainer placed them."""
    try:
        return str(next(model.parameters()).device.type)
    except (AttributeError, StopIteration, TypeError):
        return "cuda" if torch.cuda.is_available() else "cpu"


def source_settings(source: Any) -> dict[str, Any]:
    """The settings a source describes (``HFRun.settings``), or ``{}`` when it describes none."""
    settings = getattr(source, "settings", None)
    return dict(settings) if isinstance(settings, Mapping) else {}


def total_steps_of(source: Any) -> int | None:
    """Optimizer updates the source's next run will make, when it knows (``HFRun.total_steps``)."""
    total = getattr(source, "total_steps", None)
    return int(total) if isinstance(total, int) and total > 0 else None


def train_rows_of(source: Any) -> int | None:
    """Rows of an attached trainer's training dataset (``None`` when it has no length)."""
    dataset = getattr(getattr(source, "hf_trainer", None), "train_dataset", None)
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return None


def panel_traits(source: RunSource | None) -> dict[str, Any]:
    """The panel's starting traits for an attached source: no control inputs (``control_specs=[]``), since
    the trainer's settings are shown read-only instead; ``{}`` for the dashboard's own runs."""
    return {} if source is None else {"control_specs": []}


def show_source(source: Any, panel: Any, callouts: Callouts, charts: Any) -> bool:
    """Show what a source that describes its settings says before it runs: the settings (``panel``'s
    ``attached_settings``), its logging advice and learning-rate note (``callouts``), and its schedule on the
    learning-rate chart (cleared when it cannot be previewed). Returns False, showing nothing, for a source
    that describes no settings (a :class:`~lora_widgets.events.replay.Replay`, our own ``LoRATrainer``)."""
    settings = source_settings(source)
    if not settings:
        return False
    panel.attached_settings = settings
    callouts.put("advice", callouts_mod.advice_callout(source))
    callouts.put("lr", callouts_mod.lr_note_callout(settings))
    preview = schedule_preview(settings, total_steps_of(source))
    charts.set_schedule(preview if preview is not None else ([], []))
    return True


def loaded_of(source: Any) -> Loaded:
    """What the dashboard works on for an attached trainer: its model, and no data of our own."""
    model = model_of(source)
    return Loaded(model, None, True, device_type_of(model))
