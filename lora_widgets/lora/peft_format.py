"""PEFT's on-disk format for LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

:func:`save_adapter` writes, and :func:`load_adapter` reads, exactly what ``peft.PeftModel.save_pretrained``
writes and ``peft.PeftModel.from_pretrained`` reads for a LoRA adapter: tensors under the keys
``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (and DoRA's magnitude under
``.lora_magnitude_vector``), and the settings under PEFT's field names (``r``, ``lora_alpha``, ``lora_dropout``,
``target_modules``, ``use_rslora``, ``use_dora``, ``init_lora_weights``, ...). So an adapter
trained here loads in PEFT and the other way round, with identical logits (``tests/test_peft_interop.py``).
PEFT keeps this in ``peft/utils/save_and_load.py``, apart from the layer (:mod:`lora_widgets.lora.layers`).

Only safetensors are read: nothing is unpickled. Files are written to a temporary name and renamed, so a
crash mid-write never leaves a half-written adapter under the real name. A bad directory or file raises an
error naming the file and what to do before the model is touched, and a load that fails part-way puts the
model back as it was.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lora_widgets.atomic import atomic_write, atomic_write_json
from lora_widgets.lora.layers import (
    LoRAConfig,
    LoRALinear,
    LoRAReport,
    adaptable_modules,
    apply_lora,
    check_model,
    count_parameters,
    has_peft_layers,
    in_out_features,
    lora_layers,
    remove_lora,
    require_lora_layers,
    short_list,
)
from lora_widgets.paths import as_path

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "load_adapter",
    "lora_state_dict",
    "save_adapter",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under PEFT's keys: ``base_model.model.<path>.lora_{A,B}.weight`` and, for DoRA,
    ``base_model.model.<path>.lora_magnitude_vector`` (PEFT's saved name: no adapter name, no ``.weight``)."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in require_lora_layers(model, "lora_state_dict").items():
        out[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach()
        out[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach()
        if layer.lora_magnitude_vector is not None:
            out[f"{_PEFT_PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector.detach()
    return out


def _targets_for_saving(model: nn.Module, paths: list[str]) -> list[str] | str:
    """Leaf names if they select exactly ``paths`` (PEFT's suffix rule), else an exact regex."""
    leaves = sorted({p.split(".")[-1] for p in paths})
    candidates = list(adaptable_modules(model)) + list(lora_layers(model))
    by_leaves = {n for n in candidates if any(n == t or n.endswith("." + t) for t in leaves)}
    if by_leaves == set(paths):
        return leaves
    return "|".join(re.escape(p) for p in sorted(paths))


def _layer_config(layers: dict[str, LoRALinear]) -> LoRAConfig:
    """The one LoRAConfig that describes every layer (save_adapter's format has one rank and scaling)."""
    settings = {
        (
            layer.r,
            layer.alpha,
            layer.use_rslora,
            getattr(layer.lora_dropout, "p", 0.0),
            layer.use_dora,
            layer.init_lora_weights,
        )
        for layer in layers.values()
    }
    if len(settings) != 1:
        raise ValueError(
            f"save_adapter needs one rank, alpha, rsLoRA flag, dropout, DoRA flag and initialisation for all "
            f"layers (as apply_lora makes), found {sorted(settings, key=str)}; save these layers with PEFT's "
            "rank_pattern instead"
        )
    r, alpha, use_rslora, dropout, use_dora, init = settings.pop()
    return LoRAConfig(
        r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, use_dora=use_dora, init_lora_weights=init
    )


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write the adapter in PEFT's format; each file is written to a temporary name, then renamed.

    Files: ``adapter_config.json`` and ``adapter_model.safetensors``. Returns the directory.
    """
    layers = require_lora_layers(model, "save_adapter")
    as_path(directory, "save_adapter", "directory")
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(
            f"save_adapter: base_model_name_or_path must be a string or None, got {base_model_name_or_path!r}"
        )
    config = _layer_config(layers)
    first = next(iter(layers.values()))
    if base_model_name_or_path is None:
        base_model_name_or_path = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(
            f"save_adapter: {str(directory)!r} is a file; pass a directory path to save into"
        )
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    # The one atomic-write rule (lora_widgets.atomic): a kill mid-write leaves the earlier file, and a full
    # disk names the file being written.
    atomic_write(
        directory / ADAPTER_WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"})
    )
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": _targets_for_saving(model, list(layers)),
        "use_rslora": config.use_rslora,
        "bias": "none",
        "fan_in_fan_out": first.fan_in_fan_out,
        "inference_mode": True,
        "use_dora": config.use_dora,
        # PiSSA's "pissa" tells a loader (ours or PEFT's) to recompute the residual base: lora_widgets.lora.init
        "init_lora_weights": config.init_lora_weights,
        "modules_to_save": None,
        "revision": None,
    }
    atomic_write_json(directory / ADAPTER_CONFIG_NAME, adapter_config, indent=2, sort_keys=True)
    return directory


# ----------------------------------------------------------------------------------------------
# Reading: every check before the model is touched
# ----------------------------------------------------------------------------------------------


def _read_config(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{str(path)!r} is not UTF-8 text ({exc.reason}); save it again as UTF-8 JSON"
        ) from exc
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{str(path)!r} is not valid JSON ({exc}); it may be truncated: save the adapter again"
        ) from exc
    if not isinstance(cfg, dict):
        raise ValueError(
            f"{str(path)!r} holds a JSON {type(cfg).__name__}, not an object; an adapter config is a JSON "
            'object such as {"peft_type": "LORA", "r": 8, ...}: save the adapter again'
        )
    return cfg


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensors[key] = f.get_tensor(key)
    except (SafetensorError, OSError) as exc:
        raise ValueError(
            f"{str(path)!r} is not a readable safetensors file ({exc}); it may be truncated or corrupt: "
            "save the adapter again"
        ) from exc
    return tensors


def _read_adapter(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if directory.is_file():
        raise FileNotFoundError(
            f"{str(directory)!r} is a file; pass the adapter directory that holds {ADAPTER_CONFIG_NAME} "
            f"and {ADAPTER_WEIGHTS_NAME}"
        )
    if not directory.is_dir():
        raise FileNotFoundError(
            f"adapter directory {str(directory)!r} does not exist; pass the directory save_adapter wrote"
        )
    cfg_path = directory / ADAPTER_CONFIG_NAME
    weights_path = directory / ADAPTER_WEIGHTS_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{str(cfg_path)!r} is missing: not a PEFT/LoRA adapter directory")
    if not weights_path.is_file():
        hint = " (only .safetensors are read; re-save with safe_serialization=True)"
        if (directory / "adapter_model.bin").exists():
            raise FileNotFoundError(f"{str(weights_path)!r} is missing{hint}")
        raise FileNotFoundError(f"{str(weights_path)!r} is missing; save the adapter again")
    return _read_config(cfg_path), _read_tensors(weights_path)


def _group_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {"A": tensor, "B": tensor[, "M": DoRA magnitude]}} from PEFT keys; unknown keys raise
    ValueError."""
    pattern = re.compile(
        r"^"
        + re.escape(_PEFT_PREFIX)
        + r"(?P<path>.+)\.(?:lora_(?P<ab>[AB])(?:\.default)?\.weight|lora_magnitude_vector(?:\.default\.weight)?)$"
    )
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = pattern.match(key)
        if m is None:
            raise ValueError(
                f"unexpected tensor {key!r} in the adapter; expected "
                f"'{_PEFT_PREFIX}<module path>.lora_A.weight' / '.lora_B.weight' / '.lora_magnitude_vector' only"
            )
        if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
            raise ValueError(
                f"adapter tensor {key!r} is not finite floating-point data (NaN, inf or integers)"
            )
        groups.setdefault(m["path"], {})[m["ab"] or "M"] = value
    for path, ab in groups.items():
        if not {"A", "B"} <= set(ab):
            names = ", ".join("lora_magnitude_vector" if k == "M" else f"lora_{k}" for k in ab)
            raise ValueError(f"adapter has {names} but not both factors for module {path!r}")
    return groups


def _config_from_file(cfg: dict[str, Any], groups: dict[str, Any], cfg_path: Path) -> LoRAConfig:
    """The adapter's LoRAConfig (targets: exactly the modules that have weights); errors name the file."""
    if "r" not in cfg:
        raise ValueError(f"{str(cfg_path)!r} lacks the field 'r'; it is not a LoRA adapter config")
    try:
        config = LoRAConfig.from_peft({**cfg, "target_modules": sorted(groups)}, loading=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{str(cfg_path)!r}: {exc}") from exc
    mismatched = sorted(p for p, ab in groups.items() if ("M" in ab) != config.use_dora)
    if mismatched:
        has = "has no" if config.use_dora else "has a"
        raise ValueError(
            f"{str(cfg_path)!r} says use_dora={config.use_dora}, but module {mismatched[0]!r} {has} "
            "lora_magnitude_vector in the weights file; the two files do not belong together: save the adapter again"
        )
    return config


def _check_targets(
    model: nn.Module, groups: dict[str, dict[str, torch.Tensor]], config: LoRAConfig
) -> dict[str, tuple[int, int, int]]:
    """{module path: (rank, in, out)} that each adapter tensor pair must fit; raises before any change."""
    existing = lora_layers(model)
    if existing:
        missing = sorted(set(groups) - set(existing))
        extra = sorted(set(existing) - set(groups))
        if missing or extra:
            raise ValueError(
                f"adapter modules do not match this model's adapters: in the adapter only {missing[:5]}, "
                f"in the model only {extra[:5]}; call remove_lora(model) first to load a different adapter"
            )
        ranks = sorted({layer.r for layer in existing.values()})
        kinds = {(layer.use_dora, layer.init_lora_weights == "pissa") for layer in existing.values()}
        if kinds != {(config.use_dora, config.init_lora_weights == "pissa")}:
            raise ValueError(
                f"the adapter has use_dora={config.use_dora}, init_lora_weights={config.init_lora_weights!r}, "
                "which this model's adapters do not share (DoRA has a magnitude vector; PiSSA changed the base "
                "weight); call remove_lora(model) first to load it onto the base model"
            )
        if ranks != [config.r]:
            raise ValueError(
                f"the adapter has rank r={config.r} but this model's adapters have r={ranks}; call "
                "remove_lora(model) first (save_adapter the current ones if you want to keep them)"
            )
        return {n: (layer.r, layer.in_features, layer.out_features) for n, layer in existing.items()}
    if has_peft_layers(model):
        raise ValueError("this model is wrapped by PEFT; load the adapter with PEFT instead")
    candidates = adaptable_modules(model)
    unknown = sorted(set(groups) - set(candidates))
    if unknown:
        raise ValueError(
            f"adapter refers to modules this model does not have: {unknown[:5]}; "
            f"the model has {short_list(candidates)}. Is it the same base model?"
        )
    return {n: (config.r, *in_out_features(candidates[n])) for n in groups}


def _put(
    layer: LoRALinear,
    a: torch.Tensor,
    b: torch.Tensor,
    m: torch.Tensor | None,
    alpha: float,
    use_rslora: bool,
    merged: bool,
) -> None:
    layer.unmerge()
    layer.lora_A.weight.copy_(a)
    layer.lora_B.weight.copy_(b)
    if m is not None and layer.lora_magnitude_vector is not None:
        layer.lora_magnitude_vector.copy_(m)
    layer.alpha, layer.use_rslora = alpha, use_rslora
    if merged:
        layer.merge()


@torch.no_grad()
def _copy_into(
    layers: dict[str, LoRALinear], groups: dict[str, dict[str, torch.Tensor]], config: LoRAConfig
) -> None:
    """Put the adapter's factors and scale into the layers, keeping each one's merge state; all or none."""
    saved = {
        n: (
            lay.lora_A.weight.clone(),
            lay.lora_B.weight.clone(),
            None if lay.lora_magnitude_vector is None else lay.lora_magnitude_vector.detach().clone(),
            lay.alpha,
            lay.use_rslora,
            lay.merged,
        )
        for n, lay in layers.items()
    }
    done: list[str] = []
    try:
        for path, ab in groups.items():
            done.append(path)
            _put(layers[path], ab["A"], ab["B"], ab.get("M"), config.alpha, config.use_rslora, saved[path][5])
    except BaseException:
        for path in reversed(done):
            _put(layers[path], *saved[path])
        raise


def load_adapter(model: nn.Module, directory: str | os.PathLike[str]) -> LoRAReport:
    """Load a PEFT-format LoRA adapter into ``model``.

    If the model has no adapters yet, they are created from ``adapter_config.json`` first; if it has, the
    adapter must have the same modules and rank (merged layers stay merged, with the new weights).
    Everything is validated (files present and readable, keys map onto modules of this model, shapes and
    ranks match) before the model is touched, and a failure part-way undoes what was done, so a bad adapter
    raises a clear error and leaves the model as it was.
    """
    check_model(model, "load_adapter")
    as_path(directory, "load_adapter", "directory")
    directory = Path(directory)
    cfg, tensors = _read_adapter(directory)
    groups = _group_tensors(tensors)
    if not groups:
        raise ValueError(f"adapter {str(directory)!r} contains no LoRA weights")
    config = _config_from_file(cfg, groups, directory / ADAPTER_CONFIG_NAME)
    for path, (r, k_in, d_out) in _check_targets(model, groups, config).items():
        ab = groups[path]
        shapes_m = () if "M" not in ab else tuple(ab["M"].shape)
        if shapes_m not in ((), (d_out,)):
            raise ValueError(
                f"shape mismatch for {path!r}: adapter has lora_magnitude_vector {shapes_m}; this model needs "
                f"({d_out},). Is it an adapter for this base model?"
            )
        if tuple(ab["A"].shape) != (r, k_in) or tuple(ab["B"].shape) != (d_out, r):
            raise ValueError(
                f"shape mismatch for {path!r}: adapter has lora_A {tuple(ab['A'].shape)}, lora_B "
                f"{tuple(ab['B'].shape)}; this model needs ({r}, {k_in}) and ({d_out}, {r}). "
                "Is it an adapter for this base model?"
            )
    # Validated: now change the model (undone on failure).
    created = not lora_layers(model)
    if created:
        apply_lora(model, config)
    try:
        _copy_into(lora_layers(model), groups, config)
    except BaseException:
        if created:
            remove_lora(model)
        raise
    trainable, total = count_parameters(model)
    return LoRAReport(sorted(groups), trainable, total, config)
