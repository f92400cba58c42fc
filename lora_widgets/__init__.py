"""lora_widgets: a live LoRA fine-tuning dashboard for Jupyter, a correct LoRA core, and a memory planner.

Public names are loaded lazily (PEP 562), so ``import lora_widgets`` is instant and a headless script that
uses only the trainer never imports the widget stack (anywidget, ipywidgets, bqplot).

Layers, imports pointing one way::

    lora, data, corpora, devices, memory, events, schedules  <-  trainer  <-  widget  <-  notebooks/docs
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    # LoRA core
    "LoRAConfig": "lora",
    "LoRALinear": "lora",
    "LoRAReport": "lora",
    "apply_lora": "lora",
    "merge_lora": "lora",
    "merge_and_unload": "lora",
    "unmerge_lora": "lora",
    "remove_lora": "lora",
    "set_adapters_enabled": "lora",
    "disable_adapters": "lora",
    "lora_layers": "lora",
    "has_lora": "lora",
    "count_parameters": "lora",
    "lora_state_dict": "lora",
    "save_adapter": "lora",
    "load_adapter": "lora",
    # events
    "RunStarted": "events",
    "StepMetrics": "events",
    "EvalMetrics": "events",
    "CheckpointSaved": "events",
    "StateChanged": "events",
    "RunFinished": "events",
    "RunStopped": "events",
    "RunFailed": "events",
    "event_from_dict": "events",
    "RunSource": "events",
    # data, corpora and the shipped demo model
    "prepare_data": "data",
    "load_texts": "data",
    "pack_blocks": "data",
    "DataSplit": "data",
    "list_corpora": "demo",
    "load_corpus": "demo",
    "load_base_model": "demo",
    "load_model": "demo",
    "generate": "demo",
    # devices, schedules, training
    "list_devices": "devices",
    "select_device": "devices",
    "describe_device": "devices",
    "lr_schedule": "schedules",
    "TrainConfig": "train_config",
    "Trainer": "trainer",
    "History": "history",
    # Hugging Face / TRL trainers as a run source (imports transformers when used)
    "HFRun": "hf_bridge",
    "EventCallback": "hf_callback",
    "describe_settings": "hf_args",
    "logging_advice": "hf_args",
    # memory
    "estimate_memory": "memory",
    "measure_memory": "memory",
    "MemoryEstimate": "memory",
    "known_models": "memory",
    "preflight": "memory",
    "suggest_fit": "memory",
    "PreflightResult": "memory",
    "MemoryMeasurement": "memory",
    # widgets (import anywidget/bqplot only when used)
    "LoRADashboard": "widget",
    "MemoryPlanner": "widget",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:
    from lora_widgets.events import (
        CheckpointSaved,
        EvalMetrics,
        RunFailed,
        RunFinished,
        RunStarted,
        RunStopped,
        StateChanged,
        StepMetrics,
        event_from_dict,
    )
    from lora_widgets.lora import (
        LoRAConfig,
        LoRALinear,
        LoRAReport,
        apply_lora,
        count_parameters,
        disable_adapters,
        has_lora,
        load_adapter,
        lora_layers,
        lora_state_dict,
        merge_and_unload,
        merge_lora,
        remove_lora,
        save_adapter,
        set_adapters_enabled,
        unmerge_lora,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lora_widgets' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lora_widgets.{module}"), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return __all__
