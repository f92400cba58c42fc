"""One model, one owner: which models a run is updating, and which adapters a LoRATrainer made.

Both facts live here, in weak module-level tables, not as attributes written onto the user's model: a
model that is garbage-collected simply drops out. They let a LoRATrainer

- refuse to start a second run on a model that a run is updating (two optimizers on one set of weights),
  and refuse to replace the adapters of a model while it trains;
- replace adapters that an earlier LoRATrainer made (each new run of a dashboard does this), but never ones
  the user applied or loaded, and never merged ones (their update is inside the base weights);
- put the earlier adapters back, weights included, if applying the new ones fails.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from lora_widgets.lora.layers import (
    LoRAConfig,
    LoRAReport,
    apply_lora,
    count_parameters,
    has_lora,
    lora_layers,
    remove_lora,
)
from lora_widgets.quantization import base_of, is_quantized

__all__ = ["attach_adapters", "merged_adapters", "refuse_if_training", "training"]

# Models a run is updating right now.
_TRAINING: weakref.WeakSet[nn.Module] = weakref.WeakSet()
# LoRA layers a LoRATrainer created -> the configuration it created them with.
_MADE_BY_TRAINER: weakref.WeakKeyDictionary[nn.Module, LoRAConfig] = weakref.WeakKeyDictionary()


def refuse_if_training(model: nn.Module) -> None:
    """Raise ``RuntimeError`` if a run is updating ``model`` now."""
    if model in _TRAINING:
        raise RuntimeError(
            "another LoRATrainer is training this model right now; stop it (trainer.stop(), or the dashboard's "
            "Stop button) and wait for its run to end before starting another one on the same model"
        )


@contextlib.contextmanager
def training(model: nn.Module) -> Iterator[None]:
    """Hold ``model`` for one run (``RuntimeError`` if another run holds it)."""
    refuse_if_training(model)
    _TRAINING.add(model)
    try:
        yield
    finally:
        _TRAINING.discard(model)


def merged_adapters(model: nn.Module) -> list[str]:
    """Names of the adapter layers (ours or PEFT's) whose update is merged into the base weights."""
    names = [n for n, layer in lora_layers(model).items() if layer.merged]
    names += [n for n, m in model.named_modules() if getattr(m, "merged_adapters", None)]  # PEFT layers
    return names


def _refuse_merged(model: nn.Module) -> None:
    merged = merged_adapters(model)
    if merged:
        raise ValueError(
            f"the model's LoRA adapters are merged into its base weights ({merged[0]}, ... {len(merged)} "
            "layers); training them now would count their update twice. Call "
            "lora_widgets.unmerge_lora(model) (PEFT: model.unmerge_adapter()) first"
        )


def _mark(model: nn.Module, config: LoRAConfig) -> None:
    for layer in lora_layers(model).values():
        _MADE_BY_TRAINER[layer] = config


def _replace(model: nn.Module, lora: LoRAConfig) -> LoRAReport:
    """Swap a LoRATrainer's earlier adapters for new ones; if that fails, restore the earlier ones exactly."""
    old = lora_layers(model)
    old_config = _MADE_BY_TRAINER[next(iter(old.values()))]
    saved = {
        name: ([p.detach().clone() for p in layer.parameters() if p.requires_grad], layer.enabled)
        for name, layer in old.items()
    }  # A, B (and DoRA's magnitude) in registration order, and the enabled flag
    remove_lora(model)
    try:
        report = apply_lora(model, lora)
    except BaseException:
        if has_lora(model):
            remove_lora(model)  # whatever the failed call left
        apply_lora(model, old_config)
        with torch.no_grad():
            for name, layer in lora_layers(model).items():
                values, enabled = saved[name]
                for p, value in zip((p for p in layer.parameters() if p.requires_grad), values, strict=True):
                    p.copy_(value)
                layer.enabled = enabled
        _mark(model, old_config)
        raise
    _mark(model, lora)
    return report


def refuse_quantized_full_finetune(model: nn.Module) -> None:
    """A ``ValueError`` for full fine-tuning of a quantized model: its 4/8-bit weights have no gradient."""
    if is_quantized(model):
        raise ValueError(
            f"full fine-tuning of a quantized model ({base_of(model)} base): its quantized weights cannot train. "
            "Pass lora=LoRAConfig(...) to train adapters on it (QLoRA), or load it with base='16-bit' to "
            "fine-tune every weight"
        )


def attach_adapters(model: nn.Module, lora: LoRAConfig | None) -> tuple[LoRAReport | None, bool]:
    """Give ``model`` the adapters a LoRATrainer will train; returns (report, whether the LoRATrainer made them).

    ``lora=None`` trains what already has ``requires_grad`` and changes nothing. With a config, adapters
    that an earlier LoRATrainer made are replaced; the user's own are refused. Everything is checked before
    the model is touched.

    Raises:
        RuntimeError: a run is training the model now (with ``lora`` given).
        ValueError: merged adapters, the user's own adapters with ``lora`` given, nothing trainable, or
            full fine-tuning (``lora=None``, no adapters) of a quantized model.
    """
    _refuse_merged(model)
    if lora is None:
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(
                "the model has no trainable parameters (every requires_grad is False); pass "
                "lora=LoRAConfig(...) to add adapters, or unfreeze the parameters to fine-tune"
            )
        if not has_lora(model):
            refuse_quantized_full_finetune(model)
            return None, False
        trainable, total = count_parameters(model)
        return LoRAReport(sorted(lora_layers(model)), trainable, total, None), False
    refuse_if_training(model)
    if not has_lora(model):
        report = apply_lora(model, lora)
        _mark(model, lora)
        return report, True
    layers = lora_layers(model)
    if not layers or not all(layer in _MADE_BY_TRAINER for layer in layers.values()):
        raise ValueError(
            "this model already has LoRA adapters; pass lora=None to train them as they are, "
            "or call lora_widgets.remove_lora(model) first to start from the base model"
        )
    return _replace(model, lora), True
