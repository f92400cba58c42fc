"""MemoryPlanner: "will this fit on my GPU?" answered interactively, before training.

An anywidget holds the controls (model, method, rank, batch size, sequence length, precision, gradient
checkpointing) and the fit table for common GPUs; a bqplot figure (``planner.figure``) shows the memory of
each phase of a training step as stacked bars, next to the textbook sum. Every control change recomputes
:func:`lora_widgets.memory.fit.estimate_memory` in Python and updates the bars in place.

``display(MemoryPlanner())`` (or leaving it last in a cell) shows the controls and the figure together
(``planner.widget``, an ``ipywidgets.VBox``); put ``planner.widget`` into your own layouts.
"""

from __future__ import annotations

import pathlib
from typing import Any

import anywidget
import ipywidgets
import numpy as np
import traitlets
from bqplot import Bars, Figure, LinearScale, OrdinalScale

from lora_widgets.lora.layers import LoRAConfig
from lora_widgets.memory.arch import lookup_known
from lora_widgets.memory.fit import GPUS, MemoryEstimate, estimate_memory, known_models
from lora_widgets.widget.axes import category_axis, value_axis
from lora_widgets.widget.view import publish_view

__all__ = ["MemoryPlanner", "PlannerValueError"]

_STATIC = pathlib.Path(__file__).parent / "static"
ESM_PATH = _STATIC / "planner.js"  # anywidget reads (and in development, watches) these files
CSS_PATH = _STATIC / "planner.css"
GiB = 1024**3

#: Stacked components, bottom to top, and their colours.
COMPONENTS: tuple[str, ...] = (
    "frozen weights",
    "trainable weights",
    "optimizer states",
    "gradients",
    "activations",
    "temporaries",
    "overhead",
)
_COLORS = ["#9e9e9e", "#1f77b4", "#9467bd", "#ff7f0e", "#2ca02c", "#d62728", "#8c564b"]
BARS: tuple[str, ...] = ("forward", "backward", "optimizer step", "naive sum")
_COMPUTE = {
    "float32": "float32",
    "bfloat16": "bfloat16",
    "float16": "float16",
    "mixed-bf16": "bfloat16",
    "mixed-fp16": "float16",
}

_INPUTS = (
    "model_name",
    "method",
    "rank",
    "targets",
    "batch_size",
    "seq_len",
    "precision",
    "gradient_checkpointing",
)


class PlannerValueError(traitlets.TraitError, ValueError):
    """A control was set to a value it cannot take (a ``ValueError`` and a traitlets ``TraitError``)."""


class MemoryPlanner(anywidget.AnyWidget):
    """Interactive memory planner: controls, a per-phase stacked bar chart and a GPU fit table.

    Args:
        model: initial model: a known name (see :func:`lora_widgets.memory.fit.known_models`), a transformers
            config, or a transformers model (it is added to the picker as its ``name_or_path``).
        lora: initial LoRA settings (rank and target modules); ``None`` keeps the defaults.
        **traits: initial values of the controls (``method``, ``rank``, ``batch_size``, ...). Unknown names
            raise ``TypeError``.
    """

    _esm = ESM_PATH
    _css = CSS_PATH

    models = traitlets.List(
        traitlets.Unicode(),
        help="Model names offered in the picker: any custom model first, then the known ones.",
    ).tag(sync=True)
    model_name = traitlets.Unicode("SmolLM2-135M", help="The selected model (one of `models`).").tag(
        sync=True
    )
    method = traitlets.Enum(
        ["full", "lora", "qlora"],
        default_value="lora",
        help="full: full fine-tuning; lora: LoRA on a frozen base; qlora: LoRA on a 4-bit NF4 base.",
    ).tag(sync=True)
    rank = traitlets.Int(16, help="LoRA rank r (1-1024); ignored for full fine-tuning.").tag(sync=True)
    targets = traitlets.Enum(
        ["default", "all-linear"],
        default_value="default",
        help="LoRA target modules: the architecture's default (q and v projections) or every Linear layer.",
    ).tag(sync=True)
    batch_size = traitlets.Int(8, help="Sequences per optimizer step (1-4096).").tag(sync=True)
    seq_len = traitlets.Int(512, help="Tokens per sequence (1-1,048,576).").tag(sync=True)
    precision = traitlets.Enum(
        ["float32", "bfloat16", "float16", "mixed-bf16", "mixed-fp16"],
        default_value="bfloat16",
        help=(
            "float32/bfloat16/float16: pure training in that dtype; mixed-bf16/mixed-fp16: fp32 weights, "
            "gradients and optimizer state with torch.autocast computing in bf16/fp16."
        ),
    ).tag(sync=True)
    gradient_checkpointing = traitlets.Bool(
        False, help="Recompute each block in backward, keeping only block inputs."
    ).tag(sync=True)
    estimate = traitlets.Dict(
        help="The current estimate (MemoryEstimate.to_dict(), bytes); read-only, computed in Python."
    ).tag(sync=True)
    gpus = traitlets.List(
        traitlets.Dict(),
        help="Fit table: one dict per GPU with name, capacity, required (bytes) and fits (bool); read-only.",
    ).tag(sync=True)
    error = traitlets.Unicode("", help="Why the last estimate failed, or '' (read-only).").tag(sync=True)
    input_names = traitlets.List(
        list(_INPUTS), help="The traits the controls set, in the one list planner.js syncs from (read-only)."
    ).tag(sync=True)

    def __init__(self, model: Any = None, lora: LoRAConfig | None = None, **traits: Any) -> None:
        unknown = sorted(set(traits) - set(_INPUTS))
        if unknown:
            raise TypeError(
                f"MemoryPlanner got unexpected keyword argument(s) {unknown}; valid: model, lora, {', '.join(_INPUTS)}"
            )
        if lora is not None and not isinstance(lora, LoRAConfig):
            raise TypeError(f"lora must be a LoRAConfig or None, got {type(lora).__name__}")
        self._custom: dict[str, Any] = {}
        self._lora_template = lora
        names = known_models()
        initial_model = traits.pop("model_name", None)
        if model is not None:
            known = lookup_known(model) if isinstance(model, str) else None
            if known is not None:  # a known name or its hub id
                initial_model = known
            elif isinstance(model, str):  # a hub id or local path: resolved by config when estimated
                self._custom[model] = model
                names = [model, *names]
                initial_model = model
            else:
                label = self._custom_label(model)
                # a model is planned from its architecture: the method control decides what trains
                self._custom[label] = getattr(model, "config", model)
                names = [label, *names]
                initial_model = label
        if lora is not None:
            traits.setdefault("rank", lora.r)
            if lora.target_modules == "all-linear":
                traits.setdefault("targets", "all-linear")
        self._ready = False
        super().__init__(models=names, model_name=initial_model or "SmolLM2-135M", **traits)
        self._scale_x = OrdinalScale(domain=list(BARS))
        self._scale_y = LinearScale(min=0.0)
        self._bars = Bars(
            x=list(BARS),
            y=np.zeros((len(COMPONENTS), len(BARS))),
            scales={"x": self._scale_x, "y": self._scale_y},
            type="stacked",
            colors=_COLORS,
            labels=list(COMPONENTS),
            display_legend=True,
            tooltip=None,
        )
        self.figure = Figure(
            marks=[self._bars],
            axes=[
                category_axis(self._scale_x, label="phase of one training step"),
                value_axis(self._scale_y, label="GiB", tick_format=".1f"),
            ],
            title="",
            legend_location="top-right",
            fig_margin={"top": 50, "bottom": 50, "left": 60, "right": 20},
            layout=ipywidgets.Layout(width="100%", height="420px"),
        )
        self.widget = ipywidgets.VBox([self, self.figure])
        self._ready = True
        self._recompute()

    @staticmethod
    def _custom_label(model: Any) -> str:
        config = getattr(model, "config", model)
        name = str(getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", "") or "")
        if not name:
            name = f"custom {getattr(config, 'model_type', type(model).__name__)}"
        return name if name not in known_models() else f"{name} (custom)"

    # ---- display: controls and figure together -----------------------------------------------------
    def _ipython_display_(self, **kwargs: Any) -> None:
        """Displaying the planner shows the VBox of controls and figure.

        ``_ipython_display_`` (which IPython asks before any ``_repr_*_``) rather than ``_repr_mimebundle_``:
        ipywidgets 7 (Colab's) has no ``_repr_mimebundle_``; :func:`~lora_widgets.widget.view.publish_view`
        uses whichever protocol the installed ipywidgets has.
        """
        publish_view(self.widget, **kwargs)

    # ---- validation ---------------------------------------------------------------------------------
    @traitlets.validate("model_name")
    def _check_model(self, proposal: dict[str, Any]) -> str:
        value = str(proposal["value"])
        if value not in self.models:
            raise PlannerValueError(f"model_name={value!r} is not one of the planner's models: {self.models}")
        return value

    @staticmethod
    def _check_range(name: str, value: int, low: int, high: int) -> int:
        if isinstance(value, bool) or not low <= int(value) <= high:
            raise PlannerValueError(f"{name}={value!r} is out of range; use an integer in [{low}, {high}]")
        return int(value)

    @traitlets.validate("rank")
    def _check_rank(self, proposal: dict[str, Any]) -> int:
        return self._check_range("rank", proposal["value"], 1, 1024)

    @traitlets.validate("batch_size")
    def _check_batch(self, proposal: dict[str, Any]) -> int:
        return self._check_range("batch_size", proposal["value"], 1, 4096)

    @traitlets.validate("seq_len")
    def _check_seq(self, proposal: dict[str, Any]) -> int:
        return self._check_range("seq_len", proposal["value"], 1, 1 << 20)

    # ---- recomputation ------------------------------------------------------------------------------
    @traitlets.observe(*_INPUTS)
    def _on_input(self, change: dict[str, Any]) -> None:
        if self._ready:
            self._recompute()

    def current_lora(self) -> LoRAConfig | None:
        """The LoRAConfig the controls describe (None for full fine-tuning)."""
        if self.method == "full":
            return None
        base = self._lora_template.to_dict() if self._lora_template is not None else {}
        base["r"] = self.rank
        base["alpha"] = base.get("alpha", 2.0 * self.rank)
        if self.targets == "all-linear":
            base["target_modules"] = "all-linear"
        elif self._lora_template is None or self._lora_template.target_modules == "all-linear":
            base["target_modules"] = None
        return LoRAConfig.from_dict(base)

    def current_estimate(self) -> MemoryEstimate:
        """Run the estimator for the current controls."""
        model = self._custom.get(self.model_name, self.model_name)
        return estimate_memory(
            model,
            lora=self.current_lora(),
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            dtype=_COMPUTE[self.precision],
            weight_dtype="float32" if self.precision.startswith("mixed") else None,
            gradient_checkpointing=self.gradient_checkpointing,
            base_quantization="4bit" if self.method == "qlora" else None,
        )

    def _recompute(self) -> None:
        try:
            est = self.current_estimate()
        except (ValueError, TypeError) as exc:
            self.error = str(exc)
            return
        self.error = ""
        self.estimate = est.to_dict()
        self.gpus = [
            {"name": name, "capacity": cap, "required": est.required_bytes(cuda=True), "fits": est.fits(cap)}
            for name, cap in GPUS.items()
        ]
        columns = [est.phase_breakdown[p] for p in ("forward", "backward", "optimizer")]
        columns.append(
            {
                "frozen weights": est.frozen_weights,
                "trainable weights": est.trainable_weights,
                "optimizer states": est.optimizer_states,
                "gradients": est.gradients,
                "activations": est.activations,
                "temporaries": 0,
                "overhead": est.overhead,
            }
        )
        data = np.array([[col[c] / GiB for col in columns] for c in COMPONENTS])  # [components, bars]
        with self._bars.hold_sync():
            self._bars.y = data
        # headroom above the tallest bar keeps the legend (top right) off the bars
        self._scale_y.max = float(data.sum(axis=0).max()) * 1.9 or 1.0
        self.figure.title = (
            f"{self.model_name}: peak {est.total / GiB:.2f} GiB in {est.peak_phase} "
            f"(textbook sum {est.naive_total / GiB:.2f} GiB)"
        )
