"""Which trainable parameters received no gradient, named and grouped: the origin bug, whatever built the adapters.

The notebook this project grew from attached LoRA modules to its projections as attributes
(``module._lora = LoRALayer(...)``), froze the base and trained for minutes: ``module.forward`` never called
them. Nothing about that is specific to LoRA or to this package's layers. After ``backward()`` every
parameter on the path from the loss has a ``.grad`` (possibly zero); one that ``requires_grad`` and still has
``grad is None`` was not on that path: its module is never called, or its output is detached (``.detach()``,
``.data``, ``torch.no_grad()``, a re-entrant checkpoint whose inputs do not require grad). So the check reads
only ``requires_grad`` and ``.grad``, and works the same for our LoRA layers, PEFT's, a user's own modules and
a model trained by transformers' ``Trainer``.

Pure functions of a model (or of a report), no torch hooks::

    loss.backward()
    report = gradient_report(model)        # between backward() and zero_grad(): the gradients exist only then
    if report.missing: ...                 # alerts.no_gradient_alert(report, step) words it as an Alert

When no trainable parameter is on the path, the loss itself has no ``grad_fn`` and ``backward()`` raises
torch's "element 0 of tensors does not require grad and does not have a grad_fn". Callers check
``loss.requires_grad`` first and raise :class:`NoGradientError` (our trainer), or recognise torch's error with
:func:`is_no_gradient_error` (an attached transformers trainer); :func:`failure_text` words the diagnosis.

Names are grouped by module with layer indices collapsed (``model.layers.3.self_attn`` ->
``model.layers.*.self_attn``), so 28 layers' worth of one mistake reads as one line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

__all__ = [
    "ADAPTERS_NEVER_CALLED",
    "TORCH_NO_GRAD_FN",
    "GradientReport",
    "NoGradientError",
    "UnusedGroup",
    "failure_text",
    "fix_steps",
    "gradient_report",
    "group_unused",
    "is_no_gradient_error",
    "looks_like_adapter",
]

ADAPTERS_NEVER_CALLED = "the adapters exist but the forward never calls them"
TORCH_NO_GRAD_FN = "does not require grad and does not have a grad_fn"
"""The part of torch's ``backward()`` error that says the loss depends on no trainable tensor."""

LOW_RANK_MAX = 64
"""A 2-D tensor looks like a LoRA factor (``r x in`` or ``out x r``) when its smaller side is at most this and
at most a quarter of the larger side (LoRA ranks are usually 4..64, layers hundreds to thousands wide)."""

_ADAPTER_WORDS = ("lora", "adapter")


@dataclass(frozen=True)
class UnusedGroup:
    """Trainable tensors without a gradient that share one module ``pattern`` (layer indices as ``*``):
    how many ``tensors`` and ``parameters``, in how many ``layers`` (distinct index tuples; 0 when the
    pattern has no index), and whether they ``look_like_adapter`` (:func:`looks_like_adapter`)."""

    pattern: str
    tensors: int
    parameters: int
    layers: int
    look_like_adapter: bool

    def describe(self) -> str:
        """``model.layers.*.self_attn.k_proj._lora: 8 tensors in 4 layers``."""
        tensors = f"{self.tensors} tensor{'s' if self.tensors != 1 else ''}"
        if self.layers == 0:
            return f"{self.pattern}: {tensors}"
        return f"{self.pattern}: {tensors} in {self.layers} layer{'s' if self.layers != 1 else ''}"


@dataclass(frozen=True)
class GradientReport:
    """Read after ``backward()``: the trainable tensors (count and parameters), the names of those whose
    ``grad`` is ``None`` (``missing``) and their :class:`UnusedGroup` s."""

    trainable: int
    trainable_parameters: int
    missing: tuple[str, ...]
    missing_parameters: int
    groups: tuple[UnusedGroup, ...]

    @property
    def none_received(self) -> bool:
        """No trainable tensor received a gradient (the loss depends on none of them)."""
        return self.trainable > 0 and len(self.missing) == self.trainable

    @property
    def adapters(self) -> bool:
        """Every group without a gradient looks like an adapter."""
        return bool(self.groups) and all(g.look_like_adapter for g in self.groups)

    def summary(self, limit: int = 6) -> str:
        """The groups, ``; ``-separated (at most ``limit``, then how many more)."""
        shown = "; ".join(g.describe() for g in self.groups[:limit])
        more = len(self.groups) - limit
        return shown + (f"; and {more} more group{'s' if more != 1 else ''}" if more > 0 else "")

    def title(self) -> str:
        """One line: what is wrong."""
        if self.none_received:
            return "No trainable parameter receives a gradient"
        return f"{len(self.missing)} of {self.trainable} trainable tensors receive no gradient"

    def evidence(self, step: int) -> str:
        """What was seen at update ``step`` (1-based), the names grouped, and what it means."""
        if self.none_received:
            seen = (
                f"At step {step} the loss depends on none of the {self.trainable} trainable tensors "
                f"({self.trainable_parameters:,} parameters), so none of them receives a gradient"
            )
        else:
            seen = (
                f"After the backward pass of step {step}, {len(self.missing)} of {self.trainable} trainable "
                f"tensors ({self.missing_parameters:,} of {self.trainable_parameters:,} parameters) have no "
                "gradient (grad is None)"
            )
        meaning = (
            "A trainable tensor without a gradient is not on the forward path to the loss (its module is never "
            "called), or its module's output is detached: training cannot change it"
        )
        if self.adapters:
            meaning += f". These look like adapters (named lora/adapter, or low-rank shapes): {ADAPTERS_NEVER_CALLED}"
        return f"{seen}: {self.summary()}. {meaning}."


class NoGradientError(RuntimeError):
    """The loss of update ``step`` depends on no trainable parameter (raised before ``backward()``, which
    would fail with torch's less helpful message); ``report`` names them."""

    def __init__(self, report: GradientReport, step: int) -> None:
        super().__init__(failure_text(report, step))
        self.report = report
        self.step = step


def is_no_gradient_error(exc: BaseException) -> bool:
    """True for :class:`NoGradientError` and for torch's error from ``backward()`` on a loss that depends on
    no tensor requiring grad ("element 0 of tensors does not require grad and does not have a grad_fn")."""
    return isinstance(exc, NoGradientError) or (
        isinstance(exc, RuntimeError) and TORCH_NO_GRAD_FN in str(exc)
    )


def fix_steps(report: GradientReport) -> list[str]:
    """What to check, most likely cause first (an adapter stored but not called, for adapter-like groups)."""
    call = (
        "Call each adapter inside its layer's forward (output = base(x) + scaling * B(A(x))): wrap the layer "
        "instead of storing the adapter as an attribute (module._lora = ... is kept, counted and trained, but "
        "module.forward never calls it); lora_widgets.apply_lora(model, LoRAConfig(...)) or "
        "peft.get_peft_model(...) wrap the layers for you. print(model) must show the wrapper where the Linear was"
    )
    detached = (
        "If the module is called, look for an output cut from the graph: .detach(), .data, torch.no_grad(), or "
        "a re-entrant gradient checkpoint whose inputs do not require grad (model.enable_input_require_grads(), "
        "or gradient_checkpointing_kwargs={'use_reentrant': False})"
    )
    frozen = (
        "Parameters meant to stay fixed: set requires_grad=False on them, so they are not counted as trained"
    )
    steps = [call, detached] if report.adapters else [detached, call]
    return [*steps, frozen]


def failure_text(report: GradientReport, step: int) -> str:
    """The message of a run ended because no trainable parameter receives a gradient."""
    if report.trainable == 0:
        return (
            f"At step {step} the model has no trainable parameters (every requires_grad is False), so the "
            "loss has no gradient and training cannot change anything. Training stopped before the first "
            "optimizer update."
        )
    return f"{report.evidence(step)} Training stopped before the first optimizer update."


# -- the report ------------------------------------------------------------------------------------------


def gradient_report(model: nn.Module) -> GradientReport:
    """Trainable parameters of ``model`` (shared ones once) and those whose ``grad`` is ``None``, grouped.
    Meaningful between ``backward()`` and ``zero_grad()``; before any backward every trainable one is missing."""
    seen: set[int] = set()
    trainable: list[tuple[str, nn.Parameter]] = []
    for name, p in model.named_parameters():
        if id(p) not in seen and p.requires_grad:
            seen.add(id(p))
            trainable.append((name, p))
    missing = [(n, p) for n, p in trainable if p.grad is None]
    return GradientReport(
        trainable=len(trainable),
        trainable_parameters=sum(p.numel() for _, p in trainable),
        missing=tuple(n for n, _ in missing),
        missing_parameters=sum(p.numel() for _, p in missing),
        groups=tuple(group_unused(model, missing)),
    )


def _owner_path(model: nn.Module, name: str) -> str:
    """The path of the module holding parameter ``name``, climbing out of dict containers (PEFT keeps each
    factor in a ``ModuleDict`` keyed by adapter name: ``v_proj.lora_A.default.weight`` -> ``v_proj.lora_A``)."""
    path = name.rpartition(".")[0]
    while path:
        parent = path.rpartition(".")[0]
        holder = model.get_submodule(parent) if parent else model
        if not isinstance(holder, nn.ModuleDict | nn.ParameterDict):
            break
        path = parent
    owner = model.get_submodule(path) if path else model
    if isinstance(owner, nn.ParameterDict):  # a ParameterDict keyed by adapter name holds the tensor
        path = path.rpartition(".")[0]
    return path or "(model)"


_INDEX = re.compile(r"(?<![^._])\d+(?![^._])")  # a number between dots or underscores: layers.3, layer_3


def _pattern(path: str) -> tuple[str, tuple[str, ...]]:
    """``model.layers.3.self_attn`` -> (``model.layers.*.self_attn``, ("3",)); also ``h_3`` -> ``h_*``."""
    return _INDEX.sub("*", path), tuple(_INDEX.findall(path))


def looks_like_adapter(pattern: str, shapes: Iterable[tuple[int, ...]]) -> bool:
    """Named like one (``lora``/``adapter`` in the path, any case), or every tensor a low-rank 2-D factor
    (``r x in`` or ``out x r``, :data:`LOW_RANK_MAX`)."""
    if any(word in pattern.lower() for word in _ADAPTER_WORDS):
        return True
    shapes = list(shapes)
    return bool(shapes) and all(
        len(s) == 2 and min(s) <= LOW_RANK_MAX and 4 * min(s) <= max(s) for s in shapes
    )


@dataclass
class _Acc:
    tensors: int = 0
    parameters: int = 0
    indices: set[tuple[str, ...]] = field(default_factory=set)  # layer-index tuples seen
    shapes: list[tuple[int, ...]] = field(default_factory=list)


def group_unused(model: nn.Module, missing: Iterable[tuple[str, nn.Parameter]]) -> list[UnusedGroup]:
    """Group ``(name, parameter)`` pairs by their module's pattern (layer indices as ``*``), in first-seen
    order. Sibling groups with the same layers (``v_proj.lora_A`` and ``v_proj.lora_B``) are merged into
    ``v_proj.{lora_A,lora_B}``."""
    acc: dict[str, _Acc] = {}
    for name, p in missing:
        pattern, indices = _pattern(_owner_path(model, name))
        a = acc.setdefault(pattern, _Acc())
        a.tensors += 1
        a.parameters += p.numel()
        a.indices.add(indices)
        a.shapes.append(tuple(p.shape))
    siblings: dict[tuple[str, frozenset[tuple[str, ...]]], list[str]] = {}
    for pattern, a in acc.items():
        parent = pattern.rpartition(".")[0]
        key = (parent, frozenset(a.indices)) if parent else (pattern, frozenset())
        siblings.setdefault(key, []).append(pattern)
    groups = []
    for (parent, _), patterns in siblings.items():
        members = [acc[p] for p in patterns]
        if len(patterns) == 1:
            pattern = patterns[0]
        else:
            pattern = f"{parent}.{{{','.join(p.rpartition('.')[2] for p in patterns)}}}"
        layers: set[tuple[str, ...]] = set().union(*(m.indices for m in members))
        shapes = [s for m in members for s in m.shapes]
        groups.append(
            UnusedGroup(
                pattern=pattern,
                tensors=sum(m.tensors for m in members),
                parameters=sum(m.parameters for m in members),
                layers=len({i for i in layers if i}),
                look_like_adapter=looks_like_adapter(pattern, shapes),
            )
        )
    return groups
