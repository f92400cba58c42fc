""" "Is it training?" alerts: each one raised by its fault injected into a real (tiny) model, and quiet when healthy.

The loop in ``_train`` is the integration the trainer is meant to make: adapter statistics right after
``optimizer.step()`` (before ``zero_grad``) on the first update and at every evaluation, all events fed to an
``AlertMonitor``; the first update's gradients checked (``AlertMonitor.check_gradients``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from lora_widgets import LoRAConfig, apply_lora, lora_layers
from lora_widgets.events import (
    AdapterLayerStats,
    AdapterStats,
    AlertRaised,
    EvalMetrics,
    RunStarted,
    StepMetrics,
)
from lora_widgets.health import AlertMonitor
from lora_widgets.health.alerts import (
    UPDATE_RATIO_HIGH,
    UPDATE_RATIO_LOW,
    count_trained_tokens,
    val_loss_alert,
)
from lora_widgets.health.gradient_check import gradient_report
from lora_widgets.lora import adapter_stats, snapshot_adapters
from tests.helpers import patterned_batch, tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj"]  # what the seed notebook adapted


@dataclass
class _Run:
    alerts: list[AlertRaised] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)

    def seen(self) -> list[str]:
        return [a.key for a in self.alerts]

    def first(self, key: str) -> AlertRaised:
        return next(a for a in self.alerts if a.key == key)


def _train(model: nn.Module, lr: float, steps: int = 4, eval_every: int = 2) -> _Run:
    """Constant-rate AdamW on a patterned batch, evaluated at step 0 and every ``eval_every`` updates."""
    x, val = patterned_batch(4, 32), patterned_batch(8, 32)[4:]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    monitor, run = AlertMonitor(peak_learning_rate=lr if lr > 0 else None), _Run()

    def evaluate(step: int) -> None:
        model.eval()
        with torch.no_grad():
            v = float(model(input_ids=val, labels=val, use_cache=False).loss)
        model.train()
        run.val_losses.append(v)
        run.alerts += monitor.feed(EvalMetrics(step, v, math.exp(v), min(run.val_losses)))

    model.train()
    evaluate(0)
    for step in range(1, steps + 1):
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
        if step == 1:  # what the gradients of the first update show, for any model
            run.alerts += monitor.check_gradients(gradient_report(model), step)
        measure = step == 1 or step % eval_every == 0
        snap = snapshot_adapters(model) if measure else None
        opt.step()
        if measure:
            stats = adapter_stats(model, step, before=snap, after_backward=True, learning_rate=lr)
            run.alerts += monitor.feed(stats)
        opt.zero_grad(set_to_none=True)
        if step % eval_every == 0:
            evaluate(step)
    return run


def _seed_bug_model() -> nn.Module:
    """The seed notebook's bug: LoRA modules exist (and are trainable) but the forward pass never calls them.
    As in the seed, only the adapted Linear weights are frozen; everything else still trains."""
    model = tiny_llama()
    apply_lora(model, LoRAConfig(r=4, target_modules=TARGETS))
    unused = nn.ModuleDict()
    for name, layer in lora_layers(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base_layer)  # the forward goes around the adapter
        unused[name.replace(".", "_")] = layer  # ... which stays in the model, like the seed's `module._lora`
    model.add_module("unused_adapters", unused)
    for name, p in model.named_parameters():
        p.requires_grad_(
            "lora_" in name or not name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))
        )
    return model


def test_seed_bug_lora_not_in_forward_is_flagged_at_the_first_update() -> None:
    model = _seed_bug_model()
    assert len(lora_layers(model)) == 6
    run = _train(model, lr=3e-3)
    assert run.val_losses[0] != run.val_losses[-1]  # the loss moves (other parameters train): easy to miss
    alert = run.first("no_gradient")
    assert alert.step == 1  # read from the first update's gradients
    assert alert.severity == "danger" and alert.title == "12 of 27 trainable tensors receive no gradient"
    for proj in TARGETS:  # grouped by module, layer indices collapsed
        assert (
            f"unused_adapters.model_layers_*_self_attn_{proj}.{{lora_A,lora_B}}: 4 tensors in 2 layers"
            in (alert.evidence)
        )
    assert "the adapters exist but the forward never calls them" in alert.evidence
    assert "apply_lora" in alert.fix
    assert run.seen().count("no_gradient") == 1  # never repeated
    assert run.seen() == ["no_gradient"]  # the cause, said once: not also "B zero" or "learning rate too low"


def test_healthy_run_raises_nothing() -> None:
    model = tiny_llama()
    apply_lora(model, LoRAConfig(r=4, target_modules="all-linear"))
    run = _train(model, lr=3e-3)
    assert run.alerts == []
    assert run.val_losses[-1] < run.val_losses[0]


def test_some_adapters_bypassed_are_named() -> None:
    model = tiny_llama()
    apply_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    keep = nn.ModuleDict()
    for name, layer in lora_layers(model).items():
        if name.endswith("v_proj"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.base_layer)
            keep[name.replace(".", "_")] = layer
    model.add_module("unused", keep)
    alert = _train(model, lr=3e-3, steps=1).first("no_gradient")
    assert alert.title.startswith("4 of ") and alert.title.endswith("trainable tensors receive no gradient")
    assert "unused.model_layers_*_self_attn_v_proj.{lora_A,lora_B}: 4 tensors in 2 layers" in alert.evidence
    assert "q_proj" not in alert.evidence


def _checkpointed(use_reentrant: bool, input_grads: bool) -> nn.Module:
    model = tiny_llama()
    apply_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.lm_head.weight.requires_grad_(
        True
    )  # trained outside the checkpoints (as modules_to_save=['lm_head'])
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 (also enables input grads)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers 4.x: the older name, and input grads left to the caller
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    hooked = hasattr(model, "_require_grads_hook")
    if input_grads and not hooked:
        model.enable_input_require_grads()
    if (
        not input_grads and hooked
    ):  # what transformers < 4.35 / PEFT without prepare_model_for_kbit_training left you with
        model.disable_input_require_grads()
    return model


def test_reentrant_checkpointing_without_input_grads_is_flagged() -> None:
    """Re-entrant checkpoints whose inputs do not require grad give the LoRA layers inside them no gradient
    (transformers#26221). transformers 5's ``activation_checkpointing_enable`` now calls
    ``enable_input_require_grads`` itself, so the fault is injected by undoing that."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "None of the inputs have requires_grad=True"
        run = _train(_checkpointed(use_reentrant=True, input_grads=False), lr=3e-3, steps=2)
    alert = run.first("no_gradient")
    assert alert.step == 1 and "8 of 9 trainable tensors" in alert.evidence  # every adapter; not lm_head
    assert "model.layers.*.self_attn.q_proj.{lora_A,lora_B}: 4 tensors in 2 layers" in alert.evidence
    assert "enable_input_require_grads" in alert.fix and "use_reentrant" in alert.fix
    # Non-reentrant checkpoints (transformers' default) and the default input-grads hook both train the adapters.
    assert "no_gradient" not in _train(_checkpointed(use_reentrant=False, input_grads=False), 3e-3, 2).seen()
    assert "no_gradient" not in _train(_checkpointed(use_reentrant=True, input_grads=True), 3e-3, 2).seen()


def test_b_still_zero_after_steps_with_learning_rate_zero() -> None:
    model = tiny_llama()
    apply_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    run = _train(model, lr=0.0, steps=4, eval_every=1)
    alert = run.first("b_zero")
    assert alert.step == 2  # step 1 may legitimately use rate 0 (warm-up); step 2 may not
    assert "4 of 4" in alert.evidence and "learning rate 0" in alert.evidence
    assert "no_gradient" not in run.seen()  # the gradients do arrive
    # ... and the validation loss, exactly constant, is called flat after 3 evaluations without improvement
    assert run.first("val_flat").step == 3


def test_all_labels_masked_is_flagged() -> None:
    model = tiny_llama()
    apply_lora(model, LoRAConfig(r=4))
    x = patterned_batch(2, 16)
    labels = torch.full_like(x, -100)  # e.g. the completions were truncated away
    loss = model(input_ids=x, labels=labels).loss
    assert not torch.isfinite(loss) or float(loss) == 0.0  # what the user sees: NaN (or 0), no error
    monitor = AlertMonitor()
    (alert,) = monitor.check_labels(labels, step=1)
    assert alert.key == "no_trained_tokens" and "30 target positions" in alert.evidence
    assert monitor.check_labels(labels, step=2) == []  # said once
    partly = labels.clone()
    partly[0, 5:] = x[0, 5:]
    assert count_trained_tokens(partly) == (11, 30)
    assert AlertMonitor().check_labels(partly) == []


@pytest.mark.parametrize(
    ("lr", "key", "bound"),
    [(1e-7, "lr_too_low", UPDATE_RATIO_LOW), (1.0, "lr_too_high", UPDATE_RATIO_HIGH)],
)
def test_update_ratio_flags_a_learning_rate_far_off(lr: float, key: str, bound: float) -> None:
    model = tiny_llama()
    apply_lora(model, LoRAConfig(r=4, target_modules="all-linear"))
    run = _train(model, lr=lr, steps=2)
    alert = run.first(key)
    assert (
        alert.step == 1 and f"{bound:.0e}" in alert.evidence and f"learning rate {lr:.3g}" in alert.evidence
    )
    other = "lr_too_high" if key == "lr_too_low" else "lr_too_low"
    assert other not in run.seen()


def _stats(step: int, ratio: float, lr: float | None) -> AdapterStats:
    row = AdapterLayerStats(
        "m.layers.0.q_proj", 0, "q_proj", 2, 2.0, 1.0, 0.1, 0.1, 1.0, 0.5, 0.1, 0.1, (0.1, 0.0), ratio
    )
    return AdapterStats(step, (row,), True, lr)


def test_update_ratio_is_read_only_near_the_peak_rate() -> None:
    monitor = AlertMonitor(peak_learning_rate=1e-3)
    assert monitor.feed(_stats(1, 1e-7, 1e-4)) == []  # warm-up: lr a tenth of the peak, steps small by design
    assert monitor.feed(_stats(2, 1e-7, 0.0)) == []
    (alert,) = monitor.feed(_stats(20, 1e-7, 1e-3))
    assert alert.key == "lr_too_low"
    # without a given peak, RunStarted's config tells it
    started = RunStarted("r", "/tmp/r", {"learning_rate": 1e-3}, None, "cpu", "CPU", 1, 1, 10, 8, 0.0)
    fresh = AlertMonitor()
    fresh.feed(started)
    assert (
        fresh.feed(_stats(1, 1e-7, 1e-4)) == [] and fresh.feed(_stats(5, 1e-7, 9e-4))[0].key == "lr_too_low"
    )


def test_monitor_never_repeats_and_starts_afresh_with_a_new_run() -> None:
    monitor = AlertMonitor(peak_learning_rate=1e-3)
    assert [a.key for a in monitor.feed(_stats(5, 1.0, 1e-3))] == ["lr_too_high"]
    assert monitor.feed(_stats(6, 1.0, 1e-3)) == []
    assert len(monitor.alerts) == 1
    step = StepMetrics(7, 10, 0.1, 2.0, 1e-3, 1.0, 100.0, 1.0, 1.0, 0)
    assert monitor.feed(step) == []
    monitor.feed(RunStarted("r2", "/tmp/r2", {"learning_rate": 1e-3}, None, "cpu", "CPU", 1, 1, 10, 8, 0.0))
    assert monitor.alerts == [] and [a.key for a in monitor.feed(_stats(5, 1.0, 1e-3))] == ["lr_too_high"]


def _evals(*losses: float) -> list[tuple[int, float]]:
    return [(50 * i, v) for i, v in enumerate(losses)]


def test_val_loss_rules() -> None:
    assert val_loss_alert(_evals(4.0, 3.5, 3.2, 3.0, 2.9)) is None  # improving
    assert val_loss_alert(_evals(4.0, 3.97, 3.94, 3.91)) is None  # slow, but each step beats 0.5%
    flat = val_loss_alert(_evals(4.0, 3.99, 3.985, 3.981))  # within 0.5% of 4.0 three times
    assert flat is not None and flat.key == "val_flat" and flat.step == 150
    assert "since the first evaluation" in flat.evidence and "steps 50-150" in flat.evidence
    rising = val_loss_alert(_evals(4.0, 3.0, 3.1, 3.2, 3.3))
    assert rising is not None and rising.key == "val_rising" and "10.0% above its best" in rising.evidence
    assert "step 50" in rising.fix  # keep the best adapter
    assert val_loss_alert(_evals(4.0, 3.0, 3.1, 3.2)) is None  # only 2 evaluations since the best
    assert val_loss_alert(_evals(4.0, 4.0, 4.0, 4.0), window=4) is None
    assert val_loss_alert(_evals(4.0, float("nan"), 4.0, 4.0, 4.0)) is not None  # NaN evaluations are skipped
    with pytest.raises(ValueError, match="window must be >= 1"):
        val_loss_alert([], window=0)


def test_monitor_reads_eval_metrics() -> None:
    monitor = AlertMonitor()
    found = [
        a
        for i, v in enumerate([4.0, 3.0, 3.1, 3.2, 3.3])
        for a in monitor.feed(EvalMetrics(10 * i, v, math.exp(v), 3.0))
    ]
    assert [a.key for a in found] == ["val_rising"]
    assert found[0].to_dict()["key"] == "val_rising"


def test_monitor_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="peak_learning_rate must be > 0"):
        AlertMonitor(peak_learning_rate=0.0)
    with pytest.raises(ValueError, match="ratio_low < ratio_high"):
        AlertMonitor(ratio_low=1e-2, ratio_high=1e-3)
    with pytest.raises(ValueError, match="labels must be"):
        count_trained_tokens(torch.zeros(4, dtype=torch.long))
