"""Numeric precision and the model's preparation for training, and putting it back afterwards.

- ``TrainConfig.precision`` -> autocast dtype, in one table (:data:`AUTOCAST_DTYPES`); ``"fp32"`` runs
  under ``nullcontext()``, so the step has no branch for it.
- The loss scaler is always a ``torch.amp.GradScaler``, enabled only for fp16 (Micikevicius et al. 2018,
  "Mixed Precision Training", sec. 3.2); disabled, it passes the loss and the optimizer step through.
- Gradient checkpointing (recomputing activations in the backward pass; Chen et al. 2016, "Training Deep
  Nets with Sublinear Memory Cost") is switched on through transformers' own method and switched back off
  at the end if the run turned it on.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lora_widgets.quantization import is_quantized
from lora_widgets.training.kbit import KbitState, check_quantized_device, prepare_kbit
from lora_widgets.training.packed_attention import attention_of, restore_attention

__all__ = [
    "AUTOCAST_DTYPES",
    "ModelMode",
    "autocast",
    "grad_scaler",
    "prepare_model",
    "release_memory",
]

logger = logging.getLogger(__name__)

AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``TrainConfig.precision`` -> the dtype matmuls run in under ``torch.autocast`` (``None``: no autocast)."""


def autocast(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """A factory of the context each forward pass runs in: ``torch.autocast`` or ``nullcontext``."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """The loss scaler: enabled for fp16 only; disabled it is an identity the step can call unconditionally."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def _checkpointing_method(model: nn.Module, action: str) -> Callable[..., Any] | None:
    """``model.activation_checkpointing_<action>`` (transformers 5) or ``gradient_checkpointing_<action>``."""
    for prefix in ("activation", "gradient"):
        method = getattr(model, f"{prefix}_checkpointing_{action}", None)
        if callable(method):
            return method
    return None


def _checkpointing_on(model: nn.Module) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5 / 4
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


@dataclass(frozen=True)
class ModelMode:
    """What a run changes in the model's mode, as it was before the run, to put back after it."""

    training: bool
    switches_checkpointing: bool  # the run switches gradient checkpointing on (it was off)
    # a quantized base's compute dtypes and input-grad hook before the run
    kbit: KbitState = field(default_factory=KbitState)
    # each config's attention implementation (a packed run switches SDPA to per-example attention)
    attention: list[tuple[Any, str]] = field(default_factory=list)

    @classmethod
    def of(cls, model: nn.Module, gradient_checkpointing: bool) -> ModelMode:
        """The mode ``model`` is in now; ``gradient_checkpointing``: the run will switch it on (only then
        is the model asked, as transformers warns about the older query)."""
        switches = gradient_checkpointing and not _checkpointing_on(model)
        return cls(model.training, switches, KbitState.of(model, gradient_checkpointing), attention_of(model))

    def restore(self, model: nn.Module) -> None:
        """Drop gradients, switch off checkpointing if the run switched it on, restore train/eval and the
        attention implementation."""
        for p in model.parameters():
            p.grad = None
        self.kbit.restore(model)
        restore_attention(self.attention)
        disable = _checkpointing_method(model, "disable") if self.switches_checkpointing else None
        if disable is not None:
            try:
                disable()
            except (RuntimeError, ValueError, AttributeError) as exc:
                logger.warning("could not switch gradient checkpointing back off: %s", exc)
        model.train(self.training)


def prepare_model(
    model: nn.Module, device: torch.device, *, adapters: bool, precision: str, gradient_checkpointing: bool
) -> None:
    """Check, then move ``model`` to ``device``, keep trainable adapter factors in fp32, and switch
    gradient checkpointing on if asked; leaves it in train mode. A quantized base is not moved (it must
    already be on ``device``) and gets the k-bit preparation (:mod:`lora_widgets.training.kbit`).

    Raises ``ValueError`` (before changing anything) for full fine-tuning of fp16 weights under fp16
    scaling, or for checkpointing on a model without transformers' switch.
    """
    if (
        not adapters
        and precision == "fp16"
        and any(p.requires_grad and p.dtype == torch.float16 for p in model.parameters())
    ):
        raise ValueError(
            "full fine-tuning of float16 weights with precision='fp16' cannot use a GradScaler; load "
            "the model in float32 (mixed precision keeps fp32 master weights) or use LoRA"
        )
    enable = _checkpointing_method(model, "enable")
    if gradient_checkpointing and enable is None:
        raise ValueError(
            f"gradient_checkpointing=True but {type(model).__name__} has no gradient_checkpointing_enable(); "
            "use a transformers model or set gradient_checkpointing=False"
        )
    if not is_quantized(model):  # a quantized base was placed on its device as it loaded
        model.to(device)
    else:
        check_quantized_device(model, device)
    prepare_kbit(model, precision=precision, gradient_checkpointing=gradient_checkpointing)
    if adapters:  # adapter factors in fp32 (as PEFT does), so fp16/bf16 bases train with a GradScaler
        for p in model.parameters():
            if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
    if gradient_checkpointing and enable is not None:
        if getattr(enable, "__name__", "").startswith("activation"):
            enable()  # transformers 5: non-reentrant by default
        else:
            enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()


def release_memory(device: torch.device, collect: bool) -> None:
    """Return cached device memory. A full ``gc.collect()`` (a few hundred ms in a large process, blocking
    the loop) runs only when ``collect`` (a failure's traceback may hold tensors in reference cycles) or
    before CUDA/MPS hand their caches back."""
    if collect or device.type != "cpu":
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
