r"""Bytes of a quantized frozen base, counted exactly as bitsandbytes stores it, and measured.

**NF4 / FP4** (Dettmers et al. 2023, "QLoRA", arXiv:2305.14314, sec. 3; bitsandbytes ``Params4bit`` and
``QuantState``). A weight of ``n = out * in`` numbers, quantized in blocks of 64, holds

* the packed codes: two 4-bit codes per byte, ``ceil(n / 2)`` bytes;
* one absmax per block, ``m = ceil(n / 64)`` of them: fp32 (``4 m`` bytes), or with double quantization
  uint8 (``m`` bytes) plus, per block of 256 absmax values, one fp32 constant (``4 ceil(m / 256)`` bytes),
  the fp32 mean subtracted before that quantization (4 bytes) and the 256-entry fp32 code book of the 8-bit
  quantization (1024 bytes);
* the 16-entry fp32 code book of the 4-bit levels (64 bytes).

So a weight costs 4 + 8/64 + 32/(64 * 256) = 4.127 bits per number (the paper's 0.127 bits of constants) plus
1,092 bytes a layer, which matter only for tiny layers.

**int8** (LLM.int8(), Dettmers et al. 2022, arXiv:2208.07339, sec. 3.1; ``Int8Params``): one byte per weight
and one fp32 absmax per output row (``SCB``): ``n + 4 out`` bytes.

:func:`measured_quantized_bytes` adds up the storages the quantized layers of a loaded model really hold (each
storage once), which is what the estimate is checked against (``tests/test_qlora_memory.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lora_widgets.quantization import layer_base, quantized_layers

__all__ = [
    "QUANT_NAMES",
    "estimator_name",
    "int8_bytes",
    "measured_quantized_bytes",
    "nf4_bytes",
    "optimizer_8bit_bytes",
    "quantized_tensors",
    "quantized_weight_bytes",
]

QUANT_NAMES: dict[str, str] = {"4-bit": "4bit", "8-bit": "8bit"}
"""``load_model(base=...)`` names -> the estimator's ``base_quantization`` names."""

_BLOCK = 64  # weights per absmax (bitsandbytes' 4-bit default, QLoRA sec. 3)
_BLOCK2 = 256  # absmax values per fp32 constant in double quantization (QLoRA sec. 3)
_CODE4 = 16 * 4  # the 4-bit code book (NF4 or FP4 levels), fp32
_CODE8 = 256 * 4  # the dynamic 8-bit code book of the nested quantization, fp32
_OFFSET = 4  # the fp32 mean subtracted from the absmax values before their quantization


def nf4_bytes(out_features: int, in_features: int, double_quant: bool = True) -> int:
    """Bytes bitsandbytes holds for one 4-bit (NF4 or FP4) weight of ``[out_features, in_features]``."""
    n = out_features * in_features
    blocks = math.ceil(n / _BLOCK)
    # double quantization: uint8 absmax + an fp32 constant per 256 of them + offset + 8-bit code book
    nested = blocks + 4 * math.ceil(blocks / _BLOCK2) + _OFFSET + _CODE8
    absmax = nested if double_quant else 4 * blocks
    return math.ceil(n / 2) + absmax + _CODE4


def int8_bytes(out_features: int, in_features: int) -> int:
    """Bytes of one LLM.int8() weight: an int8 per number and an fp32 scale per output row."""
    return out_features * in_features + 4 * out_features


_OPT_BLOCK = 256  # numbers per absmax of bitsandbytes' blockwise 8-bit optimizer state (Optimizer2State)
_OPT_MIN_8BIT = 4096  # bitsandbytes' min_8bit_size: smaller tensors keep fp32 state


def optimizer_8bit_bytes(sizes: Iterable[int]) -> int:
    """Bytes of bitsandbytes' 8-bit AdamW state (``bnb.optim.AdamW8bit``, ``PagedAdamW8bit``) for trainable
    tensors of ``sizes`` numbers.

    Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization" (arXiv:2110.02861), sec. 2: each
    moment is stored in 8 bits with dynamic (non-linear) quantization, normalised per block by its absmax.
    bitsandbytes 0.50 (``Optimizer2State.init_state``): two uint8 moments (``2 n`` bytes) and an fp32 absmax
    per 256 numbers for each (``8 ceil(n / 256)``), so 2.03 bytes a parameter against AdamW's 8 in fp32; a
    tensor of fewer than 4,096 numbers (``min_8bit_size``) keeps fp32 moments (``8 n``). The two 256-entry
    fp32 code books are shared by all tensors (2 KiB).
    """
    total = 0
    for n in sizes:
        total += 2 * n + 8 * math.ceil(n / _OPT_BLOCK) if n >= _OPT_MIN_8BIT else 8 * n
    return total + 2 * 256 * 4


def quantized_weight_bytes(shapes: Iterable[tuple[int, int]], quant: str, double_quant: bool = True) -> int:
    """Bytes of the quantized weights of ``shapes`` (``(out, in)`` of each layer); ``quant``: ``"4bit"``/``"8bit"``."""
    if quant == "4bit":
        return sum(nf4_bytes(o, i, double_quant) for o, i in shapes)
    if quant == "8bit":
        return sum(int8_bytes(o, i) for o, i in shapes)
    raise ValueError(f"quant={quant!r} is not a quantization; use '4bit' or '8bit'")


def estimator_name(model: Any) -> str | None:
    """``"4bit"`` / ``"8bit"`` for a model with bitsandbytes layers, ``None`` otherwise (configs, names too)."""
    if not isinstance(model, nn.Module):
        return None
    kinds = {layer_base(m) for m in quantized_layers(model).values()}
    return "4bit" if "4-bit" in kinds else "8bit" if "8-bit" in kinds else None


def _tensors(value: Any, depth: int = 0) -> Iterable[torch.Tensor]:
    """Every tensor in a bitsandbytes state object (QuantState, MatmulLtState), nested states included."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 3 and hasattr(value, "__dict__"):
        for item in vars(value).values():
            yield from _tensors(item, depth + 1)


def quantized_tensors(model: nn.Module) -> Iterable[torch.Tensor]:
    """Every tensor the model's quantized layers hold: their weights and every tensor of their quantization
    state (``QuantState``, nested states, ``SCB``, ``MatmulLtState``); biases excluded (they are not quantized).
    Tensors may share storages: count bytes with one entry per storage."""
    for layer in quantized_layers(model).values():
        weight: Any = layer.weight
        yield weight.data
        yield from _tensors(getattr(weight, "quant_state", None))
        scb = getattr(weight, "SCB", None)
        if isinstance(scb, torch.Tensor):
            yield scb
        yield from _tensors(getattr(layer, "state", None))


def measured_quantized_bytes(model: nn.Module) -> int:
    """Bytes the model's quantized layers hold (:func:`quantized_tensors`), each storage counted once."""
    seen: dict[int, int] = {}
    for tensor in quantized_tensors(model):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
