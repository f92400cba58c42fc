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
``base_layer``) and :func:`save_adapter` writes ``adapter_config.json`` + ``adapter_model.safetensors``
with keys ``base_model.model.<module path>.lora_A.weight``, so an adapter trained here loads with
``peft.PeftModel.from_pretrained`` and the other way round. Only safetensors are read: nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

try:  # transformers' GPT-2 style layer: y = x @ W + b with W stored as [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but keep the core importable
    Conv1D = None  # type: ignore[assignment,misc]

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "LoRAConfig",
    "LoRALinear",
    "LoRAReport",
    "apply_lora",
    "count_parameters",
    "disable_adapters",
    "has_lora",
    "load_adapter",
    "lora_layers",
    "lora_state_dict",
    "merge_and_unload",
    "merge_lora",
    "remove_lora",
    "save_adapter",
    "set_adapters_enabled",
    "unmerge_lora",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."

DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    # The same per-architecture defaults PEFT uses (peft.utils.constants), so `target_modules=None`
    # means the same thing here and there.
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "olmo": ["q_proj", "v_proj"],
    "smollm3": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "opt": ["q_proj", "v_proj"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
}

_ADAPTABLE: tuple[type[nn.Module], ...] = (nn.Linear,) if Conv1D is None else (nn.Linear, Conv1D)


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoRAConfig:
    """What to adapt and how.

    Args:
        r: rank of the update B A (>= 1). Trainable parameters per layer: r * (in + out).
        alpha: scale numerator (> 0). The update is multiplied by ``alpha / r`` (or ``alpha / sqrt(r)``
            with ``use_rslora``), so changing r does not change the update's initial magnitude much.
        dropout: dropout probability on the adapter's input, in [0, 1).
        target_modules: which Linear/Conv1D modules to wrap. ``None``: the architecture's default
            (q and v projections for Llama-family models, ``c_attn`` for GPT-2, ...); a list of names,
            each matching a module path exactly or as its last dotted components (``"q_proj"`` matches
            ``model.layers.0.self_attn.q_proj``); a string: a regular expression that must match the
            whole module path; or ``"all-linear"``: every Linear/Conv1D except the output head.
        use_rslora: rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023, arXiv:2312.03732, sec. 3).
        bias: only ``"none"`` (biases stay frozen, as in PEFT's default).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] | None = None
    use_rslora: bool = False
    bias: str = "none"

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRAConfig.r must be an integer >= 1, got r={self.r!r}")
        if not isinstance(self.alpha, int | float) or not self.alpha > 0:
            raise ValueError(f"LoRAConfig.alpha must be > 0, got alpha={self.alpha!r}")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(
                f"LoRAConfig.dropout must be in [0, 1), got dropout={self.dropout!r}; use 0.0 to disable"
            )
        if self.bias != "none":
            raise ValueError(
                f"LoRAConfig.bias={self.bias!r} is not supported; lora_widgets trains adapters only, "
                "use bias='none'"
            )
        tm = self.target_modules
        if isinstance(tm, list):  # accept lists for convenience, store a hashable tuple
            object.__setattr__(self, "target_modules", tuple(tm))
            tm = self.target_modules
        if isinstance(tm, tuple):
            if not tm or not all(isinstance(t, str) and t for t in tm):
                raise ValueError(
                    f"LoRAConfig.target_modules must be a non-empty list of module names, got {tm!r}"
                )
        elif isinstance(tm, str):
            if tm != "all-linear":
                try:
                    re.compile(tm)
                except re.error as exc:
                    raise ValueError(
                        f"LoRAConfig.target_modules={tm!r} is not a valid regular expression ({exc}); "
                        "pass a list of module names instead"
                    ) from exc
        elif tm is not None:
            raise ValueError(
                "LoRAConfig.target_modules must be None, a list of names, a regex string or "
                f"'all-linear', got {tm!r}"
            )

    @property
    def scaling(self) -> float:
        """The factor applied to B A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of the fields (target_modules as a list or string)."""
        tm = list(self.target_modules) if isinstance(self.target_modules, tuple) else self.target_modules
        return {
            "r": self.r,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": tm,
            "use_rslora": self.use_rslora,
            "bias": self.bias,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRAConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError`` naming them."""
        unknown = set(data) - {"r", "alpha", "dropout", "target_modules", "use_rslora", "bias"}
        if unknown:
            raise TypeError(f"unknown LoRAConfig field(s) {sorted(unknown)}")
        tm = data.get("target_modules")
        return cls(**{**data, "target_modules": tuple(tm) if isinstance(tm, list) else tm})


# ----------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------


def _in_out_features(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    # transformers Conv1D: weight is [in, out]
    weight: torch.Tensor = layer.weight  # type: ignore[assignment]
    return int(weight.shape[0]), int(weight.shape[1])


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` (or transformers ``Conv1D``) plus a trainable low-rank update.

    ``forward(x) = base_layer(x) + scaling * lora_B(lora_A(dropout(x)))`` unless the adapter is
    merged into the base weight or disabled, in which case it is just ``base_layer(x)``.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, _ADAPTABLE):
            raise TypeError(
                f"LoRALinear wraps nn.Linear or transformers Conv1D, got {type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)  # Conv1D stores W transposed
        in_features, out_features = _in_out_features(base_layer)
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        weight = base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, r, bias=False, **factory)  # A: [r, in]
        self.lora_B = nn.Linear(r, out_features, bias=False, **factory)  # B: [out, r]
        self.reset_lora_parameters()
        self.merged = False
        self.enabled = True
        for p in self.base_layer.parameters():
            p.requires_grad_(False)

    def reset_lora_parameters(self) -> None:
        """A ~ Kaiming-uniform(a=sqrt(5)) as PEFT and nn.Linear do; B = 0 so that B A = 0 at the start."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (so code that reads ``module.weight`` keeps working)."""
        return self.base_layer.weight  # type: ignore[return-value]

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias, or None."""
        return self.base_layer.bias  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> result: [..., out]
        result: torch.Tensor = self.base_layer(x)
        if self.merged or not self.enabled:
            return result
        lora_x = x if x.dtype == self.lora_A.weight.dtype else x.to(self.lora_A.weight.dtype)
        # Scale the rank-r intermediate rather than the output: the same product, r/out of the work.
        hidden = self.lora_A(self.lora_dropout(lora_x)) * self.scaling  # [..., r]
        update = self.lora_B(hidden)  # [..., out]
        if update.dtype != result.dtype:
            update = update.to(result.dtype)
        return result + update

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A, in the base weight's orientation ([out, in], or [in, out] for Conv1D)."""
        a = self.lora_A.weight.float()  # [r, in]
        b = self.lora_B.weight.float()  # [out, r]
        delta = (b @ a) * self.scaling  # [out, in]
        if self.fan_in_fan_out:
            delta = delta.T  # [in, out], Conv1D layout
        return delta.to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + scaling * B A. A no-op if already merged."""
        if self.merged:
            return
        if not self.enabled:
            raise RuntimeError("cannot merge a disabled adapter; enable it first")
        weight: torch.Tensor = self.base_layer.weight  # type: ignore[assignment]
        weight.data += self.delta_weight()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - scaling * B A. A no-op if not merged."""
        if not self.merged:
            return
        weight: torch.Tensor = self.base_layer.weight  # type: ignore[assignment]
        weight.data -= self.delta_weight()
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.r}, "
            f"scaling={self.scaling:g}, merged={self.merged}, enabled={self.enabled}"
        )


# ----------------------------------------------------------------------------------------------
# Applying to a model
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoRAReport:
    """What :func:`apply_lora` (or :func:`load_adapter`) did."""

    matched: list[str]
    trainable_params: int
    total_params: int
    config: LoRAConfig | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def trainable_percent(self) -> float:
        """Trainable share of all parameters, in percent."""
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    def __str__(self) -> str:
        return (
            f"LoRA on {len(self.matched)} modules: trainable {self.trainable_params:,} / "
            f"total {self.total_params:,} ({self.trainable_percent:.3f}%)"
        )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) parameters count once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every :class:`LoRALinear` in the model, by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _has_peft_layers(model: nn.Module) -> bool:
    return any(isinstance(getattr(m, "lora_A", None), nn.ModuleDict) for m in model.modules())


def has_lora(model: nn.Module) -> bool:
    """True if the model carries LoRA adapters, ours or PEFT's."""
    return bool(lora_layers(model)) or _has_peft_layers(model)


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        with contextlib.suppress(Exception):
            head = get()
            if isinstance(head, nn.Module):
                return head
    return None


def _adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, _ADAPTABLE) and name and not isinstance(m, LoRALinear)
    }


def _resolve_targets(model: nn.Module, config: LoRAConfig) -> tuple[list[str], str]:
    """Module paths that ``config.target_modules`` selects, and a description of the rule used."""
    candidates = _adaptable_modules(model)
    tm = config.target_modules
    if tm is None:
        model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
        defaults = DEFAULT_TARGET_MODULES.get(model_type)
        if defaults is None:
            raise ValueError(
                f"no default target_modules for model_type={model_type!r}; pass "
                "LoRAConfig(target_modules=[...]) (e.g. ['q_proj', 'v_proj']) or 'all-linear'. "
                f"Linear/Conv1D modules in this model: {_short_list(candidates)}"
            )
        tm = tuple(defaults)
        rule = f"default for {model_type}: {list(defaults)}"
    else:
        rule = repr(tm if not isinstance(tm, tuple) else list(tm))
    if tm == "all-linear":
        head = _output_head(model)
        matched = [n for n, m in candidates.items() if m is not head and n.split(".")[-1] != "lm_head"]
    elif isinstance(tm, str):
        pattern = re.compile(tm)
        matched = [n for n in candidates if pattern.fullmatch(n)]
    else:
        matched = [n for n in candidates if any(n == t or n.endswith("." + t) for t in tm)]
    return matched, rule


def _short_list(names: Sequence[str] | dict[str, Any], limit: int = 12) -> str:
    items = list(names)
    # Show each distinct leaf name once, which is what users put in target_modules.
    leaves = sorted({n.split(".")[-1] for n in items})
    text = ", ".join(leaves[:limit])
    return f"[{text}{', ...' if len(leaves) > limit else ''}] ({len(items)} modules)"


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


_FROZEN_ATTR = "_lora_widgets_requires_grad"


def apply_lora(model: nn.Module, config: LoRAConfig | None = None) -> LoRAReport:
    """Wrap the modules selected by ``config`` in :class:`LoRALinear`, in place, and freeze the rest.

    Every parameter that is not a LoRA factor gets ``requires_grad=False``; the previous flags are
    remembered so that :func:`remove_lora` restores them.

    Raises:
        ValueError: the model already has LoRA adapters (ours or PEFT's), or nothing matched
            (the message lists the Linear/Conv1D module names the model does have).
    """
    config = config or LoRAConfig()
    if has_lora(model):
        raise ValueError(
            "this model already has LoRA adapters; apply_lora will not wrap twice. "
            "Call remove_lora(model) first to start from the base model, or train the existing adapters."
        )
    matched, rule = _resolve_targets(model, config)
    if not matched:
        raise ValueError(
            f"target_modules {rule} matched no Linear/Conv1D module. "
            f"This model has: {_short_list(_adaptable_modules(model))}"
        )
    setattr(model, _FROZEN_ATTR, {n: p.requires_grad for n, p in model.named_parameters()})
    for p in model.parameters():
        p.requires_grad_(False)
    for name in matched:
        base = model.get_submodule(name)
        _set_submodule(
            model,
            name,
            LoRALinear(base, config.r, config.alpha, config.dropout, config.use_rslora),
        )
    trainable, total = count_parameters(model)
    return LoRAReport(matched=matched, trainable_params=trainable, total_params=total, config=config)


def remove_lora(model: nn.Module) -> nn.Module:
    """Unwrap every adapter (unmerging first), restoring the base layers and their requires_grad flags."""
    for name, layer in lora_layers(model).items():
        layer.unmerge()
        _set_submodule(model, name, layer.base_layer)
    _restore_requires_grad(model)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and drop the wrappers: a plain model for export.

    Afterwards each adapted layer is its original ``nn.Linear``/``Conv1D`` holding W0 + scaling * B A, the
    model has no LoRA parameters, and ``save_pretrained`` writes an ordinary checkpoint that any
    ``transformers`` installation loads. The adapter itself is gone from the model: save it first
    (:func:`save_adapter`) if you want to keep it. Parameters get back the ``requires_grad`` flags they had
    before :func:`apply_lora`.
    """
    for name, layer in _require_layers(model).items():
        layer.merge()
        _set_submodule(model, name, layer.base_layer)
    _restore_requires_grad(model)
    return model


def _restore_requires_grad(model: nn.Module) -> None:
    flags: dict[str, bool] | None = getattr(model, _FROZEN_ATTR, None)
    if flags is not None:
        for n, p in model.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n])
        delattr(model, _FROZEN_ATTR)


def _require_layers(model: nn.Module) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no lora_widgets LoRA layers; call apply_lora(model, config) first")
    return layers


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W <- W + scaling B A). Merging twice is a no-op."""
    for layer in _require_layers(model).values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora` (W <- W - scaling B A). Unmerging an unmerged model is a no-op."""
    for layer in _require_layers(model).values():
        layer.unmerge()
    return model


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch all adapters on or off; off means the model computes exactly the base model."""
    layers = _require_layers(model)
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


# ----------------------------------------------------------------------------------------------
# PEFT-format persistence
# ----------------------------------------------------------------------------------------------


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under PEFT's keys: ``base_model.model.<path>.lora_{A,B}.weight``."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in _require_layers(model).items():
        out[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach()
        out[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach()
    return out


def _targets_for_saving(model: nn.Module, paths: list[str]) -> list[str] | str:
    """Leaf names if they select exactly ``paths`` (PEFT's suffix rule), else an exact regex."""
    leaves = sorted({p.split(".")[-1] for p in paths})
    candidates = list(_adaptable_modules(model)) + list(lora_layers(model))
    by_leaves = {n for n in candidates if any(n == t or n.endswith("." + t) for t in leaves)}
    if by_leaves == set(paths):
        return leaves
    return "|".join(re.escape(p) for p in sorted(paths))


def _atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write the adapter in PEFT's format; each file is written to a temporary name, then renamed.

    Files: ``adapter_config.json`` and ``adapter_model.safetensors``. Returns the directory.
    """
    layers = _require_layers(model)
    first = next(iter(layers.values()))
    config: LoRAConfig | None = None
    scalings = {layer.scaling for layer in layers.values()}
    ranks = {layer.r for layer in layers.values()}
    if len(scalings) != 1 or len(ranks) != 1:
        raise ValueError("save_adapter needs one rank and scaling for all layers (as apply_lora makes)")
    use_rslora = not math.isclose(first.scaling, first.alpha / first.r)
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    config = LoRAConfig(r=first.r, alpha=first.alpha, dropout=dropout, use_rslora=use_rslora)
    if base_model_name_or_path is None:
        base_model_name_or_path = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{ADAPTER_WEIGHTS_NAME}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, directory / ADAPTER_WEIGHTS_NAME)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
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
        "init_lora_weights": True,
        "modules_to_save": None,
        "revision": None,
    }
    _atomic_write_json(directory / ADAPTER_CONFIG_NAME, adapter_config)
    return directory


def _read_adapter(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {str(directory)!r} does not exist")
    cfg_path = directory / ADAPTER_CONFIG_NAME
    weights_path = directory / ADAPTER_WEIGHTS_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{str(cfg_path)!r} is missing: not a PEFT/LoRA adapter directory")
    if not weights_path.is_file():
        hint = " (only .safetensors are read; re-save with safe_serialization=True)"
        if (directory / "adapter_model.bin").exists():
            raise FileNotFoundError(f"{str(weights_path)!r} is missing{hint}")
        raise FileNotFoundError(f"{str(weights_path)!r} is missing")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(cfg_path)!r} is not valid JSON: {exc}") from exc
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"adapter peft_type is {cfg.get('peft_type')!r}; only 'LORA' is supported")
    for unsupported in ("rank_pattern", "alpha_pattern"):
        if cfg.get(unsupported):
            raise ValueError(f"adapter uses {unsupported}={cfg[unsupported]!r}, which is not supported")
    if cfg.get("use_dora"):
        raise ValueError("adapter uses DoRA (use_dora=true), which is not supported")
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(weights_path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            tensors[key] = f.get_tensor(key)
    return cfg, tensors


def _group_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {"A": tensor, "B": tensor}} from PEFT keys; unknown keys raise ValueError."""
    pattern = re.compile(
        r"^" + re.escape(_PEFT_PREFIX) + r"(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$"
    )
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = pattern.match(key)
        if m is None:
            raise ValueError(
                f"unexpected tensor {key!r} in the adapter; expected "
                f"'{_PEFT_PREFIX}<module path>.lora_A.weight' / '.lora_B.weight' only"
            )
        groups.setdefault(m["path"], {})[m["ab"]] = value
    for path, ab in groups.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"adapter has lora_{''.join(ab)} but not both factors for module {path!r}")
    return groups


def load_adapter(model: nn.Module, directory: str | os.PathLike[str]) -> LoRAReport:
    """Load a PEFT-format LoRA adapter into ``model``.

    If the model has no adapters yet, they are created from ``adapter_config.json`` first. Everything is
    validated (files present, keys map onto modules of this model, shapes match) before the model is
    touched, so a bad adapter raises a clear error and leaves the model unchanged.
    """
    directory = Path(directory)
    cfg, tensors = _read_adapter(directory)
    groups = _group_tensors(tensors)
    if not groups:
        raise ValueError(f"adapter {str(directory)!r} contains no LoRA weights")
    try:
        config = LoRAConfig(
            r=int(cfg["r"]),
            alpha=float(cfg.get("lora_alpha", cfg["r"])),
            dropout=float(cfg.get("lora_dropout", 0.0)),
            target_modules=tuple(sorted(groups)),  # exactly the modules that have weights
            use_rslora=bool(cfg.get("use_rslora", False)),
        )
    except KeyError as exc:
        raise ValueError(f"adapter_config.json lacks the field {exc.args[0]!r}") from exc

    existing = lora_layers(model)
    if existing:
        missing = sorted(set(groups) - set(existing))
        extra = sorted(set(existing) - set(groups))
        if missing or extra:
            raise ValueError(
                f"adapter modules do not match this model's adapters: in the adapter only {missing[:5]}, "
                f"in the model only {extra[:5]}"
            )
        targets = {n: (layer.in_features, layer.out_features) for n, layer in existing.items()}
    else:
        if _has_peft_layers(model):
            raise ValueError("this model is wrapped by PEFT; load the adapter with PEFT instead")
        candidates = _adaptable_modules(model)
        unknown = sorted(set(groups) - set(candidates))
        if unknown:
            raise ValueError(
                f"adapter refers to modules this model does not have: {unknown[:5]}; "
                f"the model has {_short_list(candidates)}. Is it the same base model?"
            )
        targets = {n: _in_out_features(candidates[n]) for n in groups}
    for path, ab in groups.items():
        k_in, d_out = targets[path]
        if tuple(ab["A"].shape) != (config.r, k_in) or tuple(ab["B"].shape) != (d_out, config.r):
            raise ValueError(
                f"shape mismatch for {path!r}: adapter has lora_A {tuple(ab['A'].shape)}, lora_B "
                f"{tuple(ab['B'].shape)}; this model needs ({config.r}, {k_in}) and ({d_out}, {config.r})"
            )
    # Validated: now change the model.
    if not existing:
        apply_lora(model, config)
        existing = lora_layers(model)
    with torch.no_grad():
        for path, ab in groups.items():
            layer = existing[path]
            was_merged = layer.merged
            layer.unmerge()
            layer.lora_A.weight.copy_(ab["A"])
            layer.lora_B.weight.copy_(ab["B"])
            layer.alpha = config.alpha
            layer.scaling = config.scaling
            if was_merged:
                layer.merge()
    trainable, total = count_parameters(model)
    return LoRAReport(sorted(groups), trainable, total, config)
