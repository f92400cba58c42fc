"""Getting a quantized (k-bit) base ready to train adapters on, and putting back what is temporary.

What PEFT's ``prepare_model_for_kbit_training`` does (peft ``utils/other.py``), as one step of the trainer's
prepare phase rather than a function the user must remember to call:

* the layers left unquantized (embeddings, norms, the output head) in fp16/bf16 are cast to fp32, so that
  layer norms and the loss are computed in full precision (QLoRA, Dettmers et al. 2023, sec. 4: "we ... use
  ... 32-bit" for what is not quantized); the quantized weights are left as they are;
* with gradient checkpointing, the input embeddings' output requires grad
  (``model.enable_input_require_grads()``), so that a checkpointed block whose weights are all frozen still
  passes gradients down to the adapters below it;
* the 4-bit layers compute in the run's dtype (``TrainConfig.precision``: bf16, fp16, or fp32), so the base's
  dequantized weight and the autocast matmuls agree.

Also: bitsandbytes' CPU inference repacking is switched off
(:func:`lora_widgets.quantization.keep_cpu_layout`), so evaluation dequantizes the same weights training does.
The fp32 casts are kept after the run, as PEFT keeps them; the input-grad hook and the compute dtypes are put
back by :meth:`KbitState.restore`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lora_widgets.quantization import is_quantized, kbit_cast, keep_cpu_layout, layer_base, quantized_layers

__all__ = ["KbitState", "check_quantized_device", "prepare_kbit"]

_RUN_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class KbitState:
    """What :func:`prepare_kbit` will change for the run only, as it is before the run: each 4-bit layer's
    compute dtype, and whether the run adds the input-grad hook (to remove it afterwards)."""

    compute_dtypes: dict[nn.Module, Any] = field(default_factory=dict)
    input_grads: bool = False

    @classmethod
    def of(cls, model: nn.Module, gradient_checkpointing: bool) -> KbitState:
        """The state of ``model`` now; empty for a model that is not quantized."""
        if not is_quantized(model):
            return cls()
        dtypes = {m: m.compute_dtype for m in quantized_layers(model).values() if layer_base(m) == "4-bit"}
        hooked = getattr(model, "_require_grads_hook", None) is not None  # transformers' attribute
        return cls(
            dtypes, gradient_checkpointing and not hooked and hasattr(model, "enable_input_require_grads")
        )

    def restore(self, model: nn.Module) -> None:
        """Put back the compute dtypes and remove the input-grad hook this run added."""
        for layer, dtype in self.compute_dtypes.items():
            setattr(layer, "compute_dtype", dtype)  # noqa: B010 (a bitsandbytes attribute)
        if self.input_grads:
            disable = getattr(model, "disable_input_require_grads", None)
            if callable(disable):
                disable()


def prepare_kbit(model: nn.Module, *, precision: str, gradient_checkpointing: bool) -> bool:
    """Prepare a quantized ``model`` for adapter training (see the module docstring); ``False`` (and nothing
    done) if it is not quantized. ``precision``: the run's ``TrainConfig.precision``, resolved
    (``"fp32"``, ``"bf16"`` or ``"fp16"``). :meth:`KbitState.restore` undoes the temporary part.
    """
    if not is_quantized(model):
        return False
    kbit_cast(model, _RUN_DTYPES[precision])
    keep_cpu_layout(model)
    enable = getattr(model, "enable_input_require_grads", None)
    if gradient_checkpointing and callable(enable):
        enable()
    return True


def check_quantized_device(model: nn.Module, device: torch.device) -> None:
    """A ``ValueError`` if a quantized ``model``'s weights are not on ``device``: bitsandbytes layers are placed
    when they load (``load_model(..., device=..., base=...)``) and are not moved afterwards."""
    where = {p.device.type for m in quantized_layers(model).values() for p in m.parameters()}
    if where and where != {device.type}:
        raise ValueError(
            f"the quantized base is on {sorted(where)} but the run's device is {device.type!r}; load it there "
            f"(load_model(..., device={device.type!r}, base=...)) or set TrainConfig(device={sorted(where)[0]!r})"
        )
