"""The dashboard's "base" control: the model at the base precision (16-bit / 8-bit / 4-bit) a run asks for.

The dashboard loads the model itself when it is given ``None`` (the shipped model), a hub id or a path, so it can
load that source again with ``load_model(..., base=...)`` when a run asks for another base: QLoRA's 4-bit base
is a loading choice (transformers quantizes while it reads the weights), not something done to a model in
memory. Only the model of the latest base is kept (a 16-bit and a 4-bit copy of a large model need not both
fit); each run's adapter is saved in its run directory. A model object the user passed is used as it is: asking
it for another base is an error that says how to let the dashboard load it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from lora_widgets.quantization import base_of

__all__ = ["BaseModels", "with_model_base"]


class BaseModels:
    """The current model and where it came from; :meth:`model_for` loads the source at another base.

    Args:
        model: the model the dashboard holds now.
        source: ``None`` (the shipped model), a hub id or a path the dashboard loaded ``model`` from;
            ``given=True``: ``model`` is the user's own object and cannot be reloaded.
        device_type: where a quantized base is placed as it loads (``"cpu"``, ``"cuda"``).
    """

    def __init__(self, model: Any, source: str | Path | None, device_type: str, *, given: bool) -> None:
        self.model = model
        self.base = base_of(model) if isinstance(model, nn.Module) else "16-bit"
        self._source, self._given, self._device_type = source, given, device_type

    def model_for(self, base: str | None) -> Any:
        """The model at ``base`` (``None``: the current one), loading it if need be (a few seconds).

        Raises:
            ValueError: the model was passed as an object and ``base`` differs from its own; an unknown base
                or a device bitsandbytes cannot use. ImportError: a quantized base without bitsandbytes.
        """
        if base is None or base == self.base:
            return self.model
        if self._given:
            raise ValueError(
                f"base={base!r}: this dashboard was given a {self.base} model object, which it cannot load again "
                f"at another precision. Pass the model's hub id or path (LoRADashboard(model='...')) or None for "
                f"the shipped model, so the dashboard loads it; or load it yourself with "
                f"lora_widgets.load_model(..., base={base!r}) and pass that"
            )
        from lora_widgets.models import load_model
        from lora_widgets.widget.loading import quiet_hub_progress

        with quiet_hub_progress():
            model, _ = load_model(self._source, device=self._device_type, base=base)
        self.model, self.base = model, base
        return model


def with_model_base(train: Any, model: Any) -> Any:
    """``train`` with ``base`` set to ``model``'s own when it names none, so the control shows what is loaded."""
    if getattr(train, "base", "unset") is None and isinstance(model, nn.Module):
        return dataclasses.replace(train, base=base_of(model))
    return train
