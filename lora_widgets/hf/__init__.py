"""Watch and steer a transformers or TRL trainer: its events in the same stream as ours.

=============  ==============================================================================================
``args``       what a ``TrainingArguments`` means to the dashboard: settings shown read-only, logging advice
``callback``   :class:`EventCallback`, a ``TrainerCallback`` that publishes our typed events and obeys Stop/Pause
``run``        :class:`HFRun`, the run source that trains an attached trainer in a worker thread
=============  ==============================================================================================

``LoRADashboard(trainer=hf_trainer)`` does all of this in one line.
"""

from __future__ import annotations

from lora_widgets.hf.args import describe_settings, logging_advice
from lora_widgets.hf.callback import EventCallback
from lora_widgets.hf.run import HFRun

__all__ = ["EventCallback", "HFRun", "describe_settings", "logging_advice"]
