"""Memory: what a fine-tune will need (estimate), what it did need (measure), and whether it fits (pre-flight).

=================  ==========================================================================================
``arch``           architectures people fine-tune (offline configs), dtypes, what LoRA adds to each module
``activations``    activation bytes saved for backward, per transformer block (Korthikanti et al. 2022, §4.1)
``estimate``       :func:`estimate_memory`: the peak of a training step, phase by phase
``measure``        :func:`measure_memory`: the same peak, measured on the device
``fit``            :func:`preflight` before a run and :func:`suggest_fit` when it does not fit
=================  ==========================================================================================
"""

from __future__ import annotations

from lora_widgets.memory.arch import known_models
from lora_widgets.memory.estimate import MemoryEstimate, estimate_memory
from lora_widgets.memory.fit import PreflightResult, preflight, suggest_fit
from lora_widgets.memory.measure import MemoryMeasurement, measure_memory

__all__ = [
    "MemoryEstimate",
    "MemoryMeasurement",
    "PreflightResult",
    "estimate_memory",
    "known_models",
    "measure_memory",
    "preflight",
    "suggest_fit",
]
