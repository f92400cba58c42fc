"""lora_widgets: a live LoRA fine-tuning dashboard for Jupyter, a correct LoRA core, and a memory planner.

The names here are the ones a notebook uses; everything else lives in a namespace that says what it holds:

==============================  ===============================================================================
``lora_widgets.lora.layers``           the LoRA core: ``LoRALinear``, statistics, PEFT-format state dicts
``lora_widgets.data.text``           corpora, text blocks, instruction rows and their loss masks (TRL's formats)
``lora_widgets.events.types``         the typed event stream (``StepMetrics`` ... ``RunEnded``), ``History``, ``Replay``
``lora_widgets.memory.fit``         estimate, measurement and pre-flight of a run's memory
``lora_widgets.health``         failure diagnoses, "is it training?" alerts, sample generations
``lora_widgets.hf``             watching and steering a transformers / TRL trainer (``EventCallback``, ``HFRun``)
``lora_widgets.training``       the trainer's phases (``LoRATrainer`` and ``TrainConfig`` are exported here)
``lora_widgets.sweep``          many runs compared: ``Grid``, ``Points``, ``RandomSearch``, ``Halving`` (``Sweep`` here)
``lora_widgets.widget``         the dashboard and the planner (``LoRADashboard``, ``MemoryPlanner`` here)
==============================  ===============================================================================

Names are loaded lazily (PEP 562): ``import lora_widgets`` is instant, and a script that uses only the
trainer never imports the widget stack (anywidget, ipywidgets, bqplot). Imports point one way::

    core: lora/, data/, events/, memory/, health/, models, devices, atomic
      <-  training/ (LoRATrainer) and hf/ (an attached transformers/TRL trainer)
      <-  sweep/ (many LoRATrainer runs)
      <-  widget/ (views of the event stream)
      <-  notebooks and docs
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> submodule that defines it (the one place a top-level name is declared)
_EXPORTS: dict[str, str] = {
    # LoRA core
    "LoRAConfig": "lora.config",
    "apply_lora": "lora.layers",
    "merge_lora": "lora.layers",
    "unmerge_lora": "lora.layers",
    "remove_lora": "lora.layers",
    "disable_adapters": "lora.layers",
    "lora_layers": "lora.layers",
    "count_parameters": "lora.layers",
    "save_adapter": "lora.peft_format",
    "load_adapter": "lora.peft_format",
    # training
    "LoRATrainer": "training.trainer",
    "TrainConfig": "training.config",
    "EarlyStopping": "training.early_stopping",
    # sweeps (issue 22): the rest is in lora_widgets.sweep (Grid, Points, RandomSearch, LogUniform, Halving)
    "Sweep": "sweep.runner",
    # models and data
    "load_base_model": "models",
    "load_model": "models",
    "generate": "models",
    "load_corpus": "data.corpora",
    "load_heldout_code": "data.corpora",
    "prepare_data": "data.text",
    "load_rows": "data.rows",
    # memory
    "estimate_memory": "memory.estimate",
    "measure_memory": "memory.measure",
    "known_models": "memory.arch",
    # devices
    "list_devices": "devices",
    "select_device": "devices",
    "describe_device": "devices",
    # widgets (import anywidget/bqplot only when used)
    "LoRADashboard": "widget.dashboard",
    "MemoryPlanner": "widget.planner",
    "SweepView": "widget.sweep_view",
}

# namespaces reachable as attributes (``lora_widgets.events.types.StepMetrics``) without a separate import
_NAMESPACES = ("lora", "data", "events", "memory", "health", "hf", "training", "sweep", "widget")

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:
    from lora_widgets import data, events, health, hf, lora, memory, sweep, training, widget
    from lora_widgets.data.corpora import load_corpus, load_heldout_code
    from lora_widgets.data.rows import load_rows
    from lora_widgets.data.text import prepare_data
    from lora_widgets.devices import describe_device, list_devices, select_device
    from lora_widgets.lora.config import LoRAConfig
    from lora_widgets.lora.layers import (
        apply_lora,
        count_parameters,
        disable_adapters,
        lora_layers,
        merge_lora,
        remove_lora,
        unmerge_lora,
    )
    from lora_widgets.lora.peft_format import load_adapter, save_adapter
    from lora_widgets.memory.arch import known_models
    from lora_widgets.memory.estimate import estimate_memory
    from lora_widgets.memory.measure import measure_memory
    from lora_widgets.models import generate, load_base_model, load_model
    from lora_widgets.sweep.runner import Sweep
    from lora_widgets.training.config import TrainConfig
    from lora_widgets.training.early_stopping import EarlyStopping
    from lora_widgets.training.trainer import LoRATrainer
    from lora_widgets.widget.dashboard import LoRADashboard
    from lora_widgets.widget.planner import MemoryPlanner
    from lora_widgets.widget.sweep_view import SweepView


def __getattr__(name: str) -> Any:
    if name in _NAMESPACES:
        value = importlib.import_module(f"lora_widgets.{name}")
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(f"lora_widgets.{_EXPORTS[name]}"), name)
    else:
        raise AttributeError(f"module 'lora_widgets' has no attribute {name!r}")
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, *_NAMESPACES])
