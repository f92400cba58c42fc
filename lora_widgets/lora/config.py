"""LoRA settings: what to adapt and how, the one scaling rule, and the exact conversion of a PEFT config.

Split from :mod:`lora_widgets.lora.layers` (the layer and model surgery) so each module keeps one job; the public
names here are re-exported there. The scaling rule (:func:`lora_scaling`) and the checks of r, alpha,
dropout and use_rslora (:func:`check_hparams`) are written once and used by :class:`LoRAConfig`,
:class:`~lora_widgets.lora.layers.LoRALinear`, the PEFT file format and the memory estimator alike. The end of the
module says what ``target_modules`` selects in a model (PEFT's rules) and checks that a model is a model.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D  # GPT-2 style layer: y = x @ W + b with W stored as [in, out]

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "LoRAConfig",
    "LoRAReport",
    "adaptable_modules",
    "as_lora_config",
    "check_hparams",
    "check_matched",
    "check_model",
    "check_variant",
    "count_parameters",
    "in_out_features",
    "is_adaptable",
    "lora_scaling",
    "raise_if_out_of_memory",
    "resolve_targets",
    "short_list",
]

_ADAPTABLE: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)

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


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor applied to B A: ``alpha / r`` (Hu et al. 2021, sec. 4.1), or ``alpha / sqrt(r)`` with
    rank-stabilised LoRA (Kalajdzievski 2023, arXiv:2312.03732, sec. 3). The only place this rule lives."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def check_hparams(owner: str, r: Any, alpha: Any, dropout: Any, use_rslora: Any) -> tuple[int, float, float]:
    """Validated (r, alpha, dropout); each message names ``owner``, the argument, its value and the fix."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
        raise ValueError(f"{owner}: r must be an integer >= 1, got r={r!r}; typical ranks are 4 to 64")
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, numbers.Real)
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise ValueError(
            f"{owner}: alpha must be a finite number > 0, got alpha={alpha!r}; a common choice is alpha = 2 * r"
        )
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"{owner}: dropout must be in [0, 1), got dropout={dropout!r}; use 0.0 to disable")
    if not isinstance(use_rslora, bool):
        raise ValueError(
            f"{owner}: use_rslora must be True or False, got use_rslora={use_rslora!r} "
            f"({type(use_rslora).__name__}); a string such as 'no' would count as true"
        )
    return int(r), float(alpha), float(dropout)


#: The initialisations of A and B, under PEFT's names for ``init_lora_weights`` (``peft.LoraConfig``).
INIT_CHOICES: tuple[bool | str, ...] = (True, False, "gaussian", "pissa")


def check_variant(owner: str, use_dora: Any, init_lora_weights: Any) -> tuple[bool, bool | str]:
    """Validated (use_dora, init_lora_weights); each message names ``owner``, the value and the choices.

    ``init_lora_weights`` takes PEFT's values: ``True`` (A Kaiming-uniform, B = 0; the default), ``"gaussian"``
    (A ~ N(0, 1/r^2), B = 0), ``"pissa"`` (A, B from the top-r SVD of W, W replaced by the residual; Meng et al.
    2024, sec. 3) or ``False`` (both factors keep ``nn.Linear``'s random init, so B A != 0 at the start: PEFT's
    option for tests)."""
    if not isinstance(use_dora, bool):
        raise ValueError(
            f"{owner}: use_dora must be True or False, got use_dora={use_dora!r} ({type(use_dora).__name__})"
        )
    if not (isinstance(init_lora_weights, bool) or init_lora_weights in ("gaussian", "pissa")):
        fast_svd = isinstance(init_lora_weights, str) and init_lora_weights.startswith("pissa_niter_")
        raise ValueError(
            f"{owner}: init_lora_weights must be one of True, False, 'gaussian' or 'pissa' (PEFT's names), got "
            f"init_lora_weights={init_lora_weights!r}; "
            + (
                "PEFT's fast randomized SVD is not reproduced here (a load would not find the same residual): "
                "use 'pissa'"
                if fast_svd
                else "True is the usual choice (Kaiming-uniform A, zero B)"
            )
        )
    return use_dora, init_lora_weights


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

#: PEFT ``LoraConfig`` fields that change what the adapter computes and have no equivalent here: a PEFT
#: config that sets any of them cannot be converted exactly, so it is refused (naming the field).
_PEFT_UNSUPPORTED = (
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "layers_pattern",
    "exclude_modules",
    "modules_to_save",
    "lora_bias",
    "target_parameters",
    "trainable_token_indices",
    "layer_replication",
    "use_qalora",
    "use_bdlora",
    "alora_invocation_tokens",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "velora_config",
    "monteclora_config",
    "arrow_config",
    "kasa_config",
    "megatron_config",
)


@dataclass(frozen=True)
class LoRAConfig:
    """What to adapt and how.

    Args:
        r: rank of the update B A (>= 1). Trainable parameters per layer: r * (in + out).
        alpha: scale numerator (finite, > 0). The update is multiplied by :func:`lora_scaling`: ``alpha / r``
            (or ``alpha / sqrt(r)`` with ``use_rslora``), so changing r does not change the update's initial
            magnitude much.
        dropout: dropout probability on the adapter's input, in [0, 1).
        target_modules: which Linear/Conv1D modules to wrap. ``None``: the architecture's default
            (q and v projections for Llama-family models, ``c_attn`` for GPT-2, ...); a list of names,
            each matching a module path exactly or as its last dotted components (``"q_proj"`` matches
            ``model.layers.0.self_attn.q_proj``); a string: a regular expression that must match the
            whole module path; or ``"all-linear"``: every Linear/Conv1D except the output head.
        use_rslora: rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023, arXiv:2312.03732, sec. 3).
        bias: only ``"none"`` (biases stay frozen, as in PEFT's default).
        use_dora: weight-decomposed LoRA (Liu et al. 2024, sec. 4): a trainable magnitude per output row on top
            of the low-rank direction update (:mod:`lora_widgets.lora.dora`), as PEFT's ``use_dora``.
        init_lora_weights: how A and B start, under PEFT's names: ``True`` (Kaiming-uniform A, zero B),
            ``"gaussian"``, ``"pissa"`` or ``False`` (:func:`check_variant`; :mod:`lora_widgets.lora.init`).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] | None = None
    use_rslora: bool = False
    bias: str = "none"
    use_dora: bool = False
    init_lora_weights: bool | str = True

    def __post_init__(self) -> None:
        r, alpha, dropout = check_hparams("LoRAConfig", self.r, self.alpha, self.dropout, self.use_rslora)
        _, init = check_variant("LoRAConfig", self.use_dora, self.init_lora_weights)
        object.__setattr__(self, "init_lora_weights", init)
        object.__setattr__(self, "r", r)  # numpy integers and the like become plain Python numbers
        if not isinstance(self.alpha, int):
            object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "dropout", dropout)
        if self.bias != "none":
            raise ValueError(
                f"LoRAConfig.bias={self.bias!r} is not supported; lora_widgets trains adapters only, "
                "use bias='none'"
            )
        tm = self.target_modules
        if isinstance(tm, list | set | frozenset):  # accept lists (and PEFT's sets), store a hashable tuple
            object.__setattr__(
                self, "target_modules", tuple(tm if isinstance(tm, list) else sorted(tm, key=str))
            )
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
        """The factor applied to B A: :func:`lora_scaling` of this config."""
        return lora_scaling(self.alpha, self.r, self.use_rslora)

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
            "use_dora": self.use_dora,
            "init_lora_weights": self.init_lora_weights,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRAConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError`` naming them."""
        if not isinstance(data, Mapping):
            raise TypeError(f"LoRAConfig.from_dict needs a dict, got {type(data).__name__} {data!r}")
        fields = (
            "r",
            "alpha",
            "dropout",
            "target_modules",
            "use_rslora",
            "bias",
            "use_dora",
            "init_lora_weights",
        )
        unknown = set(data) - set(fields)
        if unknown:
            raise TypeError(
                f"unknown LoRAConfig field(s) {sorted(unknown)}; the fields are {', '.join(fields)}"
            )
        tm = data.get("target_modules")
        return cls(**{**data, "target_modules": tuple(tm) if isinstance(tm, list) else tm})

    @classmethod
    def from_peft(cls, peft_config: Any, *, loading: bool = False) -> LoRAConfig:
        """The exact equivalent of a PEFT ``LoraConfig`` (or of its ``adapter_config.json`` as a dict).

        PEFT's names map one to one (``lora_alpha`` -> ``alpha``, ``lora_dropout`` -> ``dropout``; ``r``,
        ``target_modules``, ``use_rslora``, ``bias`` keep theirs), with the same defaults and the same
        target-matching rules (``use_dora`` and ``init_lora_weights`` too). A config using a PEFT feature with no
        equivalent here (rank patterns,
        ``modules_to_save``, ...; see ``_PEFT_UNSUPPORTED``) raises ``ValueError`` naming the field, as does an
        ``init_lora_weights`` other than PEFT's True, False, ``"gaussian"`` and ``"pissa"``. ``loading`` says the
        config comes from a saved adapter (kept for callers; every accepted initialisation loads: a PiSSA
        adapter's base residual is recomputed from the base weight as PEFT does).
        """
        get = (
            peft_config.get
            if isinstance(peft_config, Mapping)
            else lambda k, d=None: getattr(peft_config, k, d)
        )
        source = "adapter_config.json" if isinstance(peft_config, Mapping) else "PEFT LoraConfig"
        peft_type = get("peft_type", "LORA")
        if str(getattr(peft_type, "value", peft_type)) != "LORA":
            raise ValueError(
                f"{source} has peft_type={peft_type!r}; only LoRA ('LORA') adapters are supported"
            )
        used = [(name, get(name)) for name in _PEFT_UNSUPPORTED if get(name)]
        if used:
            raise ValueError(
                f"{source} uses {', '.join(f'{n}={v!r}' for n, v in used)}, which lora_widgets does not "
                "support; use PEFT itself for this adapter, or a plain LoRA config"
            )
        return cls(
            r=get("r", 8),
            alpha=get("lora_alpha", 8),
            dropout=get("lora_dropout", 0.0),
            target_modules=get("target_modules"),
            use_rslora=get("use_rslora", False),
            bias=get("bias", "none"),
            use_dora=bool(get("use_dora", False)),
            init_lora_weights=get("init_lora_weights", True),
        )


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
    check_model(model, "count_parameters")
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


def _is_peft_config(value: Any) -> bool:
    return (
        type(value).__name__ == "LoraConfig" and hasattr(value, "lora_alpha") and hasattr(value, "peft_type")
    )


def as_lora_config(value: Any, argument: str = "config") -> LoRAConfig:
    """``value`` as a :class:`LoRAConfig`: ours unchanged, a PEFT ``LoraConfig`` converted exactly
    (:meth:`LoRAConfig.from_peft`); anything else (a dict, a name) raises ``TypeError`` saying what to pass."""
    if isinstance(value, LoRAConfig):
        return value
    if _is_peft_config(value):
        return LoRAConfig.from_peft(value)
    fix = (
        f"LoRAConfig(**{value!r}) or LoRAConfig.from_dict(...)"
        if isinstance(value, Mapping)
        else "LoRAConfig(r=8, alpha=16, ...)"
    )
    raise TypeError(
        f"{argument} must be a lora_widgets LoRAConfig (or a PEFT LoraConfig), got "
        f"{type(value).__name__} {value!r}; pass {fix}"
    )


# ----------------------------------------------------------------------------------------------
# What target_modules selects
# ----------------------------------------------------------------------------------------------


def in_out_features(layer: nn.Module) -> tuple[int, int]:
    """(in, out) features of an ``nn.Linear`` or transformers ``Conv1D``."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    # transformers Conv1D: weight is [in, out]
    weight: torch.Tensor = layer.weight  # type: ignore[assignment]
    return int(weight.shape[0]), int(weight.shape[1])


def check_model(model: Any, function: str) -> nn.Module:
    """``model`` if it is a torch module, else a ``TypeError`` naming ``function`` and the value."""
    if not isinstance(model, nn.Module):
        text = repr(model)
        text = text if len(text) <= 60 else text[:57] + "..."
        raise TypeError(
            f"{function}: model must be a torch.nn.Module, got {type(model).__name__} {text}; load the model "
            "first (e.g. transformers.AutoModelForCausalLM.from_pretrained(...) or lora_widgets.load_model(...))"
        )
    return model


def is_adaptable(module: nn.Module) -> bool:
    """Whether LoRA can wrap ``module``: an ``nn.Linear`` or a transformers ``Conv1D``."""
    return isinstance(module, _ADAPTABLE)


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return None
    try:
        head = get()
    except NotImplementedError:  # transformers' base class for models without a head
        return None
    return head if isinstance(head, nn.Module) else None


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The Linear/Conv1D modules LoRA can wrap, by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _ADAPTABLE) and name}


def resolve_targets(model: nn.Module, config: LoRAConfig) -> tuple[list[str], str]:
    """Module paths that ``config.target_modules`` selects, and a description of the rule used."""
    candidates = adaptable_modules(model)
    tm = config.target_modules
    if tm is None:
        model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
        defaults = DEFAULT_TARGET_MODULES.get(model_type)
        if defaults is None:
            raise ValueError(
                f"no default target_modules for model_type={model_type!r}; pass "
                "LoRAConfig(target_modules=[...]) (e.g. ['q_proj', 'v_proj']) or 'all-linear'. "
                f"Linear/Conv1D modules in this model: {short_list(candidates)}"
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


def short_list(names: Iterable[str], limit: int = 12) -> str:
    """Each distinct leaf name once (what users put in target_modules), and how many modules there are."""
    items = list(names)
    leaves = sorted({n.split(".")[-1] for n in items})
    text = ", ".join(leaves[:limit])
    return f"[{text}{', ...' if len(leaves) > limit else ''}] ({len(items)} modules)"


def check_matched(model: nn.Module, matched: list[str], rule: str) -> None:
    """Refuse targets that matched nothing (listing what the model has), and float8 weights: a storage format
    torch has no random initialiser (nor, on most devices, a matmul) for, so adapters cannot be made there."""
    if not matched:
        raise ValueError(
            f"target_modules {rule} matched no Linear/Conv1D module. "
            f"This model has: {short_list(adaptable_modules(model))}"
        )
    for name in matched:
        weight = getattr(model.get_submodule(name), "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point and weight.element_size() == 1:
            raise TypeError(
                f"apply_lora: {name}.weight is {weight.dtype}, a storage format LoRA adapters cannot be built "
                "or trained in. Load the model in bfloat16, float16 or float32 (load_model(name, dtype='bf16'), "
                "or model.to(torch.bfloat16)) and apply LoRA to that"
            )


def raise_if_out_of_memory(
    exc: BaseException, model: nn.Module, matched: list[str], config: LoRAConfig
) -> None:
    """(apply_lora) An allocation failure while creating the adapters, restated with the rank and the bytes it needed."""
    cpu_alloc = isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    if not (cpu_alloc or isinstance(exc, MemoryError | torch.OutOfMemoryError)):
        return
    elements = sum(config.r * sum(in_out_features(model.get_submodule(n))) for n in matched)
    itemsize = next((p.element_size() for p in model.parameters()), 4)
    message = (
        f"apply_lora: not enough memory for the adapters at r={config.r}: A and B of {len(matched)} layers "
        f"need {elements * itemsize:,} bytes. The model is unchanged; use a smaller r (typically 4 to 64)"
    )
    raise (
        torch.OutOfMemoryError(message) if isinstance(exc, torch.OutOfMemoryError) else MemoryError(message)
    ) from exc
