"""Is the run learning? "Is it training?" alerts and sample generations, from any run's model and events.

==================  =========================================================================================
``alerts``          rules that watch a run's events and say when it is not learning, and why
``samples``         generations from fixed prompts at each evaluation, to read what the model learned
``gradient_check``  trainable parameters that got no gradient, grouped by module: the origin bug, any model
==================  =========================================================================================

Failures (out of memory, NaN, bad input) are diagnosed in :mod:`lora_widgets.training.diagnosis`.
"""

from __future__ import annotations

from lora_widgets.health.alerts import AlertMonitor
from lora_widgets.health.samples import generate_samples

__all__ = ["AlertMonitor", "generate_samples"]
