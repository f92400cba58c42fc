"""The LoRA core: settings, the adapted layer, apply/merge/remove, PEFT-format files, adapter statistics.

=================  ==========================================================================================
``config``         :class:`LoRAConfig` and the one scaling rule (``alpha / r`` or rsLoRA's ``alpha / sqrt(r)``)
``layers``         :class:`LoRALinear` (W0 x + s B A x) and the model operations: apply, merge, unmerge, remove
``dora``           DoRA's magnitude and direction (``LoRAConfig(use_dora=True)``), as PEFT computes it
``init``           how A and B start (``init_lora_weights``: Kaiming, Gaussian, PiSSA), as PEFT draws them
``peft_format``    ``adapter_model.safetensors`` + ``adapter_config.json`` as PEFT writes and reads them
``statistics``     per-layer adapter statistics: norms, update ratio, effective rank, singular values
=================  ==========================================================================================
"""

from __future__ import annotations

from lora_widgets.lora.config import LoRAConfig, lora_scaling
from lora_widgets.lora.layers import (
    LoRALinear,
    LoRAReport,
    apply_lora,
    count_parameters,
    disable_adapters,
    has_lora,
    lora_layers,
    merge_lora,
    remove_lora,
    unmerge_lora,
)
from lora_widgets.lora.peft_format import load_adapter, lora_state_dict, save_adapter
from lora_widgets.lora.statistics import (
    AdapterSummary,
    adapter_stats,
    lowrank_singular_values,
    snapshot_adapters,
    summarize_adapter_stats,
)

__all__ = [
    "AdapterSummary",
    "LoRAConfig",
    "LoRALinear",
    "LoRAReport",
    "adapter_stats",
    "apply_lora",
    "count_parameters",
    "disable_adapters",
    "has_lora",
    "load_adapter",
    "lora_layers",
    "lora_scaling",
    "lora_state_dict",
    "lowrank_singular_values",
    "merge_lora",
    "remove_lora",
    "save_adapter",
    "snapshot_adapters",
    "summarize_adapter_stats",
    "unmerge_lora",
]
