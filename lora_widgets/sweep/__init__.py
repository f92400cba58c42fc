"""Sweeps: many runs of one model, compared side by side (issue 22).

========================  ================================================================================
``space``                 what to try: ``Grid``, ``Points``, ``RandomSearch`` (``LogUniform``); checked early
``runner``                :class:`Sweep`: runs one after another, events, stop/skip, resume, base checksum
``results``               the table (mean and spread over seeds), successive halving (:class:`Halving`)
``events``                the sweep's typed events (``SweepStarted`` ... ``SweepEnded``)
``store``                 ``sweep.json``: the plan and the finished runs, written atomically
``fingerprint``           what a result depends on besides its settings; the rule for reusing a stored run
========================  ================================================================================

Nothing here imports the widget stack; the dashboard's sweep view (:mod:`lora_widgets.widget.sweep_view`)
consumes the events.
"""

from lora_widgets.sweep.events import SweepEnded, SweepRunEnded, SweepRunStarted, SweepStarted
from lora_widgets.sweep.results import Halving, SettingResult
from lora_widgets.sweep.runner import Sweep
from lora_widgets.sweep.space import Grid, LogUniform, Points, RandomSearch

__all__ = [
    "Grid",
    "Halving",
    "LogUniform",
    "Points",
    "RandomSearch",
    "SettingResult",
    "Sweep",
    "SweepEnded",
    "SweepRunEnded",
    "SweepRunStarted",
    "SweepStarted",
]
