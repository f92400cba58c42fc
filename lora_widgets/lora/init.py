r"""How A and B start: PEFT's ``init_lora_weights`` choices, each computed as PEFT computes it.

Every choice but ``False`` makes B A = 0 at step 0 or leaves W0 + s B A = W0, so the adapted model starts as
the base model:

==============  ======================================================================================
``True``        A ~ Kaiming-uniform(a = sqrt(5)) (``nn.Linear``'s own init: U(-1/sqrt(in), 1/sqrt(in))), B = 0.
                Hu et al. 2021, sec. 4.1 ("random Gaussian initialization for A and zero for B"; the
                reference code, loralib, uses Kaiming-uniform). PEFT's and our default.
``"gaussian"``  A ~ N(0, (1/r)^2) (PEFT: ``nn.init.normal_(A, std=1 / r)``), B = 0.
``"pissa"``     Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large
                Language Models", arXiv:2404.02948, sec. 3: with the SVD W0 = U S V^T ([out, in]),
                A = sqrt(S_r / s) V_r^T  [r, in],  B = U_r sqrt(S_r / s)  [out, r],
                and W0 is **replaced** by the residual W_res = W0 - s B A, so W_res + s B A = W0 exactly
                (to float rounding): training starts on the principal components instead of on noise.
``False``       both factors keep ``nn.Linear``'s random init (B A != 0): PEFT's option for tests only.
==============  ======================================================================================

Saving PiSSA: the adapter is saved with ``"init_lora_weights": "pissa"`` and its trained A and B, as PEFT's
``save_pretrained`` writes it. Loading it (here, or with ``PeftModel.from_pretrained``) onto the *original* base
recomputes the same SVD of W0, replaces W0 by the same residual and then puts the trained factors in, so the
model computes W_res + s B A as it did when saved. The full SVD is deterministic on one machine and dtype;
PEFT's fast randomized variant (``"pissa_niter_K"``) is not, and is refused. PEFT can also convert a PiSSA
adapter to an ordinary rank-2r LoRA of the original base (``path_initial_model_for_weight_conversion``); that
conversion is not offered here: use PEFT's for it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from lora_widgets.lora.layers import LoRALinear

__all__ = ["init_factors", "pissa_factors", "reset_factors", "restore_base_weight", "start_from_residual"]


def pissa_factors(
    weight: torch.Tensor, r: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r], W_res [out, in]) from the top-r SVD of ``weight`` ([out, in]), in fp32:
    PEFT's ``LoraLayer.pissa_init`` (``init_lora_weights="pissa"``), with W_res = W - s B A."""
    w = weight.float()  # [out, in]
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # [out, k], [k], [k, in]
    s_r = s[:r] / scaling  # [r]
    a = torch.diag(torch.sqrt(s_r)) @ vh[:r]  # [r, in]
    b = u[:, :r] @ torch.diag(torch.sqrt(s_r))  # [out, r]
    return a, b, w - scaling * b @ a


@torch.no_grad()
def init_factors(layer: LoRALinear, init: bool | str) -> torch.Tensor | None:
    """Initialise ``layer.lora_A`` / ``lora_B`` as ``init`` says (module docstring); for ``"pissa"`` return the
    residual weight, in the base weight's layout and dtype, that the caller must put in place of W0 (this function
    does not touch the base layer). ``init`` was validated by :func:`~lora_widgets.lora.config.check_variant`."""
    a, b = layer.lora_A.weight, layer.lora_B.weight  # [r, in], [out, r]
    if init is False:
        return None  # nn.Linear's own init of both factors, kept
    if init == "pissa":
        return _pissa(layer)
    if init is True:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    else:  # "gaussian"
        nn.init.normal_(a, std=1 / layer.r)
    nn.init.zeros_(b)
    return None


def _pissa(layer: LoRALinear) -> torch.Tensor:
    weight: torch.Tensor = layer.base_layer.weight  # type: ignore[assignment]
    if layer.quantized or weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"init_lora_weights='pissa' needs the base weight in full precision (got {layer.quantized or weight.dtype}): "
            "PiSSA replaces W by its residual, which cannot be written into a quantized weight. Apply PiSSA to the "
            "16-bit model and quantize the residual model afterwards (as PEFT advises), or use init_lora_weights=True"
        )
    if layer.r > min(layer.in_features, layer.out_features):
        raise ValueError(
            f"init_lora_weights='pissa' takes the top r singular vectors, but r={layer.r} exceeds "
            f"min(in, out) = {min(layer.in_features, layer.out_features)}; use a smaller r"
        )
    oriented = weight.T if layer.fan_in_fan_out else weight  # [out, in]
    a, b, residual = pissa_factors(oriented, layer.r, layer.scaling)
    layer.lora_A.weight.copy_(a)
    layer.lora_B.weight.copy_(b)
    return (residual.T if layer.fan_in_fan_out else residual).to(weight.dtype).contiguous()


@torch.no_grad()
def start_from_residual(layer: LoRALinear, residual: torch.Tensor | None) -> None:
    """Put PiSSA's residual in place of W0 (a no-op for other initialisations), keep the initial factors B0, A0
    as non-persistent buffers (``pissa_A0``, ``pissa_B0``: r (in + out) numbers, not saved) and W0 itself until
    :func:`~lora_widgets.lora.layers.apply_lora` succeeds; then DoRA's magnitude from W_res + s B0 A0 (PEFT's
    order). If that fails, W0 is put back."""
    from lora_widgets.lora.dora import init_magnitude

    weight: torch.Tensor = layer.base_layer.weight  # type: ignore[assignment]
    if residual is not None:
        layer.register_buffer("pissa_A0", layer.lora_A.weight.detach().clone(), persistent=False)
        layer.register_buffer("pissa_B0", layer.lora_B.weight.detach().clone(), persistent=False)
        layer._replaced_weight, weight.data = weight.data, residual
    try:
        layer.lora_magnitude_vector = init_magnitude(layer) if layer.use_dora else None
    except BaseException:
        restore_base_weight(layer)
        raise


@torch.no_grad()
def reset_factors(layer: LoRALinear) -> None:
    """Fresh factors for a new run (the trainer calls this after seeding): ``init_lora_weights`` drawn again,
    or PiSSA's initial factors again (W is already the residual: a new SVD of it would be wrong); DoRA's
    magnitude becomes ||W + s B A||_c again."""
    if hasattr(layer, "pissa_A0"):
        layer.lora_A.weight.copy_(layer.get_buffer("pissa_A0"))
        layer.lora_B.weight.copy_(layer.get_buffer("pissa_B0"))
    else:
        init_factors(layer, layer.init_lora_weights)
    if layer.lora_magnitude_vector is not None:
        from lora_widgets.lora.dora import init_magnitude

        layer.lora_magnitude_vector.copy_(init_magnitude(layer))


@torch.no_grad()
def restore_base_weight(layer: LoRALinear) -> None:
    """Put W0 back where PiSSA wrote its residual: the original tensor while ``apply_lora`` runs (exact),
    afterwards W_res + s B0 A0 from the kept initial factors (W0 to float rounding). Otherwise a no-op."""
    weight: torch.Tensor = layer.base_layer.weight  # type: ignore[assignment]
    if layer._replaced_weight is not None:
        weight.data, layer._replaced_weight = layer._replaced_weight, None
    elif hasattr(layer, "pissa_A0"):
        b0, a0 = layer.get_buffer("pissa_B0"), layer.get_buffer("pissa_A0")  # [out, r], [r, in]
        delta = (b0.float() @ a0.float()) * layer.scaling  # [out, in]
        weight.data += (delta.T if layer.fan_in_fan_out else delta).to(weight.dtype)
