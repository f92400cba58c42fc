r"""DoRA: weight-decomposed low-rank adaptation, computed exactly as PEFT computes it.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353, sec. 4.1, eq. 5)
writes a weight as a magnitude times a direction and trains the two apart: the magnitude m directly (one
number per output feature), the direction through LoRA's low-rank update::

    W0 = m0 * V0 / ||V0||_c                  m0 = ||W0||_c   [out]   (the norm of each output row; the
                                                                      paper's "column" in its d x k layout)
    W' = m * (W0 + s B A) / ||W0 + s B A||_c       m: trainable [out];  B A: LoRA's update, s its scaling

                       x [..., in]
                       |
         +-------------+------------------------------+
         |                                            |
    W0 x + b (the frozen layer)                dropout(x) = x_d
         |                                            |
         |                       B A x_d * s  (LoRA)   +   W0 x_d   (base on the dropped input)
         |                                            |
         |                       * (m / ||W0 + s B A||_c - 1) on the W0 part,  * m / ||.||_c on the LoRA part
         +--------------------------(+)---------------+
                                     |
    y = W0 x + b + (m/n - 1) W0 x_d + (m/n) s B A x_d,      n = ||W0 + s B A||_c  (treated as a constant)

Without dropout (x_d = x) this is ``y = (m / n) (W0 + s B A) x + b``, eq. 5 applied to x. The norm n is
**detached** (sec. 4.3, "we suggest treating ||V + dV||_c in Eq. (5) as a constant, thereby detaching it from the
gradient graph"): it follows the update in the forward pass but takes no gradient, which saves the memory of
its backward. The base layer's own output ``W0 x + b`` is reused for ``W0 x_d`` (minus the bias) when there is no
dropout or the layer is in eval mode, so the frozen matmul runs once; with dropout while training, ``W0 x_d`` is a
second matmul on the dropped input. Both are what ``peft/tuners/lora/dora.py`` (``DoraLinearLayer.forward``)
and ``variants.py`` (``DoraLinearVariant``) do, so outputs and gradients agree with PEFT's to float rounding
(``tests/test_dora.py``).

At the start m = n (with B = 0, m0 = ||W0||_c), so the adapted layer computes exactly the base layer.
Merging folds everything into the weight, W <- (m / n) (W0 + s B A), keeping n for the unmerge,
W0 = W / (m / n) - s B A (PEFT's ``merge_unsafe`` / ``unmerge``). The magnitude is saved under PEFT's key
``<module path>.lora_magnitude_vector`` (:mod:`lora_widgets.lora.peft_format`).

A quantized base (QLoRA) is read through its dequantized weight (:func:`lora_widgets.quantization.frozen_weight`),
as PEFT's ``dequantize_module_weight``: each forward step dequantizes W0 once more to take the norm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from lora_widgets.quantization import frozen_weight

if TYPE_CHECKING:
    from lora_widgets.lora.layers import LoRALinear

__all__ = [
    "base_of_merged_dora",
    "base_weight",
    "dora_forward",
    "dora_merge",
    "dora_unmerge",
    "init_magnitude",
    "merged_delta",
    "weight_norm",
]


def base_weight(layer: LoRALinear) -> torch.Tensor:
    """The frozen weight W0 as numbers, ``[out, in]`` (a Conv1D's transposed, a quantized one dequantized)."""
    weight = frozen_weight(layer.base_layer)
    return weight.T if layer.fan_in_fan_out else weight


def _magnitude(layer: LoRALinear) -> torch.Tensor:
    """The layer's m [out]; a ``ValueError`` if it is not a DoRA layer (a caller's mistake, said plainly)."""
    if layer.lora_magnitude_vector is None:
        raise ValueError("this LoRA layer has no DoRA magnitude vector (it was made with use_dora=False)")
    return layer.lora_magnitude_vector


def weight_norm(weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """``||W + s B A||_c``: the L2 norm of each output row of ``weight + scaling * lora_weight`` (both ``[out, in]``),
    ``[out]``; PEFT's ``DoraLinearLayer.get_weight_norm``."""
    combined = weight + scaling * lora_weight  # [out, in]
    return torch.linalg.norm(combined, dim=1).to(combined.dtype)  # [out]


@torch.no_grad()
def init_magnitude(layer: LoRALinear) -> nn.Parameter:
    """m0 = ||W0 + s B A||_c with the factors as initialised (= ||W0||_c when B = 0): the layer starts as its base."""
    a, b = layer.lora_A.weight, layer.lora_B.weight  # [r, in], [out, r]
    weight = base_weight(layer).to(a.device)
    return nn.Parameter(weight_norm(weight, b @ a, layer.scaling), requires_grad=True)  # [out]


def dora_forward(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
    """The DoRA layer's output (module docstring): base output plus ``(m/n - 1) W0 x_d + (m/n) s B A x_d``."""
    result: torch.Tensor = layer.base_layer(x)  # [..., out]: W0 x + b
    lora_x = x if x.dtype == layer.lora_A.weight.dtype else x.to(layer.lora_A.weight.dtype)
    weight = base_weight(layer).to(lora_x.dtype)  # [out, in]
    lora_weight = layer.lora_B.weight @ layer.lora_A.weight  # [out, r] @ [r, in] = [out, in]
    norm = weight_norm(
        weight, lora_weight.detach().to(lora_x.dtype), layer.scaling
    ).detach()  # [out], sec. 4.3
    mag_norm_scale = (_magnitude(layer) / norm).view(1, -1)  # [1, out]
    if isinstance(layer.lora_dropout, nn.Identity) or not layer.training:
        bias = layer.bias
        base_result = result if bias is None else result - bias  # W0 x, reused from the base layer's output
    else:
        lora_x = layer.lora_dropout(lora_x)
        base_result = F.linear(lora_x, weight)  # W0 x_d: [..., out]
    lora_result = layer.lora_B(layer.lora_A(lora_x))  # [..., out]
    dora = (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * layer.scaling
    return (result + dora).to(result.dtype)


@torch.no_grad()
def dora_merge(layer: LoRALinear, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """W <- (m / n) (W0 + s B A) in place (``weight`` in the base's layout, ``delta`` = s B A in the same);
    returns n ``[out]``, which the unmerge needs (after the merge W no longer tells it)."""
    oriented = weight.T if layer.fan_in_fan_out else weight  # [out, in]
    delta_out = delta.T if layer.fan_in_fan_out else delta  # [out, in]
    norm = weight_norm(oriented.float(), delta_out.float(), 1.0)  # [out]
    factor = (_magnitude(layer).float() / norm).view(-1, 1)  # [out, 1]
    merged = factor * (oriented.float() + delta_out.float())  # [out, in]
    weight.data = (merged.T if layer.fan_in_fan_out else merged).to(weight.dtype).contiguous()
    return norm


def _unmerged(
    layer: LoRALinear, weight: torch.Tensor, delta: torch.Tensor, norm: torch.Tensor
) -> torch.Tensor:
    """W0 = W / (m / n) - s B A from a merged ``weight`` (base layout), in fp32 and the base's layout."""
    oriented = weight.T if layer.fan_in_fan_out else weight  # [out, in]
    delta_out = delta.T if layer.fan_in_fan_out else delta  # [out, in]
    factor = (_magnitude(layer).float() / norm).view(-1, 1)  # [out, 1]
    restored = oriented.float() / factor - delta_out.float()  # [out, in]
    return restored.T if layer.fan_in_fan_out else restored


@torch.no_grad()
def dora_unmerge(layer: LoRALinear, weight: torch.Tensor, delta: torch.Tensor, norm: torch.Tensor) -> None:
    """W0 = W / (m / n) - s B A in place, with n as the merge computed it."""
    weight.data = _unmerged(layer, weight, delta, norm).to(weight.dtype).contiguous()


@torch.no_grad()
def base_of_merged_dora(layer: LoRALinear) -> torch.Tensor:
    """W0 of a merged DoRA layer (what adapter statistics compare the update with), fp32, the base's layout."""
    weight: torch.Tensor = layer.base_layer.weight  # type: ignore[assignment]
    return _unmerged(layer, weight, layer.delta_weight(), layer._dora_norm)  # type: ignore[arg-type]


@torch.no_grad()
def merged_delta(layer: LoRALinear) -> torch.Tensor:
    """(m / n) (W0 + s B A) - W0, ``[out, in]`` in fp32: what merging adds to a dequantized base."""
    weight = base_weight(layer).float()  # [out, in]
    delta = layer.lora_B.weight.float() @ layer.lora_A.weight.float() * layer.scaling  # [out, in]
    factor = (_magnitude(layer).float() / weight_norm(weight, delta, 1.0)).view(-1, 1)  # [out, 1]
    return factor * (weight + delta) - weight
