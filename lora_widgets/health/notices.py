"""Settings that cannot take effect in this run, said once at its start instead of skipped without a word.

A run can be configured to do something it then cannot: sample answers on a model whose adapters are PEFT's
(the base half needs lora_widgets' adapters, switched off and on), or with no validation data to evaluate on;
a warm-up longer than the run, so the configured learning rate is never trained at; a trainer attached to
the dashboard whose model has no adapter at all, so every weight trains. Each function here looks at one of
these and returns an :class:`~lora_widgets.events.types.AlertRaised` (published as an event, shown as a callout,
written to ``metrics.jsonl``) or ``None``. Pure functions: our trainer and the transformers bridge
call the same ones, so the words are the same.
"""

from __future__ import annotations

from lora_widgets.events.types import AlertRaised

__all__ = ["no_adapter_notice", "samples_off_notice", "warmup_notice"]


def warmup_notice(warmup_steps: int, total_steps: int, learning_rate: float) -> AlertRaised | None:
    """A warm-up of at least the run's length: the rate rises through the whole run (linear warm-up, Goyal et
    al. 2017, sec. 2.2: ``lr * s / warmup`` at update ``s``) and reaches ``learning_rate`` at the last update
    at best; ``None`` when the run is longer than its warm-up."""
    if warmup_steps < 1 or total_steps < 1 or warmup_steps < total_steps:
        return None
    peak = learning_rate * min(1.0, total_steps / warmup_steps)
    return AlertRaised(
        key="warmup_too_long",
        title="The peak learning rate is never trained at",
        evidence=(
            f"warmup_steps={warmup_steps} >= the run's {total_steps} updates: the learning rate rises through "
            f"the whole run and reaches {peak:.3g} (of learning_rate={learning_rate:.3g}) only at its last "
            "update, and no decay follows"
        ),
        fix=(
            f"set warmup_steps to a small part of the run (about 5-10%: warmup_steps={max(1, total_steps // 10)}), "
            "or train for more steps"
        ),
        step=0,
    )


def no_adapter_notice(trainable: int, total: int) -> AlertRaised | None:
    """A model without LoRA adapters (ours or PEFT's) whose weights train: a full fine-tune, not LoRA;
    ``None`` when nothing trains (the run says so itself)."""
    if trainable < 1:
        return None
    return AlertRaised(
        key="no_adapter",
        title="No LoRA adapter: every weight trains",
        evidence=(
            f"the model has no LoRA adapter, so this run trains {trainable:,} of its {total:,} parameters "
            "directly (a full fine-tune: the saved result is the whole model, not an adapter)"
        ),
        fix=(
            "to train LoRA, wrap the model before building the trainer: peft.get_peft_model(model, "
            "peft.LoraConfig(...)) or lora_widgets.apply_lora(model, LoRAConfig(...))"
        ),
        step=0,
    )


def samples_off_notice(reason: str, fix: str) -> AlertRaised:
    """Sample answers were asked for (or are on by default) but cannot be made in this run: ``reason`` says
    why, ``fix`` what turns them on."""
    return AlertRaised(
        key="samples_off",
        title="No sample answers in this run",
        evidence=reason,
        fix=fix,
        step=0,
    )
