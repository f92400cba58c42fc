"""Merging adapters trained on a quantized base: dequantize into plain (16- or 32-bit) layers, then merge, and say so.

A 4-bit (or 8-bit) weight cannot take W0 + scaling * B A in place: rounding the sum back to 16 levels per block
would change the base the adapter was trained against, and the small update would mostly round away (the NF4
step between levels is about 1/8 of a block's absmax, QLoRA sec. 3, while one LoRA update is typically 1e-3 of
the weight). So :func:`merge_into_dequantized` replaces every quantized linear layer of the model by a plain
``nn.Linear`` holding its dequantized weight in the dtype the activations flow in (:func:`activation_dtype`:
the unquantized layers' dtype, bf16 for a model loaded in bf16), adds the adapters there, and removes the model's quantization config so that ``save_pretrained`` writes an ordinary
checkpoint. The adapted model's outputs are unchanged up to float rounding: the base computed with exactly
these dequantized weights during training.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from lora_widgets.lora.dora import merged_delta
from lora_widgets.quantization import frozen_weight, layer_base, quantized_layers

if TYPE_CHECKING:
    from lora_widgets.lora.layers import LoRALinear

__all__ = ["activation_dtype", "dequantized_linear", "merge_into_dequantized"]


def activation_dtype(model: nn.Module) -> torch.dtype:
    """The dtype activations flow in through ``model``: its input embeddings' (the unquantized layers' dtype,
    fp32 after the trainer's k-bit preparation); a plain ``nn.Linear`` must hold its weight in it, since it
    does not cast its input as a bitsandbytes layer does. Falls back to the first floating parameter's dtype."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@torch.no_grad()
def dequantized_linear(layer: nn.Module, dtype: torch.dtype, delta: torch.Tensor | None = None) -> nn.Linear:
    """A plain ``nn.Linear`` in ``dtype`` with ``layer``'s dequantized weight (+ ``delta``, [out, in])."""
    weight = frozen_weight(layer).float()  # [out, in]
    if delta is not None:
        weight = weight + delta.float()
    bias = getattr(layer, "bias", None)
    out = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype
    )
    out.weight.copy_(weight.to(dtype))
    if bias is not None:
        out.bias.copy_(bias.detach().to(dtype))
    out.requires_grad_(False)
    return out


def merge_into_dequantized(model: nn.Module, layers: dict[str, LoRALinear]) -> nn.Module:
    """Dequantize every quantized layer of ``model`` into a plain ``nn.Linear``, fold the adapters of ``layers``
    into theirs, drop the wrappers, warn that the model is no longer quantized; returns ``model``.

    All or nothing: the replacements are built first (the model untouched if that fails), then swapped in.
    Parameters get back the ``requires_grad`` flags they had before ``apply_lora``.
    """
    from lora_widgets.lora.layers import _set_flags, _swap_modules

    replacements: dict[str, nn.Module] = {}
    kinds: set[str] = set()
    dtype = activation_dtype(model)
    for name, layer in layers.items():
        base = layer.base_layer
        if layer.quantized:
            kinds.add(layer.quantized)
            delta = merged_delta(layer) if layer.lora_magnitude_vector is not None else layer.delta_weight()
            replacements[name] = dequantized_linear(base, dtype, delta)
        else:  # an unquantized adapted layer (the head, say) merges as usual
            layer.merge()
            replacements[name] = base
    wrapped = {id(layer.base_layer) for layer in layers.values()}
    for name, module in quantized_layers(model).items():
        if id(module) not in wrapped:
            kinds.add(str(layer_base(module)))
            replacements[name] = dequantized_linear(module, dtype)
    _swap_modules(model, replacements)
    flags = next((layer._flags_before for layer in layers.values() if layer._flags_before is not None), None)
    if flags is not None:
        _set_flags(model, {n: v for n, v in flags.items() if n in dict(model.named_parameters())})
    _forget_quantization(model)
    dtypes = sorted({str(m.weight.dtype).replace("torch.", "") for m in replacements.values()})
    warnings.warn(
        f"merge_lora(unload=True): the base was {'/'.join(sorted(kinds))}; its {len(replacements)} quantized layers were "
        f"dequantized into plain Linear layers ({', '.join(dtypes)}) and the adapters merged there. The model is "
        "no longer quantized: it takes the memory of a 16-bit model, and save_pretrained writes an ordinary "
        "checkpoint. Keep the adapter file if you want to apply it to a 4-bit base again.",
        UserWarning,
        stacklevel=3,
    )
    return model


def _forget_quantization(model: nn.Module) -> None:
    """Remove transformers' record that the model is quantized (as its own ``model.dequantize()`` does)."""
    quantizer = getattr(model, "hf_quantizer", None)
    remove = getattr(quantizer, "remove_quantization_config", None)
    if callable(remove):
        remove(model)
