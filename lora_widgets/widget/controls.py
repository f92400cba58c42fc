"""The dashboard's controls, declared once; the panel's traits, the front end and both config mappings come from here.

Each :class:`Control` in :data:`CONTROLS` names a field of :class:`~lora_widgets.lora.layers.LoRAConfig` or
:class:`~lora_widgets.training.config.TrainConfig` and says how to show it (label, kind, input hints, help).
From that one table:

* :func:`traits` builds one synced trait per control for ``DashboardPanel`` (type, default and help);
* :func:`specs` is what ``static/dashboard.js`` renders (the panel's ``control_specs`` trait): the JS holds no
  list of controls and no choices, so schedules and precisions are the tuples the configs validate against
  (:data:`~lora_widgets.training.schedules.SCHEDULES`, :data:`~lora_widgets.training.config.PRECISIONS`);
* :func:`values_from_configs` and :func:`to_configs` map configs to control values and back;
* :func:`validate_settings` checks the values by constructing the configs, so every rule lives in the
  config classes and the panel shows their ``ValueError`` message word for word. Only what a config cannot
  know is checked against the run's context: the device (``TrainConfig.check_device``) and the number of
  training blocks (``TrainConfig.check_data``); the LoRATrainer applies the same two methods.

The ``min``/``max``/``step`` of a control are hints for the browser's number input (its spinner), not rules:
a value outside them still reaches the config, which decides.

How to add a control
--------------------
1. Make it a field of ``LoRAConfig`` (``lora.py``) or ``TrainConfig`` (``train_config.py``) whose
   ``__post_init__`` rejects bad values with a ``ValueError`` naming the field, the value and the fix. Write
   no rule here: the panel shows the config's message.
2. Add one :class:`Control` to :data:`CONTROLS` below, where it should appear in its group: ``name`` (the
   trait, the key of ``values`` and ``errors``; use the field's name unless the panel already has that
   trait), ``label``, ``kind`` (``"int"``, ``"float"``, ``"text"`` or ``"select"``), ``config`` and
   ``field``, ``help`` (one sentence: it becomes the trait's help and the label's tooltip), input hints
   (``min``/``max``/``step`` for numbers; ``choices`` for a select, taken from the constant the config
   validates against, never copied; suggestions for a text). If the input shows the value differently from
   the config (``max_steps`` shows ``None`` as ``0``), give ``to_config`` and ``from_config``.
3. That is all the code: ``DashboardPanel`` gains the trait, ``dashboard.js`` renders the input
   (``<input name=...>`` or ``<select name=...>`` inside ``.lw-dash``), ``LoRADashboard`` maps it both ways.
4. Add an invalid value for it to ``INVALID`` in ``tests/test_controls.py`` (a test fails until you do);
   it checks that the panel shows the config's own message for that value.
5. Work on the front end with ``ANYWIDGET_HMR=1`` if the new kind of input needs styling
   (``static/dashboard.css``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import traitlets as t

from lora_widgets.lora.layers import LoRAConfig
from lora_widgets.quantization import BASE_PRECISIONS, quantization_config
from lora_widgets.training.config import PRECISIONS, TrainConfig
from lora_widgets.training.early_stopping import EarlyStopping
from lora_widgets.training.schedules import SCHEDULES

__all__ = [
    "CONTROLS",
    "CONTROL_NAMES",
    "LORA_CONTROL_NAMES",
    "TARGET_PRESETS",
    "Control",
    "config_fields",
    "specs",
    "targets_from_text",
    "targets_to_text",
    "to_configs",
    "traits",
    "validate_settings",
    "values_from_configs",
]

Kind = Literal["int", "float", "text", "select"]
_KINDS: tuple[str, ...] = ("int", "float", "text", "select")
_GROUPS: dict[type, str] = {LoRAConfig: "LoRA", TrainConfig: "Training"}

TARGET_PRESETS: tuple[str, ...] = ("", "q_proj,v_proj", "q_proj,k_proj,v_proj,o_proj", "all-linear")
"""Suggestions for the target-modules box: the architecture's default (empty), the attention projections of
Llama-family models (q,v as in the LoRA paper, sec. 7.1; all four) and every linear layer."""


def targets_to_text(targets: Any) -> str:
    """``LoRAConfig.target_modules`` as the text box shows it: ``""`` for the default, names joined by commas."""
    if targets is None:
        return ""
    if isinstance(targets, str):
        return targets
    return ",".join(str(x) for x in targets)


def targets_from_text(text: str) -> str | list[str] | None:
    """Inverse of :func:`targets_to_text`: ``""``/``"default"`` -> None, one regular expression, or names."""
    text = text.strip()
    if not text or text == "default":
        return None
    if text == "all-linear":
        return "all-linear"
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if len(parts) == 1 and any(c in parts[0] for c in "*()[]|\\^$+?"):
        return parts[0]  # a regular expression, full-matched against module paths
    return parts


def _same(value: Any) -> Any:
    return value


def _steps_to_config(value: Any) -> Any:
    return None if value == 0 else value  # 0 in the box means "run `epochs` passes"


def _steps_from_config(value: Any) -> Any:
    return 0 if value is None else value


def _base_shown(value: Any) -> Any:
    return "16-bit" if value is None else value  # None: the model as given (the dashboard names its base)


def _patience_to_config(value: Any) -> Any:
    return None if value == 0 else EarlyStopping(patience=value)  # 0 in the box: no early stopping


def _patience_from_config(value: Any) -> Any:
    return 0 if value is None or value.patience is None else value.patience


@dataclass(frozen=True)
class Control:
    """One control of the dashboard: the config field it sets and how the panel shows it."""

    name: str
    label: str
    kind: Kind
    config: type[LoRAConfig] | type[TrainConfig]
    field: str
    help: str
    min: float | None = None
    max: float | None = None
    step: float | str | None = None
    choices: tuple[str, ...] = ()
    placeholder: str = ""
    to_config: Callable[[Any], Any] = _same
    from_config: Callable[[Any], Any] = _same

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"Control {self.name!r}: kind={self.kind!r} must be one of {list(_KINDS)}")
        if self.field not in {f.name for f in dataclasses.fields(self.config)}:
            raise ValueError(f"Control {self.name!r}: {self.config.__name__} has no field {self.field!r}")
        if self.kind == "select" and not self.choices:
            raise ValueError(f"Control {self.name!r}: a select needs choices")

    def display(self, config_value: Any) -> Any:
        """The control's value for a config's field value (typed as the trait expects)."""
        value = self.from_config(config_value)
        if self.kind == "int":
            return int(value)
        return float(value) if self.kind == "float" else str(value)

    def trait(self) -> t.TraitType[Any, Any]:
        """A new synced trait, its default the config class's default."""
        default = self.display(getattr(self.config(), self.field))
        kinds = {"int": t.Int, "float": t.Float, "text": t.Unicode, "select": t.Unicode}
        return kinds[self.kind](default, help=self.help).tag(sync=True)

    def spec(self) -> dict[str, Any]:
        """The JSON the front end renders this control from (keys with no value are left out)."""
        spec: dict[str, Any] = {"name": self.name, "label": self.label, "kind": self.kind,
                                "group": _GROUPS[self.config], "help": self.help}  # fmt: skip
        hints = {"min": self.min, "max": self.max, "step": self.step, "placeholder": self.placeholder or None}
        spec.update({k: v for k, v in hints.items() if v is not None})
        if self.choices:
            spec["choices"] = list(self.choices)
        return spec


# fmt: off
CONTROLS: tuple[Control, ...] = (
    Control("rank", "rank r", "int", LoRAConfig, "r", min=1, step=1,
            help="LoRA rank r: the inner dimension of B·A; trainable parameters grow in proportion to it."),
    Control("alpha", "alpha", "float", LoRAConfig, "alpha", min=0, step="any",
            help="LoRA alpha: the update B·A is scaled by alpha / r (alpha / sqrt(r) with rsLoRA)."),
    Control("dropout", "dropout", "float", LoRAConfig, "dropout", min=0, max=0.99, step=0.05,
            help="Dropout on the LoRA branch's input (0 disables it)."),
    Control("target_modules", "target modules", "text", LoRAConfig, "target_modules",
            choices=TARGET_PRESETS, placeholder="default", to_config=targets_from_text,
            from_config=targets_to_text,
            help="Modules to adapt: empty for the architecture's default, 'all-linear', a comma-separated "
                 "list of module-name suffixes such as 'q_proj,v_proj', or one regular expression."),
    Control("learning_rate", "learning rate", "float", TrainConfig, "learning_rate", min=0, max=1,
            step="any", help="Peak AdamW learning rate, reached after the warm-up."),
    Control("schedule", "schedule", "select", TrainConfig, "schedule", choices=SCHEDULES,
            help="How the learning rate decays after the warm-up."),
    Control("warmup_steps", "warm-up steps", "int", TrainConfig, "warmup_steps", min=0, step=1,
            help="Optimizer steps over which the learning rate rises linearly from 0."),
    Control("batch_size", "batch size", "int", TrainConfig, "batch_size", min=1, step=1,
            help="Sequences per micro-batch."),
    Control("grad_accum_steps", "grad. accumulation", "int", TrainConfig, "grad_accum_steps", min=1,
            step=1, help="Micro-batches whose gradients are summed before each optimizer step."),
    Control("max_steps", "max steps (0 = epochs)", "int", TrainConfig, "max_steps", min=0, step=1,
            to_config=_steps_to_config, from_config=_steps_from_config,
            help="Optimizer steps to run; 0 runs `epochs` full passes over the data instead."),
    Control("epochs", "epochs", "int", TrainConfig, "epochs", min=1, step=1,
            help="Passes over the training data when max steps is 0."),
    Control("precision", "precision", "select", TrainConfig, "precision", choices=PRECISIONS,
            help="fp32, or bf16/fp16 autocast (fp16 needs a CUDA GPU); auto: bf16, fp16 on a T4, fp32 on a CPU."),
    Control("base", "base", "select", TrainConfig, "base", choices=BASE_PRECISIONS, from_config=_base_shown,
            help="The frozen base's weights: 16-bit, or quantized to 8 or 4 bits (QLoRA: NF4, needs bitsandbytes); "
                 "the dashboard loads the model again at that precision."),
    Control("early_stopping", "early-stop patience (0 = off)", "int", TrainConfig, "early_stopping", min=0,
            step=1, to_config=_patience_to_config, from_config=_patience_from_config,
            help="Stop when the validation loss has not improved in this many evaluations, or when the "
                 "loss diverges (doubles or turns NaN); the best evaluation's adapter is kept. 0: off."),
    Control("seed", "seed", "int", TrainConfig, "seed", min=0, step=1,
            help="Seeds the adapters' initialisation and the data order."),
)
# fmt: on

CONTROL_NAMES: tuple[str, ...] = tuple(c.name for c in CONTROLS)
LORA_CONTROL_NAMES: tuple[str, ...] = tuple(c.name for c in CONTROLS if c.config is LoRAConfig)
"""The controls that change the adapter (the planned-parameters readout follows them)."""


def config_fields(config: type) -> tuple[str, ...]:
    """The fields of ``config`` (``LoRAConfig`` or ``TrainConfig``) that a control sets."""
    return tuple(c.field for c in CONTROLS if c.config is config)


def traits() -> dict[str, t.TraitType[Any, Any]]:
    """One new synced trait per control, by name (for the class body of ``DashboardPanel``)."""
    return {c.name: c.trait() for c in CONTROLS}


def specs() -> list[dict[str, Any]]:
    """What ``dashboard.js`` renders, in order: one JSON object per control (see ``ControlSpec`` in the .d.ts)."""
    return [c.spec() for c in CONTROLS]


def _base(control: Control, lora: Any, train: Any) -> Any:
    return lora if control.config is LoRAConfig else train


def values_from_configs(lora: LoRAConfig, train: TrainConfig) -> dict[str, Any]:
    """The control values that show ``lora`` and ``train``, by control name."""
    return {c.name: c.display(getattr(_base(c, lora, train), c.field)) for c in CONTROLS}


def _config_value(control: Control, value: Any, base: Any) -> Any:
    """The field value for a control value; an unchanged control keeps the config's own value (a tuple of
    targets, a regular expression with commas, an int alpha) rather than its text round trip."""
    current = getattr(base, control.field)
    return current if control.display(current) == value else control.to_config(value)


def _changes(config: type, values: Mapping[str, Any], base: Any) -> dict[str, Any]:
    return {c.field: _config_value(c, values[c.name], base) for c in CONTROLS if c.config is config}


def to_configs(
    values: Mapping[str, Any], lora: LoRAConfig, train: TrainConfig
) -> tuple[LoRAConfig, TrainConfig]:
    """``(lora, train)`` with the fields the controls set replaced by ``values`` (validated by the configs).

    Fields without a control (``use_rslora``, ``eval_every``, ``output_dir``, ...) keep their values.
    Raises the configs' ``ValueError`` for a bad value.
    """
    return (
        dataclasses.replace(lora, **_changes(LoRAConfig, values, lora)),
        dataclasses.replace(train, **_changes(TrainConfig, values, train)),
    )


def _checked(config: type[Any], base: Any, changes: dict[str, Any]) -> Any:
    """``config``'s rules applied to ``changes``: on ``base`` when it is a ``config``, else on the defaults
    (``base`` may be a stand-in with the same fields, such as a test double, that checks nothing)."""
    return dataclasses.replace(base if isinstance(base, config) else config(), **changes)


def validate_settings(
    values: Mapping[str, Any],
    device_type: str = "cpu",
    n_train_blocks: int | None = None,
    *,
    lora: LoRAConfig | None = None,
    train: TrainConfig | None = None,
) -> dict[str, str]:
    """Check control values before Train is pressed; return ``{control name: the config's message}``.

    Each control is checked alone first, so every bad one is flagged at once with the message its config
    raises (``str(ValueError)``). When all pass: rules across fields, and the given configs' own rules (a
    subclass may add some), go under ``"settings"``; then the run's context, which no config can know:
    ``TrainConfig.check_device`` (fp16 needs a CUDA GPU) under ``"precision"`` and
    ``TrainConfig.check_data`` (one optimizer step must fit in the training blocks) under ``"batch_size"``, and
    whether the base can be quantized here (bitsandbytes installed, the device supported) under ``"base"``.

    Args:
        values: control values by name; missing ones are taken from ``lora`` and ``train``; an unknown
            name raises ``ValueError``.
        device_type: ``"cpu"``, ``"cuda"`` or ``"mps"``: the device the run will use.
        n_train_blocks: training sequences available; ``None`` skips that check.
        lora, train: the configs the controls edit (default: ``LoRAConfig()``, ``TrainConfig()``).
    """
    unknown = sorted(set(values) - set(CONTROL_NAMES))
    if unknown:
        raise ValueError(
            f"validate_settings: unknown control(s) {unknown}; the controls are {list(CONTROL_NAMES)}"
        )
    lora = LoRAConfig() if lora is None else lora
    train = TrainConfig() if train is None else train
    values = {**values_from_configs(lora, train), **values}
    errors: dict[str, str] = {}
    for c in CONTROLS:
        base = _base(c, lora, train)
        try:
            _checked(c.config, base, {c.field: _config_value(c, values[c.name], base)})
        except (ValueError, TypeError) as exc:
            errors[c.name] = str(exc)
    if errors:
        return errors
    try:
        _checked(LoRAConfig, lora, _changes(LoRAConfig, values, lora))
        checked: TrainConfig = _checked(TrainConfig, train, _changes(TrainConfig, values, train))
        to_configs(values, lora, train)
    except (ValueError, TypeError) as exc:
        return {"settings": str(exc)}
    try:
        checked.check_device(device_type)
    except ValueError as exc:
        errors["precision"] = str(exc)
    try:  # a quantized base on this device: bitsandbytes installed and able to use it
        quantization_config(checked.base or "16-bit", device_type)
    except (ValueError, ImportError) as exc:
        errors["base"] = str(exc)
    if n_train_blocks is not None:
        try:
            checked.check_data(n_train_blocks)
        except ValueError as exc:
            errors["batch_size"] = str(exc)
    return errors
