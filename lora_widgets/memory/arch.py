"""Architectures for the memory estimator: the offline table of known models, config resolution, and
parameter counting on PyTorch's ``meta`` device.

Everything here is shape bookkeeping; no weight is ever allocated. A model is instantiated under
``torch.device("meta")``, so its parameters have shapes and dtypes but no storage: counting the
parameters of a 70 B model this way takes a fraction of a second and no memory. LoRA is applied to that
meta model with :func:`lora_widgets.lora.layers.apply_lora`, so the trainable-parameter count is the very
number a real run reports.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_widgets.lora.layers import LoRAConfig, apply_lora, has_lora, lora_layers
from lora_widgets.quantization import layer_base

__all__ = [
    "ArchInfo",
    "ParamPlan",
    "attention_implementation",
    "known_model_config",
    "known_models",
    "lookup_known",
    "param_plan",
    "parse_dtype",
    "resolve_config",
]

ARCHITECTURES_PATH = Path(__file__).resolve().parents[1] / "assets" / "architectures.json"

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A floating torch dtype from a dtype or its name ("float32", "bf16", "float16", ...): the one table of
    dtype names (the estimator, the planner and ``load_model(dtype=...)`` accept the same names)."""
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
        raise ValueError(f"dtype={dtype} is not supported; use one of {sorted(set(_DTYPES))}")
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    raise ValueError(
        f"unknown dtype: dtype={dtype!r} is not a supported dtype; valid names: {sorted(_DTYPES)}"
    )


@functools.lru_cache(maxsize=1)
def _table() -> dict[str, dict[str, Any]]:
    data: dict[str, Any] = json.loads(ARCHITECTURES_PATH.read_text())
    models: dict[str, dict[str, Any]] = data["models"]
    return models


def known_models() -> list[str]:
    """Names of the architectures whose configs ship with the package (usable with no network)."""
    return list(_table())


def lookup_known(name: str) -> str | None:
    """The table key for a short name ("Llama-3.2-3B") or a hub id ("meta-llama/Llama-3.2-3B")."""
    table = _table()
    lowered = name.strip().lower()
    for key, entry in table.items():
        if lowered in (key.lower(), str(entry.get("hub_id", "")).lower()):
            return key
    return None


def known_model_config(name: str) -> Any:
    """The transformers config of a known model (see :func:`known_models`), built offline."""
    from transformers import CONFIG_MAPPING

    key = lookup_known(name)
    if key is None:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(known_models())}")
    fields = dict(_table()[key]["config"])
    model_type = fields.pop("model_type")
    config = CONFIG_MAPPING[model_type](**fields)
    config.name_or_path = _table()[key].get("hub_id", key)
    return config


def resolve_config(model_or_config: Any) -> tuple[Any, nn.Module | None]:
    """(transformers config, the model itself or None) for a model, a config, a known name, or a hub id/path.

    Hub ids and local paths are resolved with ``AutoConfig.from_pretrained``: the config only, no weights.
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model_or_config, nn.Module):
        config = getattr(model_or_config, "config", None)
        if not isinstance(config, PretrainedConfig):
            raise TypeError(
                f"{type(model_or_config).__name__} has no transformers config (model.config); the estimator "
                "needs the architecture: pass a transformers model, its config, or a known model name"
            )
        return config, model_or_config
    if isinstance(model_or_config, PretrainedConfig):
        return model_or_config, None
    if isinstance(model_or_config, str | Path):
        name = str(model_or_config)
        if lookup_known(name) is not None:
            return known_model_config(name), None
        try:
            return AutoConfig.from_pretrained(name), None
        except Exception as exc:
            raise ValueError(
                f"could not resolve {name!r}: not a known model ({', '.join(known_models())}) and "
                f"AutoConfig.from_pretrained failed ({type(exc).__name__}: {exc}). Pass a config or a model instead."
            ) from exc
    raise TypeError(
        "model_or_config must be a torch model, a transformers PretrainedConfig, a known model name or a hub "
        f"id/local path, got {type(model_or_config).__name__}"
    )


def attention_implementation(config: Any) -> str:
    """The attention implementation transformers will build for ``config``: its explicit choice, else "sdpa".

    The explicit choice is ``config._attn_implementation_internal`` (set by ``attn_implementation=...`` or by
    building a model, which records what it picked). It is read directly because the public-looking
    ``config._attn_implementation`` differs by version for a config nobody set: transformers 4.x answers
    "eager" (then builds the model with SDPA anyway, ``_autoset_attn_implementation``), 5.x answers None.
    Both build SDPA for every architecture the estimator models when torch has it (torch >= 2.1.1), so an
    unset choice means SDPA. Reading the property made 4.x estimates count eager attention's saved
    ``s x s`` softmax that no model built from the config keeps (12-28% too high on the bf16 grid).
    """
    if "_attn_implementation_internal" in config.__dict__:
        impl = config.__dict__["_attn_implementation_internal"]
    else:  # a config class that keeps no internal field: its property is all there is
        impl = getattr(config, "_attn_implementation", None)
    return str(impl or "sdpa")


@dataclass(frozen=True)
class ArchInfo:
    """The dimensions that shape activation memory, read from a transformers config."""

    family: str  # "llama" (RMSNorm + gated MLP + RoPE: llama, mistral, qwen2, ...) or "gpt2"
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    attn_impl: str  # "sdpa" (memory-efficient kernels: no s x s matrix kept) or "eager"
    dropout: float  # residual/attention dropout probability active in training (GPT-2: 0.1)
    positions: int = 0  # rows of a learned position embedding (GPT-2), 0 for rotary models

    @classmethod
    def from_config(cls, config: Any) -> ArchInfo:
        """Read the dimensions; GPT-2 style names (n_embd, n_layer, ...) and Llama style names both work."""
        get = config.__dict__.get
        model_type = str(getattr(config, "model_type", ""))
        hidden = int(get("hidden_size") or get("n_embd") or 0)
        layers = int(get("num_hidden_layers") or get("n_layer") or 0)
        heads = int(get("num_attention_heads") or get("n_head") or 0)
        vocab = int(get("vocab_size") or 0)
        if not (hidden and layers and heads and vocab):
            raise ValueError(
                f"config of model_type={model_type!r} lacks hidden size / layers / heads / vocab "
                "(hidden_size or n_embd, num_hidden_layers or n_layer, ...); cannot estimate activations"
            )
        family = "gpt2" if model_type == "gpt2" else "llama"
        if family == "gpt2":
            intermediate = int(get("n_inner") or 4 * hidden)
            kv_heads = heads
            dropout = float(get("resid_pdrop") or 0.0)
        else:
            intermediate = int(get("intermediate_size") or 4 * hidden)
            kv_heads = int(get("num_key_value_heads") or heads)
            dropout = float(get("attention_dropout") or 0.0)
        head_dim = int(get("head_dim") or hidden // heads)
        impl = attention_implementation(config)
        return cls(
            family=family,
            model_type=model_type,
            hidden=hidden,
            intermediate=intermediate,
            layers=layers,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            vocab=vocab,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            attn_impl="eager" if impl == "eager" else "sdpa",
            dropout=dropout,
            positions=int(get("n_positions") or 0) if family == "gpt2" else 0,
        )


@dataclass(frozen=True)
class LoRAModule:
    """One adapted layer: its leaf name (q_proj, c_attn, ...), shapes and whether its dropout is on."""

    leaf: str
    in_features: int
    out_features: int
    r: int
    dropout: bool


@dataclass(frozen=True)
class ParamPlan:
    """Parameter counts of the model to train (shared/tied parameters counted once)."""

    total: int  # every parameter (base + LoRA factors)
    trainable: int
    frozen_linear: int  # frozen weights of Linear/Conv1D layers inside the blocks (what 4/8-bit quantizes)
    largest_trainable: int  # largest single trainable tensor (optimizer temporaries without foreach)
    lora: tuple[LoRAModule, ...]  # empty for full fine-tuning
    trainable_leaves: frozenset[str]  # leaf names of modules with a trainable weight ("q_proj", "norm", ...)
    frozen_linear_shapes: tuple[tuple[int, int], ...] = ()  # (out, in) of each of those frozen Linear weights
    trainable_sizes: tuple[
        int, ...
    ] = ()  # numbers in each trainable tensor (8-bit optimizer state is per tensor)

    @property
    def frozen(self) -> int:
        """Parameters that get no gradient."""
        return self.total - self.trainable


def _plan_of(model: nn.Module) -> ParamPlan:
    get_head: Any = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    adapters = lora_layers(model)
    adapter_params = {
        id(p) for layer in adapters.values() for p in (*layer.lora_A.parameters(), *layer.lora_B.parameters())
    }
    seen: set[int] = set()
    total = trainable = frozen_linear = largest = 0
    leaves: set[str] = set()
    shapes: list[tuple[int, int]] = []
    sizes: list[int] = []
    for mod_name, module in model.named_modules():
        is_linear = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            # a quantized weight's storage is packed ([n/2, 1] uint8 for 4 bits): count the numbers it holds
            shape = _logical_shape(module, p)
            n = shape[0] * shape[1] if shape is not None else p.numel()
            total += n
            if p.requires_grad:
                trainable += n
                sizes.append(n)
                largest = max(largest, n)
                leaves.add(mod_name.split(".")[-1] or "model")
            elif is_linear and module is not head and id(p) not in adapter_params and shape is not None:
                frozen_linear += n
                shapes.append(shape)
    lora = tuple(
        LoRAModule(
            leaf=name.split(".")[-1],
            in_features=layer.in_features,
            out_features=layer.out_features,
            r=layer.r,
            dropout=isinstance(layer.lora_dropout, nn.Dropout),
        )
        for name, layer in adapters.items()
    )
    return ParamPlan(
        total=total,
        trainable=trainable,
        frozen_linear=frozen_linear,
        largest_trainable=largest,
        lora=lora,
        trainable_leaves=frozenset(leaves),
        frozen_linear_shapes=tuple(shapes),
        trainable_sizes=tuple(sizes),
    )


def _logical_shape(module: nn.Module, p: torch.Tensor) -> tuple[int, int] | None:
    """(out, in) of a Linear-like weight ``p`` of ``module`` (a quantized one's too); ``None`` for other tensors."""
    if layer_base(module) is not None and p is module.weight:
        return int(module.out_features), int(module.in_features)  # type: ignore[arg-type]
    return (int(p.shape[0]), int(p.shape[1])) if p.dim() == 2 else None


@functools.lru_cache(maxsize=64)
def _meta_plan(config_json: str, model_type: str, lora_key: str | None) -> ParamPlan:
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    fields = json.loads(config_json)
    fields.pop("model_type", None)
    config = CONFIG_MAPPING[model_type](**fields)
    with torch.device("meta"):  # shapes only: no storage is allocated, whatever the model size
        model = AutoModelForCausalLM.from_config(config)
    if lora_key is not None:
        apply_lora(model, LoRAConfig.from_dict(json.loads(lora_key)))
    return _plan_of(model)


def param_plan(config: Any, model: nn.Module | None, lora: LoRAConfig | None) -> ParamPlan:
    """Parameter counts for training ``model`` (or the architecture of ``config``) with ``lora``.

    * a model and ``lora=None``: counted as it is (its adapters, or all of its trainable parameters);
    * otherwise the architecture is instantiated on the meta device (cached) and ``lora`` applied there,
      so the user's model is never modified.
    """
    if model is not None and lora is None:
        # as it is: adapters already applied (only they train), or full fine-tuning of its trainable parameters
        return _plan_of(model)
    if model is not None and has_lora(model):
        raise ValueError(
            "this model already carries LoRA adapters; pass lora=None to estimate it as it is, "
            "or remove_lora(model) first to estimate a different LoRA configuration"
        )
    config_json = config.to_json_string(use_diff=False)
    if lora is None:
        return _meta_plan(config_json, str(config.model_type), None)
    # LoRA parameters are linear in r (r * (in + out) per adapted layer): count once at r = 1 (cached) and
    # scale, so a rank slider or a search over ranks instantiates the meta model once per architecture.
    unit = {**lora.to_dict(), "r": 1}
    plan = _meta_plan(config_json, str(config.model_type), json.dumps(unit, sort_keys=True))
    r = lora.r
    return dataclasses.replace(
        plan,
        total=plan.total + (r - 1) * plan.trainable,
        trainable=r * plan.trainable,
        largest_trainable=r * plan.largest_trainable,
        trainable_sizes=tuple(r * n for n in plan.trainable_sizes),
        lora=tuple(dataclasses.replace(m, r=r) for m in plan.lora),
    )
