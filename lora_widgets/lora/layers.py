r"""LoRA: low-rank adapters on a frozen model, saved and loaded in PEFT's on-disk format.

Low-Rank Adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv:2106.09685, section 4.1) freezes a pretrained weight :math:`W_0 \in \mathbb{R}^{d \times k}`
and learns a low-rank update :math:`\Delta W = B A`, with :math:`B \in \mathbb{R}^{d \times r}`,
:math:`A \in \mathbb{R}^{r \times k}` and :math:`r \ll \min(d, k)`::

                       x  [..., k]
                       |
         +-------------+--------------+
         |                            |
    W0 (frozen)                  dropout(x)
     [d x k]                          |
         |                       A  [r x k]   random init (Kaiming-uniform, as PEFT)
         |                            |
         |                       B  [d x r]   zero init  => B A = 0 at step 0
         |                            |
         |                      * scaling     alpha / r        (Hu et al. sec. 4.1)
         |                            |       alpha / sqrt(r)  (rsLoRA, Kalajdzievski 2023, sec. 3)
         +------------(+)-------------+
                       |
                       y  [..., d]     y = W0 x + b + scaling * B A dropout(x)

Trainable parameters per adapted layer: r (d + k) instead of d k.  Because B starts at zero the
adapted model computes exactly what the base model computes until the first optimizer step.
Merging (sec. 4.1, "No Additional Inference Latency") folds the update into the weight,
W = W0 + scaling * B A, so inference costs nothing extra; unmerging subtracts it again.

The wrapper is an ordinary ``nn.Module`` that owns the original layer as ``base_layer``: no monkey-patched
``forward``, no hidden merging on ``.eval()``. Parameter names follow PEFT (``lora_A``, ``lora_B``,
``base_layer``), so :mod:`lora_widgets.lora.peft_format` saves and loads adapters that PEFT reads and writes.

This module is the layer and the model surgery (apply, merge, unmerge, remove, enable/disable); settings and
scaling are in :mod:`lora_widgets.lora.config`, the PEFT file format in :mod:`lora_widgets.lora.peft_format`.
Every operation that changes a model is all or nothing: if it fails, the model is as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from lora_widgets.lora import dora
from lora_widgets.lora.config import (
    DEFAULT_TARGET_MODULES,
    LoRAConfig,
    LoRAReport,
    adaptable_modules,
    as_lora_config,
    check_hparams,
    check_matched,
    check_model,
    check_variant,
    count_parameters,
    in_out_features,
    is_adaptable,
    lora_scaling,
    raise_if_out_of_memory,
    resolve_targets,
    short_list,
)
from lora_widgets.lora.fused import can_fuse, fused_lora_linear
from lora_widgets.lora.init import init_factors, reset_factors, restore_base_weight, start_from_residual
from lora_widgets.quantization import layer_base, refuse_inplace_merge

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "LoRAConfig",
    "LoRALinear",
    "LoRAReport",
    "adaptable_modules",
    "apply_lora",
    "as_lora_config",
    "check_model",
    "count_parameters",
    "disable_adapters",
    "has_lora",
    "has_peft_layers",
    "in_out_features",
    "lora_layers",
    "lora_scaling",
    "merge_lora",
    "remove_lora",
    "require_lora_layers",
    "set_adapters_enabled",
    "short_list",
    "unmerge_lora",
]


# ----------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` (or transformers ``Conv1D``) plus a trainable low-rank update.
    A bitsandbytes ``Linear4bit``/``Linear8bitLt`` base (QLoRA) stays frozen and quantized; the factors are fp32.

    ``forward(x) = base_layer(x) + scaling * lora_B(lora_A(dropout(x)))`` unless the adapter is
    merged into the base weight or disabled, in which case it is just ``base_layer(x)``. With ``use_dora`` a
    magnitude vector ``lora_magnitude_vector`` [out] rescales each output (:mod:`lora_widgets.lora.dora`);
    ``init_lora_weights`` picks how A and B start (:mod:`lora_widgets.lora.init`; ``"pissa"`` replaces the base
    weight by its residual). The arguments are checked as :class:`LoRAConfig` checks them; the base layer is
    changed (frozen, PiSSA's residual) only once everything else exists, so a failed construction leaves it as it was.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        init_lora_weights: bool | str = True,
    ) -> None:
        super().__init__()
        if not is_adaptable(base_layer):
            raise TypeError(
                f"LoRALinear wraps nn.Linear or transformers Conv1D, got {type(base_layer).__name__}; "
                "pick a Linear layer (apply_lora(model, LoRAConfig(target_modules=[...])) lists them)"
            )
        r, alpha, dropout = check_hparams("LoRALinear", r, alpha, dropout, use_rslora)
        self.use_dora, self.init_lora_weights = check_variant("LoRALinear", use_dora, init_lora_weights)
        self.base_layer = base_layer
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)  # Conv1D stores W transposed
        in_features, out_features = in_out_features(base_layer)
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        weight = base_layer.weight
        self.quantized = layer_base(base_layer)  # "4-bit" / "8-bit" / None
        # a quantized weight's dtype is its storage (uint8, int8): the adapter is full precision there
        factory = {"device": weight.device, "dtype": torch.float32 if self.quantized else weight.dtype}
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, r, bias=False, **factory)  # A: [r, in]
        self.lora_B = nn.Linear(r, out_features, bias=False, **factory)  # B: [out, r]
        self._dora_norm: torch.Tensor | None = None  # ||W0 + s B A||_c at merge time, for the unmerge
        self.lora_magnitude_vector: nn.Parameter | None = None  # DoRA's m: [out]
        residual = None  # PiSSA's W_res, put in place below; other inits leave W0 alone
        if self.init_lora_weights == "pissa":
            residual = init_factors(self, "pissa")
        else:
            self.reset_lora_parameters()
        self.merged = False
        self.enabled = True
        # requires_grad flags of the whole model before apply_lora (restored by remove_lora/merge_and_unload)
        self._flags_before: dict[str, bool] | None = None
        self._replaced_weight: torch.Tensor | None = None  # PiSSA's W0 until apply_lora succeeds
        start_from_residual(self, residual)  # last: W0 changes only once nothing else can fail
        for p in self.base_layer.parameters():
            p.requires_grad_(False)

    @property
    def scaling(self) -> float:
        """The factor applied to B A: :func:`lora_scaling` of this layer's alpha, r and rsLoRA flag."""
        return lora_scaling(self.alpha, self.r, self.use_rslora)

    def reset_lora_parameters(self) -> None:
        """Fresh factors as ``init_lora_weights`` says (default: A Kaiming-uniform, B = 0), PiSSA's initial ones
        again, and DoRA's magnitude ||W + s B A||_c again: the layer starts as its base (:func:`reset_factors`)."""
        reset_factors(self)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (so code that reads ``module.weight`` keeps working)."""
        return self.base_layer.weight  # type: ignore[return-value]

    @property
    def bias(self) -> torch.Tensor | None:  # the base layer's bias, or None
        return self.base_layer.bias  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        if self.merged or not self.enabled:
            return self.base_layer(x)  # a merged or disabled adapter costs exactly the base layer
        if self.lora_magnitude_vector is not None:
            return dora.dora_forward(self, x)
        a, b = self.lora_A.weight, self.lora_B.weight  # [r, in], [out, r]
        lora_x = x if x.dtype == a.dtype else x.to(a.dtype)
        if not isinstance(self.lora_dropout, nn.Identity):  # dropout 0 is no call at all
            lora_x = self.lora_dropout(lora_x)
        base = self.base_layer
        if can_fuse(base, x, a, b):  # one autograd node, sums inside the matmuls (lora/fused.py)
            return fused_lora_linear(x, lora_x, base.weight, base.bias, a, b, self.scaling)  # type: ignore[arg-type]
        result: torch.Tensor = base(x)
        update = self.lora_B(self.lora_A(lora_x) * self.scaling)  # [..., out]; scaling at rank r is cheaper
        return result + update.to(result.dtype)  # (a no-op when the dtypes agree)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A, in the base weight's orientation ([out, in], or [in, out] for Conv1D)."""
        a = self.lora_A.weight.float()  # [r, in]
        b = self.lora_B.weight.float()  # [out, r]
        delta = (b @ a) * self.scaling  # [out, in]
        if self.fan_in_fan_out:
            delta = delta.T  # [in, out], Conv1D layout
        return delta if self.quantized else delta.to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + scaling * B A. A no-op if already merged. The update is computed before W is touched."""
        if self.merged:
            return
        if not self.enabled:
            raise RuntimeError(
                "cannot merge a disabled adapter; call set_adapters_enabled(model, True) first"
            )
        refuse_inplace_merge(self.quantized)
        delta = self.delta_weight()
        weight: torch.Tensor = self.base_layer.weight  # type: ignore[assignment]
        if self.lora_magnitude_vector is not None:  # W <- (m / n) (W + s B A), n kept for the unmerge
            self._dora_norm = dora.dora_merge(self, weight, delta)
        else:
            weight.data += delta
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - scaling * B A. A no-op if not merged."""
        if not self.merged:
            return
        delta = self.delta_weight()
        weight: torch.Tensor = self.base_layer.weight  # type: ignore[assignment]
        if self.lora_magnitude_vector is not None and self._dora_norm is not None:
            dora.dora_unmerge(self, weight, delta, self._dora_norm)
        else:
            weight.data -= delta
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.r}, "
            f"scaling={self.scaling:g}, merged={self.merged}, enabled={self.enabled}"
            + (", dora=True" if self.use_dora else "")
        )


# ----------------------------------------------------------------------------------------------
# Finding the layers to adapt
# ----------------------------------------------------------------------------------------------


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every :class:`LoRALinear` in the model, by module path."""
    check_model(model, "lora_layers")
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_peft_layers(model: nn.Module) -> bool:
    """True if PEFT's LoRA layers (``lora_A`` as a ``ModuleDict``) are in the model."""
    return any(isinstance(getattr(m, "lora_A", None), nn.ModuleDict) for m in model.modules())


def has_lora(model: nn.Module) -> bool:
    """True if the model carries LoRA adapters, ours or PEFT's."""
    return bool(lora_layers(model)) or has_peft_layers(model)


# ----------------------------------------------------------------------------------------------
# Model surgery: each operation is all or nothing
# ----------------------------------------------------------------------------------------------
# Each public operation checks its inputs first, then changes the model in steps that are undone, in
# reverse, if a later step raises (out of memory, an interrupt, a fault): parameters, requires_grad flags,
# the module tree and merge state are then as before the call. Nothing is written onto the user's model
# but the wrappers themselves.


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def _swap_modules(model: nn.Module, replacements: Mapping[str, nn.Module]) -> None:
    """Put each module in place at its path, all or none."""
    previous: dict[str, nn.Module] = {}
    try:
        for path, new in replacements.items():
            previous[path] = model.get_submodule(path)
            _set_submodule(model, path, new)
    except BaseException:
        for path, old in reversed(previous.items()):
            _set_submodule(model, path, old)
        raise


def _set_flags(model: nn.Module, flags: Mapping[str, bool]) -> None:
    for n, p in model.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])


def _merge_all(layers: Iterable[LoRALinear], merge: bool) -> list[LoRALinear]:
    """Merge (or unmerge) every layer, all or none: a failure undoes the layers already done.

    Returns the layers this call changed, so that a later failure can undo exactly those."""
    done: list[LoRALinear] = []
    try:
        for layer in layers:
            if layer.merged != merge:
                layer.merge() if merge else layer.unmerge()
                done.append(layer)
    except BaseException:
        _undo_merges(done, merge)
        raise
    return done


def _undo_merges(done: list[LoRALinear], merged: bool) -> None:
    for layer in reversed(done):
        layer.unmerge() if merged else layer.merge()


def apply_lora(model: nn.Module, config: LoRAConfig | None = None) -> LoRAReport:
    """Wrap the modules selected by ``config`` in :class:`LoRALinear`, in place, and freeze the rest.

    Every parameter that is not a LoRA factor gets ``requires_grad=False``; the previous flags are
    remembered (by the wrappers) so that :func:`remove_lora` restores them. ``config`` may also be a PEFT
    ``LoraConfig``, converted exactly (:meth:`LoRAConfig.from_peft`) or refused. All or nothing: if creating
    an adapter fails (out of memory for a huge rank, an interrupt), the model is left as it was.

    Raises:
        TypeError: ``model`` is not a torch module, or ``config`` is not a LoRA config.
        ValueError: the model already has LoRA adapters (ours or PEFT's), or nothing matched
            (the message lists the Linear/Conv1D module names the model does have).
    """
    check_model(model, "apply_lora")
    config = LoRAConfig() if config is None else as_lora_config(config, "apply_lora: config")
    if has_lora(model):
        raise ValueError(
            "this model already has LoRA adapters; apply_lora will not wrap twice. "
            "Call remove_lora(model) first to start from the base model, or train the existing adapters."
        )
    matched, rule = resolve_targets(model, config)
    check_matched(model, matched, rule)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        wrappers: dict[str, LoRALinear] = {}
        for name in matched:
            c = config
            layer = LoRALinear(
                model.get_submodule(name),
                c.r,
                c.alpha,
                c.dropout,
                c.use_rslora,
                c.use_dora,
                c.init_lora_weights,
            )
            layer._flags_before = flags
            wrappers[name] = layer
        for p in model.parameters():
            p.requires_grad_(False)
        _swap_modules(model, wrappers)
    except BaseException as exc:
        _set_flags(model, flags)  # the wrappers froze their base layers; the tree was restored by the swap
        for created in wrappers.values():  # PiSSA replaced their weights by residuals: W0 back, exactly
            restore_base_weight(created)
        raise_if_out_of_memory(exc, model, matched, config)
        raise
    for layer in wrappers.values():
        layer._replaced_weight = None  # PiSSA's W0 is freed; remove_lora rebuilds it from B0 A0
    trainable, total = count_parameters(model)
    return LoRAReport(matched=matched, trainable_params=trainable, total_params=total, config=config)


def _unwrap(model: nn.Module, layers: dict[str, LoRALinear], merge: bool) -> nn.Module:
    """Remove the wrappers, merging (or unmerging) first; restores the flags apply_lora recorded."""
    changed = _merge_all(layers.values(), merge)
    try:
        _swap_modules(model, {name: layer.base_layer for name, layer in layers.items()})
    except BaseException:
        _undo_merges(changed, merge)
        raise
    for layer in (
        layers.values() if not merge else ()
    ):  # PiSSA: W_res + s B0 A0 = W0 (merged: W0 + s(BA - B0A0))
        restore_base_weight(layer)
    flags = next((layer._flags_before for layer in layers.values() if layer._flags_before is not None), None)
    if flags is not None:
        _set_flags(model, flags)
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Unwrap every adapter (unmerging first), restoring the base layers and their requires_grad flags.

    A model without adapters is returned unchanged. All or nothing, as :func:`apply_lora`.
    """
    return _unwrap(model, lora_layers(check_model(model, "remove_lora")), merge=False)


def _merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and drop the wrappers: a plain model for export.

    Afterwards each adapted layer is its original ``nn.Linear``/``Conv1D`` holding W0 + scaling * B A, the
    model has no LoRA parameters, and ``save_pretrained`` writes an ordinary checkpoint that any
    ``transformers`` installation loads. The adapter itself is gone from the model: save it first
    (:func:`~lora_widgets.lora.peft_format.save_adapter`) if you want to keep it. Parameters get back the
    ``requires_grad`` flags they had before :func:`apply_lora`. All or nothing, as :func:`apply_lora`.
    A quantized base is dequantized first, with a warning: :func:`~lora_widgets.lora.dequantize_merge.merge_into_dequantized`.
    """
    layers = require_lora_layers(model, "merge_lora(unload=True)")
    _check_enabled(layers, "merge_lora(unload=True)")
    if any(layer.quantized for layer in layers.values()):
        from lora_widgets.lora.dequantize_merge import merge_into_dequantized

        return merge_into_dequantized(model, layers)
    return _unwrap(model, layers, merge=True)


def require_lora_layers(model: nn.Module, function: str) -> dict[str, LoRALinear]:
    """The model's LoRA layers, or a ValueError saying that ``function`` needs some and how to get them."""
    layers = lora_layers(check_model(model, function))
    if not layers:
        hint = (
            "it carries PEFT adapters: use PEFT's own methods"
            if has_peft_layers(model)
            else "call apply_lora(model, config) first"
        )
        raise ValueError(f"{function}: the model has no lora_widgets LoRA layers; {hint}")
    return layers


def _check_enabled(layers: dict[str, LoRALinear], function: str) -> None:
    disabled = [n for n, layer in layers.items() if not layer.enabled and not layer.merged]
    if disabled:
        raise RuntimeError(
            f"{function}: cannot merge disabled adapters ({short_list(disabled)}); "
            "merge after the `with disable_adapters(model):` block ends"
        )


def merge_lora(model: nn.Module, *, unload: bool = False) -> nn.Module:
    """Fold every adapter into its base weight (W <- W + scaling B A). Merging twice is a no-op.

    With ``unload=False`` the adapters stay on the model, merged: :func:`unmerge_lora` takes them out
    again, and inference costs exactly the base model's. With ``unload=True`` (PEFT's
    ``merge_and_unload``) the wrappers are dropped too: a plain model for export.
    All layers or none: if one fails, those already merged are unmerged again.
    """
    if not isinstance(unload, bool):
        raise TypeError(f"merge_lora: unload must be True or False, got {unload!r}")
    if unload:
        return _merge_and_unload(model)
    layers = require_lora_layers(model, "merge_lora")
    _check_enabled(layers, "merge_lora")
    _merge_all(layers.values(), merge=True)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora` (W <- W - scaling B A). Unmerging an unmerged model is a no-op."""
    _merge_all(require_lora_layers(model, "unmerge_lora").values(), merge=False)
    return model


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch all adapters on or off; off means the model computes exactly the base model."""
    layers = require_lora_layers(model, "set_adapters_enabled")
    if not isinstance(enabled, bool):
        raise TypeError(f"set_adapters_enabled: enabled must be True or False, got {enabled!r}")
    if not enabled and any(layer.merged for layer in layers.values()):
        raise RuntimeError(
            "the adapters are merged into the base weights, so they cannot be switched off; "
            "call unmerge_lora(model) first"
        )
    for layer in layers.values():
        layer.enabled = enabled


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """``with disable_adapters(model): ...`` runs the base model, then re-enables the adapters."""
    set_adapters_enabled(model, False)
    try:
        yield model
    finally:
        set_adapters_enabled(model, True)
