"""lora_widgets: a live LoRA fine-tuning dashboard for Jupyter, a correct LoRA core, and a memory planner.

Public names are loaded lazily (PEP 562), so ``import lora_widgets`` is instant and a headless script that
uses only the trainer never imports the widget stack (anywidget, ipywidgets, bqplot).

Layers, imports pointing one way::

    core: lora_config, lora, peft_format, data, chat_data, sft, corpora, devices, memory, events, schedules,
          adapter_statistics, alerts, diagnosis
      <-  training/ (our Trainer) and hf_bridge (an attached transformers/TRL trainer)
      <-  widget/ (views of the event stream)
      <-  notebooks and docs
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    # LoRA core
    "LoRAConfig": "lora_config",
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
    "lora_state_dict": "peft_format",
    "save_adapter": "peft_format",
    "load_adapter": "peft_format",
    # events
    "RunStarted": "events",
    "StepMetrics": "events",
    "EvalMetrics": "events",
    "CheckpointSaved": "events",
    "StateChanged": "events",
    "RunFinished": "events",
    "RunEarlyStopped": "events",
    "RunStopped": "events",
    "RunFailed": "events",
    "DataPrepared": "events",
    "event_from_dict": "events",
    "RunSource": "events",
    "Replay": "replay",
    "read_events": "replay",
    # adapter statistics, "is it training?" alerts, sample generations (issue 14)
    "AdapterStats": "events",
    "AdapterLayerStats": "events",
    "SampleGenerations": "events",
    "SamplePair": "events",
    "adapter_stats": "adapter_statistics",
    "snapshot_adapters": "adapter_statistics",
    "summarize_adapter_stats": "adapter_statistics",
    "lowrank_singular_values": "adapter_statistics",
    "AdapterSummary": "adapter_statistics",
    "Alert": "alerts",
    "AlertMonitor": "alerts",
    "generate_samples": "samples",
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
    # instruction and chat data (TRL's row formats, loss on the answers)
    "load_rows": "chat_data",
    "normalize_rows": "chat_data",
    "prepare_sft": "sft",
    "SFTStats": "sft",
    "collate": "sft_batches",
    "iter_batches": "sft_batches",
    "masked_lm_loss": "sft_batches",
    "answer_loss": "sft_eval",
    "end_of_turn_share": "sft_eval",
    "read_instructions": "corpora",
    # devices, schedules, training
    "list_devices": "devices",
    "select_device": "devices",
    "describe_device": "devices",
    "lr_schedule": "schedules",
    "TrainConfig": "train_config",
    "Trainer": "training.trainer",
    "EarlyStopping": "training.early_stopping",
    # sweeps (issue 22)
    "Sweep": "sweep",
    "Grid": "sweep",
    "Points": "sweep",
    "RandomSearch": "sweep",
    "LogUniform": "sweep",
    "Halving": "sweep",
    "History": "history",
    # Hugging Face / TRL trainers as a run source (imports transformers when used)
    "HFRun": "hf_bridge",
    "EventCallback": "hf_callback",
    "describe_settings": "hf_args",
    "logging_advice": "hf_args",
    # memory
    "estimate_memory": "memory_estimate",
    "measure_memory": "memory_measure",
    "MemoryEstimate": "memory_estimate",
    "known_models": "memory_arch",
    "preflight": "memory",
    "suggest_fit": "memory",
    "PreflightResult": "memory",
    "MemoryMeasurement": "memory_measure",
    # widgets (import anywidget/bqplot only when used)
    "LoRADashboard": "widget",
    "MemoryPlanner": "widget",
    "SweepView": "widget.sweep_view",
    "sweep_from_dashboard": "widget.sweep_view",
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
        LoRALinear,
        LoRAReport,
        apply_lora,
        count_parameters,
        disable_adapters,
        has_lora,
        lora_layers,
        merge_and_unload,
        merge_lora,
        remove_lora,
        set_adapters_enabled,
        unmerge_lora,
    )
    from lora_widgets.lora_config import LoRAConfig
    from lora_widgets.memory import PreflightResult, preflight, suggest_fit
    from lora_widgets.memory_arch import known_models
    from lora_widgets.memory_estimate import MemoryEstimate, estimate_memory
    from lora_widgets.memory_measure import MemoryMeasurement, measure_memory
    from lora_widgets.peft_format import load_adapter, lora_state_dict, save_adapter
    from lora_widgets.replay import Replay, read_events


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lora_widgets' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lora_widgets.{module}"), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return __all__
