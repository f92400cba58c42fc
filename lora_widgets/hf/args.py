"""What a Hugging Face ``TrainingArguments`` (or TRL ``SFTConfig``) means for the dashboard.

One job: read an existing ``transformers.Trainer`` / ``trl.SFTTrainer`` without changing it, and answer the
questions the view and the failure callouts ask:

- :func:`describe_settings`: the settings to show read-only (an attached trainer owns its settings);
- :func:`logging_advice`: whether ``logging_steps`` would leave the loss chart nearly empty, and a value
  that would not (``logging_steps`` defaults to 500, so a 300-step run logs nothing: transformers#8910);
- :func:`logged_extras`, :func:`tokens_seen`: what a logged dict carries besides the loss, and the tokens trained;
- :func:`failure_diagnosis`: an exception from ``train()`` (out of memory, including the CPU allocator's
  "can't allocate memory"; anything else) as the same :class:`~lora_widgets.training.diagnosis.Diagnosis` our own
  trainer reports, worded with ``TrainingArguments`` names (``per_device_train_batch_size``, not
  ``batch_size``).

The diagnosis functions in :mod:`lora_widgets.training.diagnosis` take a :class:`TrainConfig`; :func:`train_config_view`
builds the equivalent one from ``TrainingArguments`` so the wording and the suggestions stay in one place.
Nothing here imports transformers: the trainer is duck-typed (``args``, ``model``, ``train_dataset``).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from lora_widgets.events.types import AlertRaised
from lora_widgets.health.gradient_check import gradient_report, is_no_gradient_error
from lora_widgets.health.notices import no_adapter_notice, warmup_notice
from lora_widgets.lora.layers import LoRAConfig, count_parameters, has_lora
from lora_widgets.training.config import TrainConfig
from lora_widgets.training.diagnosis import (
    Diagnosis,
    error_diagnosis,
    is_out_of_memory,
    nan_diagnosis,
    no_gradient_diagnosis,
    oom_diagnosis,
)

__all__ = [
    "MIN_CHART_POINTS",
    "STEP_KEYS",
    "describe_settings",
    "expected_max_steps",
    "failure_diagnosis",
    "hf_schedule",
    "is_finite",
    "logged_extras",
    "logging_advice",
    "nan_failure",
    "peft_lora_config",
    "precision_of",
    "sample_seq_len",
    "setting_notices",
    "settings_of",
    "strategy_of",
    "tokens_seen",
    "train_config_view",
]

logger = logging.getLogger(__name__)

MIN_CHART_POINTS = 20
"""Fewer logged losses than this over a run and the loss chart looks empty: :func:`logging_advice` warns."""

STEP_KEYS = frozenset({"loss", "learning_rate", "grad_norm", "epoch", "step"})
"""Logged keys that map onto StepMetrics / EvalMetrics fields (or are bookkeeping), not carried in ``extra``."""


def is_finite(x: Any) -> bool:
    """A logged number that is neither NaN nor infinite."""
    return isinstance(x, int | float) and math.isfinite(x)


def logged_extras(logs: Mapping[str, Any], skip: frozenset[str]) -> dict[str, float]:
    """Numeric logged values not already in a field; the trainer's own timing figures (``*_runtime``,
    ``*_per_second``, ``total_flos``) are left out: they describe the logging, not the model."""
    return {
        k: float(v)
        for k, v in logs.items()
        if k not in skip
        and isinstance(v, int | float)
        and not k.endswith(("_runtime", "_per_second"))
        and k != "total_flos"
    }


def tokens_seen(state: Any, logs: Mapping[str, Any]) -> float | None:
    """Tokens trained so far, when the trainer counts them (``state.num_input_tokens_seen``, or TRL's logged
    ``num_tokens`` of non-padding tokens); else ``None``."""
    seen = getattr(state, "num_input_tokens_seen", 0) or 0
    if seen > 0:
        return float(seen)
    trl = logs.get("num_tokens")
    return float(trl) if isinstance(trl, int | float) else None


# TrainingArguments / SFTConfig fields shown read-only, in this order (those absent are skipped).
_SHOWN = (
    "output_dir",
    "learning_rate",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "warmup_ratio",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "weight_decay",
    "max_grad_norm",
    "optim",
    "gradient_checkpointing",
    "logging_strategy",
    "logging_steps",
    "eval_strategy",
    "eval_steps",
    "save_strategy",
    "save_steps",
    "seed",
    # TRL SFTConfig
    "max_length",
    "packing",
    "completion_only_loss",
    "assistant_only_loss",
)

# transformers' lr_scheduler_type -> (the shape in lora_widgets.training.schedules, whether it is the same
# function). The exact ones implement get_{linear,cosine,constant}_schedule_with_warmup as ours do, and
# "constant" there takes no warm-up; the approximate ones are close enough for a diagnosis' learning rate,
# never for drawing a preview. The one table of scheduler names (the dashboard's preview reads it too).
HF_SCHEDULES: dict[str, tuple[str, bool]] = {
    "linear": ("linear", True),
    "cosine": ("cosine", True),
    "constant": ("constant", True),
    "constant_with_warmup": ("constant", True),
    "cosine_with_restarts": ("cosine", False),
    "cosine_with_min_lr": ("cosine", False),
}

# Our TrainConfig names -> TrainingArguments names, for diagnosis text (whole words only).
_HF_WORDS = (
    (r"\bbatch_size\b", "per_device_train_batch_size"),
    (r"\bgrad_accum_steps\b", "gradient_accumulation_steps"),
    (r"\blog_every\b", "logging_steps"),
    (r"precision='(bf16|fp16)'", r"\1=True"),
    (r"'fp16' on GPUs", "fp16=True on GPUs"),
    (r"lora_widgets\.training\b", "lora_widgets.hf.run"),
)


def _plain(value: Any) -> Any:
    """A JSON-safe, readable form of a settings value (enums by their value, sets as sorted lists, dicts with
    string keys)."""
    value = getattr(value, "value", value)  # transformers' str enums (IntervalStrategy, SchedulerType)
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [_plain(v) for v in value]
        return sorted(items, key=str) if isinstance(value, set | frozenset) else items
    return str(value)


def precision_of(args: Any) -> str:
    """``"bf16"``, ``"fp16"`` or ``"fp32"``: the mixed precision ``TrainingArguments`` asks for."""
    if getattr(args, "bf16", False):
        return "bf16"
    if getattr(args, "fp16", False):
        return "fp16"
    return "fp32"


def peft_lora_config(model: Any) -> LoRAConfig | None:
    """The active PEFT LoRA adapter's settings as a :class:`LoRAConfig`, or ``None`` (not a PEFT LoRA model,
    or settings our config cannot express, such as per-layer rank patterns)."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        return None
    name = getattr(model, "active_adapter", None)
    cfg = configs.get(name) if isinstance(name, str) else next(iter(configs.values()))
    if cfg is None or not hasattr(cfg, "r") or not hasattr(cfg, "lora_alpha"):
        return None
    targets = getattr(cfg, "target_modules", None)
    if isinstance(targets, set | frozenset | list | tuple):
        targets = tuple(sorted(str(t) for t in targets))
    try:
        return LoRAConfig(
            r=int(cfg.r),
            alpha=float(cfg.lora_alpha),
            dropout=float(getattr(cfg, "lora_dropout", 0.0)),
            target_modules=targets,
            use_rslora=bool(getattr(cfg, "use_rslora", False)),
        )
    except (TypeError, ValueError) as exc:
        logger.info("PEFT config %r not expressible as a LoRAConfig: %s", cfg, exc)
        return None


def describe_settings(hf_trainer: Any) -> dict[str, Any]:
    """The settings an attached trainer runs with, to show read-only (it owns them), as a flat JSON-safe
    dict: ``TrainingArguments``/``SFTConfig`` fields by their own names, ``precision`` (``bf16``/``fp16``/
    ``fp32``), and the PEFT adapter's ``lora_r``, ``lora_alpha``, ``lora_dropout``, ``lora_target_modules``
    when the model is a PEFT LoRA model."""
    return {"trainer": type(hf_trainer).__name__, **settings_of(hf_trainer.args, hf_trainer.model)}


def settings_of(args: Any, model: Any) -> dict[str, Any]:
    """:func:`describe_settings` from the arguments and the model (what a callback is given)."""
    out: dict[str, Any] = {"precision": precision_of(args)}
    for name in _SHOWN:
        if hasattr(args, name):
            out[name] = _plain(getattr(args, name))
    lora = peft_lora_config(model)
    if lora is not None:
        out["lora_r"] = lora.r
        out["lora_alpha"] = lora.alpha
        out["lora_dropout"] = lora.dropout
        out["lora_target_modules"] = _plain(lora.target_modules)
    return out


def expected_max_steps(hf_trainer: Any) -> int | None:
    """Optimizer updates ``train()`` will make: ``args.max_steps`` when set, else the epochs times the
    updates per epoch (as ``Trainer.set_initial_training_values`` counts them on one device); ``None`` when
    the dataset has no length."""
    args = hf_trainer.args
    if int(getattr(args, "max_steps", -1)) > 0:
        return int(args.max_steps)
    dataset = getattr(hf_trainer, "train_dataset", None)
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return None
    per_batch = max(1, int(args.per_device_train_batch_size))
    batches = n // per_batch if getattr(args, "dataloader_drop_last", False) else math.ceil(n / per_batch)
    updates = max(1, math.ceil(batches / max(1, int(args.gradient_accumulation_steps))))
    return updates * max(1, math.ceil(float(args.num_train_epochs)))


def strategy_of(args: Any, name: str) -> str:
    """``args.<name>`` (``"eval_strategy"``, ...) as its plain string: ``"no"``, ``"steps"`` or ``"epoch"``."""
    return str(_plain(getattr(args, name, "steps")))


def logging_advice(args: Any, max_steps: int | None) -> str | None:
    """A warning, with a value to use, when the logging settings would chart fewer than
    :data:`MIN_CHART_POINTS` losses over ``max_steps`` updates; ``None`` when they are fine (or unknown).

    A ``logging_steps`` below 1 is a fraction of the run, as ``TrainingArguments`` reads it. The suggestion
    aims at about 50 points: each logged point reads the loss (one device sync), so every step is not needed.
    """
    if max_steps is None or max_steps < 1:
        return None
    suggest = max(1, max_steps // 50)
    strategy = strategy_of(args, "logging_strategy")
    if strategy == "no":
        return (
            "logging_strategy='no': no loss will reach the chart. "
            f"Set logging_strategy='steps', logging_steps={suggest} in TrainingArguments."
        )
    if strategy == "epoch":
        points = max(1, math.ceil(float(getattr(args, "num_train_epochs", 1))))
        current = f"logging_strategy='epoch' ({points} epoch(s))"
    else:
        every = float(getattr(args, "logging_steps", 500))
        every_steps = max(1, math.ceil(max_steps * every) if every < 1 else int(every))
        points = max_steps // every_steps + int(bool(getattr(args, "logging_first_step", False)))
        current = f"logging_steps={getattr(args, 'logging_steps', 500)}"
        if every_steps <= suggest:
            return None
    if points >= min(MIN_CHART_POINTS, max_steps):
        return None
    return (
        f"{current} logs only {points} loss point(s) over {max_steps} steps, so the chart will look nearly "
        f"empty. Set logging_steps={suggest} in TrainingArguments (about {max_steps // suggest} points)."
    )


def sample_seq_len(dataset: Any, args: Any, rows: int = 64) -> int | None:
    """The longest ``input_ids`` among the first ``rows`` rows of ``dataset`` (capped by ``args.max_length``
    when the arguments have one, as TRL truncates to it): the sequence length the memory estimator and the
    tokens-per-step estimate use. ``None`` when the dataset cannot be read that way."""
    longest = 0
    try:
        for i in range(min(rows, len(dataset))):
            ids = dataset[i]["input_ids"]
            longest = max(longest, len(ids))
    except (TypeError, KeyError, IndexError, AttributeError) as exc:
        logger.debug("cannot read the sequence length from the training rows: %s", exc)
        return None
    cap = getattr(args, "max_length", None)
    if isinstance(cap, int) and cap > 0 and not getattr(args, "packing", False):
        longest = min(longest, cap)
    elif isinstance(cap, int) and cap > 0:
        longest = cap  # packed rows are filled to max_length
    return longest or None


def hf_schedule(settings: Mapping[str, Any], total_steps: int) -> tuple[str, int, bool] | None:
    """``(shape, warm-up steps, exact)`` of a trainer's learning-rate schedule in our terms, ``None`` for a
    scheduler we have no shape for. ``settings`` holds ``lr_scheduler_type``, ``warmup_steps`` and optionally
    ``lr_scheduler_kwargs`` (:func:`settings_of`'s names). A ``warmup_steps`` below 1 is a fraction of the
    run, rounded up, as ``TrainingArguments.get_warmup_steps`` reads it; ``"constant"`` takes none. ``exact``
    is False for a scheduler we only approximate or one given ``lr_scheduler_kwargs``."""
    name = str(_plain(settings.get("lr_scheduler_type", "linear")))
    if name not in HF_SCHEDULES:
        return None
    shape, exact = HF_SCHEDULES[name]
    warmup = float(settings.get("warmup_steps") or 0)
    steps = math.ceil(total_steps * warmup) if 0 < warmup < 1 else int(warmup)
    if steps == 0 and float(settings.get("warmup_ratio") or 0) > 0:  # transformers 4.x's separate ratio
        steps = math.ceil(total_steps * float(settings["warmup_ratio"]))
    return (
        shape,
        0 if name == "constant" else max(0, steps),
        exact and not settings.get("lr_scheduler_kwargs"),
    )


def train_config_view(args: Any, max_steps: int, seq_len: int | None) -> TrainConfig:
    """The :class:`TrainConfig` that describes the same run as ``args``, for the diagnosis functions.

    Raises ``ValueError`` when a value is outside what our trainer accepts (e.g. ``learning_rate=0``).
    """
    shown = {
        k: getattr(args, k) for k in ("lr_scheduler_type", "warmup_steps", "warmup_ratio") if hasattr(args, k)
    }
    schedule, warmup, _ = hf_schedule(shown, max(1, int(max_steps))) or ("linear", 0, False)
    clip = float(getattr(args, "max_grad_norm", 0.0) or 0.0)
    return TrainConfig(
        learning_rate=float(args.learning_rate),
        batch_size=int(args.per_device_train_batch_size),
        grad_accum_steps=int(args.gradient_accumulation_steps),
        max_steps=max(1, int(max_steps)),
        warmup_steps=max(0, warmup),
        schedule=schedule,
        weight_decay=float(args.weight_decay),
        max_grad_norm=clip if clip > 0 else None,
        precision=precision_of(args),
        gradient_checkpointing=bool(getattr(args, "gradient_checkpointing", False)),
        block_size=min(max(2, seq_len or 2), 2**20),
        output_dir=str(args.output_dir or "."),
    )


def _hf_wording(text: str, args: Any) -> str:
    for pattern, repl in _HF_WORDS:
        text = re.sub(pattern, repl, text)
    length = "max_length" if hasattr(args, "max_length") else "max sequence length"
    return re.sub(r"\b(block_size|seq_len)\b", length, text)


def _in_hf_words(d: Diagnosis, args: Any) -> Diagnosis:
    d.message = _hf_wording(d.message, args)
    d.suggestions = [_hf_wording(s, args) for s in d.suggestions]
    return d


def _model_device(model: Any, args: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device(str(getattr(args, "device", "cpu")))


def failure_diagnosis(
    exc: BaseException, hf_trainer: Any, step: int, *, started: bool, max_steps: int | None
) -> Diagnosis:
    """What ``train()`` raising ``exc`` after ``step`` completed updates means, in ``TrainingArguments`` words.

    ``started``: ``on_train_begin`` was reached; an error of the kind bad data raises (``ValueError``,
    ``TypeError``, ``KeyError``) before that is reported as bad input. torch's "element 0 of tensors does not
    require grad" from ``backward()`` becomes the "no gradient" diagnosis, naming the trainable parameters that
    the loss does not reach (:mod:`lora_widgets.health.gradient_check`).
    """
    args = hf_trainer.args
    model = getattr(hf_trainer, "model", None)
    if started and is_no_gradient_error(exc) and isinstance(model, torch.nn.Module):
        # torch's "element 0 of tensors does not require grad": no trainable parameter is on the loss's path
        return _in_hf_words(no_gradient_diagnosis(gradient_report(model), step + 1), args)
    if is_out_of_memory(exc):
        seq_len = sample_seq_len(getattr(hf_trainer, "train_dataset", None), args)
        try:
            config = train_config_view(args, max_steps or step or 1, seq_len)
        except ValueError as why:
            logger.info("no TrainConfig view of these TrainingArguments (%s); plain OOM report", why)
        else:
            model = hf_trainer.model
            d = oom_diagnosis(
                exc,
                max(step, 0),
                config=config,
                device=_model_device(model, args),
                model=model,
                lora=peft_lora_config(model),
                seq_len=seq_len or config.block_size,
            )
            return _in_hf_words(d, args)
        d = error_diagnosis(exc, step)
        d.reason = "oom"
        return _in_hf_words(d, args)
    bad_input = not started and isinstance(exc, ValueError | TypeError | KeyError)
    return _in_hf_words(error_diagnosis(exc, step, bad_input=bad_input), args)


def nan_failure(args: Any, bad_step: int, max_steps: int) -> Diagnosis:
    """A non-finite loss or gradient norm logged at 1-based ``bad_step`` (seen at a logging step, so updates
    since the previous log may have spread it), in ``TrainingArguments`` words."""
    try:
        config = train_config_view(args, max_steps, None)
    except ValueError as why:
        logger.info("no TrainConfig view of these TrainingArguments (%s); plain NaN report", why)
        message = f"The loss (or gradient) became NaN/inf by step {bad_step}."
        return Diagnosis("nan", message, ["lower learning_rate (a third of it)"], "FloatingPointError")
    d = _in_hf_words(nan_diagnosis(bad_step, False, config=config, total_steps=max_steps), args)
    d.message += (
        " transformers applies every update, so the weights in memory may no longer be finite: start again from"
        " a checkpoint (train(resume_from_checkpoint=...)) or the base model."
    )
    return d


def setting_notices(args: Any, model: Any, max_steps: int) -> list[AlertRaised]:
    """What in an attached trainer's run cannot be what its settings say, said once at its start
    (:mod:`lora_widgets.health.notices`): a model with no LoRA adapter (every weight trains), a warm-up of at
    least the run's length (``args.get_warmup_steps``, so ``warmup_ratio`` counts too)."""
    notices: list[AlertRaised | None] = []
    if isinstance(model, torch.nn.Module) and not has_lora(model):
        notices.append(no_adapter_notice(*count_parameters(model)))
    get_warmup = getattr(args, "get_warmup_steps", None)
    if callable(get_warmup) and max_steps > 0:
        notices.append(warmup_notice(int(get_warmup(max_steps)), max_steps, float(args.learning_rate)))
    return [n for n in notices if n is not None]
