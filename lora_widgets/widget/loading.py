"""What a dashboard needs before its first run: the model and tokenizer, the device, and the data.

One job: turn ``LoRADashboard``'s arguments into a model, a tokenizer and tokenised ``(train, val)`` data
(token blocks, or instruction examples), with the same rules as the trainer
(:func:`lora_widgets.training.batches.load_run_data`), so bad data is reported when the dashboard is built
rather than when Train is pressed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from lora_widgets.data.sources import Source, classify_source
from lora_widgets.events.types import DataPrepared
from lora_widgets.lora.layers import LoRAConfig, has_lora

__all__ = [
    "check_arguments",
    "data_event",
    "guess_device_type",
    "is_hf_trainer",
    "quiet_hub_progress",
    "resolve_data",
    "resolve_model",
]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_hub_progress() -> Iterator[None]:
    """Switch transformers' progress bars off while the dashboard loads a model, then restore them."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def check_arguments(kwargs: dict[str, Any], lora: Any, train: Any, train_fields: tuple[str, ...]) -> None:
    """Refuse unknown keyword arguments and configs of the wrong type, naming them and the fix."""
    if kwargs:
        valid = "model, tokenizer, train_data, eval_data, lora, train (or trainer= alone)"
        raise TypeError(
            f"LoRADashboard() got unexpected keyword argument(s) {', '.join(sorted(kwargs))}; "
            f"valid arguments are {valid} (LoRA settings go in lora=LoRAConfig(...), training "
            "settings in train=TrainConfig(...))"
        )
    if lora is not None and not isinstance(lora, LoRAConfig):
        raise TypeError(f"lora must be a LoRAConfig, got {type(lora).__name__}")
    missing = [f for f in train_fields if not hasattr(train, f)]
    if missing or not dataclasses.is_dataclass(train):
        raise TypeError(f"train must be a TrainConfig, got {type(train).__name__}")


def is_hf_trainer(obj: Any) -> bool:
    """True for a ``transformers.Trainer`` or a subclass (TRL's ``SFTTrainer``, a user's own), told from the
    class's ancestry, so the dashboard does not import transformers' trainer module to recognise one."""
    return any(
        cls.__name__ == "Trainer" and cls.__module__.split(".")[0] == "transformers"
        for cls in type(obj).__mro__
    )


def resolve_model(model: Any, tokenizer: Any, data: Source) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from the dashboard's arguments, ``data`` already classified at the data door.

    ``None`` loads the shipped base model; a hub id or path loads it (no 'Loading weights' bar above the
    widget); a model object is used as it is and then needs its tokenizer, unless the data are ready-made
    token blocks (a tensor).
    """
    if model is None or isinstance(model, str | Path):
        from lora_widgets import models as demo

        if tokenizer is not None and model is not None:
            raise TypeError("pass tokenizer only with a model object; a hub id or path loads its own")
        with quiet_hub_progress():
            return demo.load_base_model() if model is None else demo.load_model(str(model))
    if is_hf_trainer(model):
        raise TypeError(
            f"model is a {type(model).__name__}: to attach a transformers or TRL trainer, pass it as trainer=, "
            "e.g. LoRADashboard(trainer=trainer)"
        )
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"model must be a transformers model (a torch.nn.Module), a hub id or a local path, got "
            f"{type(model).__name__}; e.g. model='HuggingFaceTB/SmolLM2-135M', or leave it out for the shipped model"
        )
    if tokenizer is None and data.kind != "blocks":
        raise TypeError(
            "tokenizer is required when model is a model object; pass tokenizer=..., "
            "or pass the model's hub id / local path instead"
        )
    return model, tokenizer


def guess_device_type(train: Any) -> str:
    """The device type (``cpu``, ``cuda``, ``mps``) the trainer will pick for ``train.device``."""
    from lora_widgets.devices import select_device

    pref = str(getattr(train, "device", "auto") or "auto")
    try:
        return select_device(pref).type
    except (ValueError, RuntimeError) as exc:  # the trainer reports a bad device when it is built
        logger.warning("device %r: %s; assuming its type for the dashboard", pref, exc)
        return "cuda" if pref == "auto" and torch.cuda.is_available() else pref.split(":")[0]


def resolve_data(train_source: Any, eval_source: Any, tokenizer: Any, train: Any) -> Any:
    """Tokenise and split the data once (every run reuses it), by the trainer's own rule
    (:func:`lora_widgets.training.batches.load_run_data`; a classified :class:`~lora_widgets.data.sources.Source`
    is taken as it is): a ``RunData`` ``(train, val | None, split)``, token blocks ``[n, T]`` for text, or
    :class:`~lora_widgets.data.prepared.Examples` for instruction/chat rows (tokenised with ``train.max_length``
    and ``train.train_on``, which no control changes)."""
    from lora_widgets.training.batches import load_run_data  # tokenizers load lazily

    return load_run_data(train_source, eval_source, tokenizer, train)


def data_event(data: Any, train: Any) -> DataPrepared:
    """The facts of the prepared ``RunData`` ``(train, val, split)``, as a run will publish them (one rule, the
    trainer's)."""
    from lora_widgets.training.batches import data_prepared

    return data_prepared(data.train, data.val, train, data.split)


@dataclasses.dataclass
class Loaded:
    """What a dashboard works on: the model and tokenizer, the prepared data and its view, where it trains.

    For an attached trainer (``LoRADashboard(trainer=...)``) the trainer owns model, data and settings: no
    data is prepared here and the data view shows only the facts its ``DataPrepared`` event reports.
    """

    model: Any
    tokenizer: Any
    adapters_given: bool  # the model already carries adapters: trained as they are (LoRATrainer(lora=None))
    device_type: str
    data: Any = None  # a training.batches.RunData (train, eval, split): blocks or examples
    n_train_blocks: int | None = None
    data_view: Any = None  # a widget.data_view.DataView for our own data
    source: Any = None  # what the model was loaded from (None: the shipped model), for the "base" control
    given: bool = True  # the model is the user's object: it cannot be loaded again at another base


def load(model: Any, tokenizer: Any, train_data: Any, eval_data: Any, train: Any) -> Loaded:
    """Load the model (or the shipped one) and prepare the data; bad data raises here, naming the problem,
    before anything is shown."""
    from lora_widgets.widget.data_view import DataView, data_facts

    given = not (model is None or isinstance(model, str | Path))
    # what the data is, decided once at the data door (bad data is named before a model loads)
    source = classify_source("python-docs" if train_data is None else train_data, role="run")
    name, (model, tokenizer) = model, resolve_model(model, tokenizer, source)
    data = resolve_data(source, eval_data, tokenizer, train)
    view = DataView(data[0], tokenizer, data_facts(data_event(data, train)))
    adapters = has_lora(model)
    device = guess_device_type(train)
    return Loaded(model, tokenizer, adapters, device, data, int(data[0].shape[0]), view, name, given)
