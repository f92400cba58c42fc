r"""A quantized frozen base (QLoRA): the ``base=`` option, the bitsandbytes layers, and their dequantized weight.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314) freezes the
pretrained weights in 4 bits and trains LoRA adapters in full precision on top:

* **NF4** (sec. 3, "4-bit NormalFloat"): each block of 64 weights is divided by its absolute maximum and
  rounded to the nearest of 16 levels placed at quantiles of a standard normal, so every level is used about
  equally often by normally distributed weights. FP4 is the plain 4-bit float alternative.
* **Double quantization** (sec. 3): the fp32 absmax of every 64-weight block is itself quantized to 8 bits in
  blocks of 256, with one fp32 constant per block: 32/64 = 0.5 bits per weight becomes
  8/64 + 32/(64 * 256) = 0.127 bits per weight.
* **Compute dtype**: the forward pass dequantizes a layer's weight to the compute dtype and multiplies in it;
  the gradient flows through the dequantized weight to the input (and so to the adapters below), never into
  the 4-bit storage.

LLM.int8() (Dettmers et al. 2022, arXiv:2208.07339) stores int8 weights with one absmax scale per output row.

The quantization itself is bitsandbytes' (``bnb.nn.Linear4bit``, ``bnb.nn.Linear8bitLt``), loaded through
transformers' ``BitsAndBytesConfig``; this module holds the rules around it, each in one place: which base a
string names (:func:`quantization_config`), which compute dtype a device gets (:func:`compute_dtype`, from
:func:`lora_widgets.devices.best_precision`), whether bitsandbytes is installed and can use the device, and
how to read a quantized layer's weight back in full precision (:func:`frozen_weight`).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import torch
from torch import nn

from lora_widgets.devices import best_precision, cuda_has_bf16

__all__ = [
    "BASE_PRECISIONS",
    "INSTALL_HINT",
    "base_of",
    "compute_dtype",
    "describe_base",
    "frozen_weight",
    "is_quantized",
    "kbit_cast",
    "keep_cpu_layout",
    "layer_base",
    "layer_compute_dtype",
    "quantization_config",
    "quantized_layers",
    "refuse_inplace_merge",
    "require_bitsandbytes",
]

BASE_PRECISIONS: tuple[str, ...] = ("16-bit", "8-bit", "4-bit")
"""The frozen base's storage: ``"16-bit"`` (not quantized: the checkpoint's own dtype, fp32 on a CPU),
``"8-bit"`` (LLM.int8()) or ``"4-bit"`` (NF4 with double quantization, QLoRA's recipe)."""

INSTALL_HINT = 'pip install bitsandbytes  (or pip install "lora-widgets[qlora]")'
"""The command that installs what a quantized base needs."""


def require_bitsandbytes(what: str) -> Any:
    """``bitsandbytes``, imported; an ``ImportError`` naming ``what`` needed it and the install command if absent."""
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as exc:
        raise ImportError(
            f"{what} needs the bitsandbytes package, which is not installed; install it with: {INSTALL_HINT}"
        ) from exc


def compute_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype a quantized layer dequantizes to and multiplies in on ``device``: bf16 where the device supports
    it, fp16 on a GPU without bf16 (a T4), fp32 on the CPU. The same rule as ``TrainConfig(precision="auto")``
    (:func:`lora_widgets.devices.best_precision`), so the base computes in the dtype the run trains in."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(best_precision(device), torch.float32)


def _check_device(device: torch.device, bnb: Any) -> None:
    supported = set(getattr(bnb, "supported_torch_devices", {"cpu", "cuda"}))
    if device.type not in supported:
        raise ValueError(
            f"bitsandbytes cannot use the device {str(device)!r} (it supports {sorted(supported)}); load the "
            "quantized base on one of those, or use base='16-bit' on this device"
        )


def _check_compute_dtype(dtype: torch.dtype | None, device: torch.device) -> None:
    if dtype == torch.bfloat16 and device.type == "cuda" and not cuda_has_bf16():
        raise ValueError(
            "bnb_4bit_compute_dtype=torch.bfloat16 is not supported by this GPU (bf16 needs compute capability "
            ">= 8.0, e.g. A100/L4/H100); use torch.float16 on a T4/V100, or base='4-bit' which picks it"
        )


def quantization_config(base: Any, device: str | torch.device) -> Any:
    """The ``BitsAndBytesConfig`` for ``base`` on ``device``, or ``None`` for ``"16-bit"``.

    ``"4-bit"``: NF4, double quantization on, compute dtype :func:`compute_dtype` (QLoRA's recipe);
    ``"8-bit"``: LLM.int8(); a ``BitsAndBytesConfig``: used as given, after the same checks.

    Raises:
        ValueError: an unknown ``base`` (the message lists the choices); a device bitsandbytes cannot use;
            a bf16 compute dtype on a GPU without bf16.
        ImportError: a quantized base without bitsandbytes (the message gives the install command).
    """
    from transformers import BitsAndBytesConfig

    if isinstance(base, BitsAndBytesConfig):
        config = base
        if not (config.load_in_4bit or config.load_in_8bit):
            raise ValueError(
                "base is a BitsAndBytesConfig with neither load_in_4bit nor load_in_8bit set; set one, or pass "
                "base='16-bit' for an unquantized base"
            )
    elif base not in BASE_PRECISIONS:
        raise ValueError(
            f"base={base!r} is not a base precision: use one of {list(BASE_PRECISIONS)} "
            "or a transformers BitsAndBytesConfig"
        )
    elif base == "16-bit":
        return None
    d = torch.device(device)
    bnb = require_bitsandbytes(f"base={base!r}")
    _check_device(d, bnb)
    if base == "4-bit":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(d),
        )
    elif base == "8-bit":
        config = BitsAndBytesConfig(load_in_8bit=True)
    _check_compute_dtype(getattr(config, "bnb_4bit_compute_dtype", None) if config.load_in_4bit else None, d)
    return config


# ----------------------------------------------------------------------------------------------
# Quantized layers
# ----------------------------------------------------------------------------------------------


def _bnb_classes() -> tuple[type, type] | None:
    """(Linear4bit, Linear8bitLt) when bitsandbytes is already imported; a model cannot hold its layers otherwise,
    so a model without them never costs the import."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    return bnb.nn.Linear4bit, bnb.nn.Linear8bitLt


def layer_base(module: nn.Module) -> str | None:
    """``"4-bit"`` / ``"8-bit"`` for a bitsandbytes quantized linear layer, else ``None``."""
    classes = _bnb_classes()
    if classes is None:
        return None
    if isinstance(module, classes[0]):
        return "4-bit"
    return "8-bit" if isinstance(module, classes[1]) else None


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` (a layer, or a model) is or contains a bitsandbytes quantized linear layer."""
    return any(layer_base(m) is not None for m in module.modules())


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every bitsandbytes quantized linear layer of ``model``, by module path."""
    return {name: m for name, m in model.named_modules() if layer_base(m) is not None}


def base_of(model: nn.Module) -> str:
    """``"4-bit"``, ``"8-bit"`` or ``"16-bit"`` (no quantized layer): what ``load_model(base=...)`` gave."""
    kinds = {layer_base(m) for m in model.modules()} - {None}
    return "4-bit" if "4-bit" in kinds else "8-bit" if "8-bit" in kinds else "16-bit"


def _unpacked_4bit(layer: nn.Module) -> tuple[torch.Tensor, Any]:
    """The 4-bit data and quant state in bitsandbytes' standard layout (undoing its CPU inference repacking)."""
    weight: Any = layer.weight
    state: Any = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        return data, state
    return weight.data, state


@torch.no_grad()
def frozen_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's frozen weight W as numbers: a plain layer's ``weight``; a quantized layer's weight
    dequantized (``bitsandbytes.functional.dequantize_4bit``; int8 times its per-row scale / 127), ``[out, in]``.

    What adapter statistics (``||W||``) and merging need; the layer itself is not changed.
    """
    kind = layer_base(layer)
    if kind is None:
        return layer.weight  # type: ignore[return-value]
    import bitsandbytes.functional as bf

    if kind == "4-bit":
        data, state = _unpacked_4bit(layer)
        return bf.dequantize_4bit(data, state)  # [out, in], in the state's dtype
    weight: Any = layer.weight
    layer_state: Any = layer.state
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else layer_state.SCB
    return bf.int8_vectorwise_dequant(weight.data, scb)  # [out, in] float32


def refuse_inplace_merge(kind: str | None) -> None:
    """A ``ValueError`` for merging an adapter into a ``kind`` (``"4-bit"``/``"8-bit"``) weight in place; nothing
    for ``None`` (a plain weight)."""
    if kind:
        raise ValueError(
            f"cannot merge into a {kind} weight in place (rounding W + dW back to {kind} changes the base); "
            "merge_lora(model, unload=True) dequantizes it into plain Linear layers and merges there"
        )


def layer_compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a quantized layer computes in (and an unquantized one stores): the float dtype of its outputs."""
    dtype = getattr(layer, "compute_dtype", None)
    if layer_base(layer) == "4-bit" and isinstance(dtype, torch.dtype):
        return dtype
    if layer_base(layer) == "8-bit":
        return torch.float16  # LLM.int8() computes its outlier part in fp16
    weight: torch.Tensor = layer.weight  # type: ignore[assignment]
    return weight.dtype if weight.is_floating_point() else torch.float32


def keep_cpu_layout(model: nn.Module) -> int:
    """Switch off bitsandbytes' CPU inference repacking on every 4-bit layer; returns how many layers.

    bitsandbytes 0.50 repacks a 4-bit weight for its avx512-bf16 kernel the first time a layer runs in eval
    mode without gradients on a CPU. The repacking fails for layers whose input size is not a multiple of its
    tile (the shipped model's d=160: "shape '[160, 2]' is invalid") and rounds the absmax constants to bf16, so
    the frozen base would change between training and evaluation. With it off, evaluation dequantizes the same
    NF4 weights as training does.
    """
    count = 0
    for layer in quantized_layers(model).values():
        if layer_base(layer) == "4-bit" and getattr(layer, "support_avx512bf16_for_cpu", False):
            setattr(layer, "support_avx512bf16_for_cpu", False)  # noqa: B010 (a bitsandbytes attribute)
            count += 1
    return count


def kbit_cast(model: nn.Module, compute: torch.dtype) -> int:
    """The casts of the k-bit preparation (PEFT's ``prepare_model_for_kbit_training``): every fp16/bf16 parameter
    outside the quantized layers (embeddings, norms, head) to fp32, and each 4-bit layer's compute dtype to
    ``compute``; the quantized weights are left as they are. Returns how many parameters were upcast.

    One rule for the trainer's preparation (:func:`lora_widgets.training.kbit.prepare_kbit`) and for the copy
    :func:`lora_widgets.memory.measure.measure_memory` trains, so both measure the model the run trains.
    """
    count = 0
    for p in model.parameters():
        if p.dtype in (torch.float16, torch.bfloat16) and type(p).__name__ not in (
            "Params4bit",
            "Int8Params",
        ):
            p.data = p.data.float()
            count += 1
    for layer in quantized_layers(model).values():
        if layer_base(layer) == "4-bit":
            setattr(layer, "compute_dtype", compute)  # noqa: B010 (a bitsandbytes attribute)
    return count


def describe_base(model: nn.Module) -> str:
    """A short name of the base's storage for labels: ``"4-bit NF4"``, ``"4-bit FP4"``, ``"8-bit"`` or ``"16-bit"``."""
    base = base_of(model)
    if base != "4-bit":
        return base
    layer = next(m for m in model.modules() if layer_base(m) == "4-bit")
    state = getattr(layer.weight, "quant_state", None)
    kind = str(getattr(state, "quant_type", getattr(layer.weight, "quant_type", "nf4")))
    return f"4-bit {kind.upper()}"
