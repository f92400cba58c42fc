"""The anywidget half of the dashboard: one synced trait per control, plus the run's state and messages.

``DashboardPanel`` mirrors ``static/dashboard.d.ts`` (the typed front-end model); the ES module and CSS
are plain files under ``static/`` (no build step). The control traits are generated from the table in
:mod:`lora_widgets.widget.controls` (their help says what each sets), and the table itself is sent as the
``control_specs`` trait, which ``dashboard.js`` renders: adding a control is one line there.
Validation is the configs' own (:func:`~lora_widgets.widget.controls.validate_settings`); the panel shows
their messages in ``errors``.

Read-only mode: a dashboard attached to a trainer that owns its settings (``LoRADashboard(trainer=...)``)
sends ``control_specs=[]`` (no inputs) and the trainer's settings in ``attached_settings``, which the front end
shows as a table.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import anywidget
import traitlets as t

from lora_widgets.widget import controls
from lora_widgets.widget.controls import validate_settings

__all__ = ["DashboardPanel", "validate_settings"]

_STATIC = Path(__file__).parent / "static"

if TYPE_CHECKING:
    _ControlTraits = anywidget.AnyWidget
else:  # a generated base class: one synced trait per control (name, type, default and help from the table)
    _ControlTraits = type(anywidget.AnyWidget)(
        "_ControlTraits",
        (anywidget.AnyWidget,),
        {"__module__": __name__, "__doc__": "One synced trait per dashboard control.", **controls.traits()},
    )


class DashboardPanel(_ControlTraits):
    """The anywidget half of the dashboard: controls, buttons, status, progress, summary and callouts.

    Every control of :data:`~lora_widgets.widget.controls.CONTROLS` is a synced trait of the same name
    (``panel.rank = 16`` does what typing 16 in the box does); the buttons send custom messages
    (``{"type": "train"}``, ``"pause"``, ``"resume"``, ``"stop"``) that :class:`LoRADashboard` handles in
    Python.
    """

    _esm: str | Path = _STATIC / "dashboard.js"  # a path (hot reload); marimo's subclass composes a string
    _css: str | Path = _STATIC / "dashboard.css"

    control_specs = t.List(
        t.Dict(),
        default_value=controls.specs(),
        help="What the front end renders: one {name, label, kind, group, help, min, max, step, choices, "
        "placeholder} per control, from lora_widgets.widget.controls.",
    ).tag(sync=True)
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
    errors = t.Dict(
        help="Invalid settings, control name (or 'settings') -> the config's message; Train is disabled "
        "while any."
    ).tag(sync=True)
    log_scale = t.Bool(False, help="Show the loss chart on a logarithmic y axis.").tag(sync=True)
    run_label = t.Unicode("", help="Configuration label of the current or last run.").tag(sync=True)
    data_view = t.Dict(
        help="The data view (lora_widgets.widget.data_view): facts (examples, truncated, dropped, % trained, "
        "% padding), and one example's tokens as [text, trained] pairs."
    ).tag(sync=True)
    data_index = t.Int(0, help="Which example the data view shows (set by its buttons).").tag(sync=True)
    attached_settings = t.Dict(
        help="The settings of an attached trainer (its TrainingArguments, flat name -> JSON value, 'trainer' "
        "its class name), shown read-only as a table: it owns them. Empty for the dashboard's own runs."
    ).tag(sync=True)
    samples = t.List(
        t.Dict(),
        help="The last sample answers: one {prompt, base, current, base_ended, current_ended, step} per prompt "
        "(*_ended: whether the answer ended with the end-of-turn token; null when unknown).",
    ).tag(sync=True)
    run_state = t.Dict(
        help="The current or last run for reactive readers (marimo): serial (grows at every change), state, run "
        "(its label), step, adapter_path (set once the run has ended), final_loss, best_val_loss, ended."
    ).tag(sync=True)
    run_state_seen = t.Int(
        0,
        help="Set by the marimo front end to run_state's serial once shown: that update re-runs the cells "
        "that read the dashboard's value.",
    ).tag(sync=True)
    samples_note = t.Unicode("", help="What the sample answers cost: prompts, tokens, seconds.").tag(
        sync=True
    )

    CONFIG_TRAITS: ClassVar[tuple[str, ...]] = controls.CONTROL_NAMES
    """The control traits, in display order (the names of ``controls.CONTROLS``)."""

    def control_values(self) -> dict[str, Any]:
        """The controls' current values, by name."""
        return {name: getattr(self, name) for name in self.CONFIG_TRAITS}
