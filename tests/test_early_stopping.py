"""Early stopping: the pure rule, our trainer's outcome and best adapter, and the attached HF trainer."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lora_widgets import LoRAConfig, LoRATrainer, TrainConfig, load_base_model
from lora_widgets.events.types import EvalMetrics, Event, RunEarlyStopped, RunFailed, event_from_dict
from lora_widgets.lora import lora_state_dict
from lora_widgets.training.early_stopping import EarlyStopper, EarlyStopping
from tests.helpers import patterned_batch, tiny_llama

# -- the rule --------------------------------------------------------------------------------------------


def _stop_step(rule: EarlyStopping, vals: list[float]) -> int | None:
    stopper = EarlyStopper(rule)
    for step, v in enumerate(vals):
        if stopper.observe_eval(step, v) is not None:
            return step
    return None


def test_patience_counts_evaluations_without_improvement_by_min_delta() -> None:
    vals = [3.0, 2.9, 2.95, 2.91, 2.92, 2.5]
    assert _stop_step(EarlyStopping(patience=3), vals) == 4  # 2.95, 2.91, 2.92 do not beat 2.9
    assert _stop_step(EarlyStopping(patience=4), vals) is None  # 2.5 improves in time
    # a gain smaller than min_delta moves the best but does not reset the count (transformers' semantics)
    stopper = EarlyStopper(EarlyStopping(patience=2, min_delta=0.05))
    assert stopper.observe_eval(0, 3.0) is None
    assert stopper.observe_eval(10, 2.98) is None and stopper.best_step == 10
    verdict = stopper.observe_eval(20, 2.97)
    assert verdict is not None and verdict.reason == "patience"
    assert (verdict.step, verdict.best_step, verdict.best_loss) == (20, 20, 2.97)
    assert verdict.message.startswith("Stopped early at step 20, best at step 20")


@pytest.mark.parametrize(
    "vals", [[3.0, 2.9, 2.95, 2.91, 2.92, 2.5], [2.0, 2.1, 2.2, 1.0, 1.1, 1.2, 1.3], [5, 4, 3, 2, 1]]
)
@pytest.mark.parametrize("threshold", [0.0, 0.05])
def test_patience_agrees_with_transformers_early_stopping_callback(
    vals: list[float], threshold: float, tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers' Trainer needs it (the lowest-versions job has none)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), metric_for_best_model="eval_loss", greater_is_better=False,
        load_best_model_at_end=True, eval_strategy="steps", save_strategy="steps", report_to="none",
    )  # fmt: skip
    hf = transformers.EarlyStoppingCallback(early_stopping_patience=2, early_stopping_threshold=threshold)
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    hf_stop = None
    for step, v in enumerate(vals):
        hf.on_evaluate(args, state, control, metrics={"eval_loss": v})
        state.best_metric = v if state.best_metric is None else min(state.best_metric, v)  # the trainer's
        if control.should_training_stop:
            hf_stop = step
            break
    assert _stop_step(EarlyStopping(patience=2, min_delta=threshold), vals) == hf_stop


def test_divergence_on_a_non_finite_or_doubled_loss() -> None:
    s = EarlyStopper(EarlyStopping(patience=None, divergence_factor=2.0))
    assert s.observe_loss(1, 4.0) is None and s.observe_loss(2, 7.9) is None
    verdict = s.observe_loss(3, 8.1)
    assert verdict is not None and verdict.reason == "diverged" and "2 x its first value 4" in verdict.detail
    assert EarlyStopper(EarlyStopping()).observe_loss(1, math.nan) is not None
    assert EarlyStopper(EarlyStopping()).observe_eval(0, math.inf) is not None
    assert EarlyStopper(EarlyStopping(divergence_factor=None)).observe_loss(1, math.nan) is None


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match=r"EarlyStopping.patience=0 .* integer >= 1"):
        EarlyStopping(patience=0)
    with pytest.raises(ValueError, match="divergence_factor=1"):
        EarlyStopping(divergence_factor=1)
    with pytest.raises(ValueError, match="stops nothing"):
        EarlyStopping(patience=None, divergence_factor=None)
    with pytest.raises(ValueError, match=r"TrainConfig.early_stopping=.*set eval_every"):
        TrainConfig(early_stopping=EarlyStopping(), eval_every=None)
    with pytest.raises(ValueError, match=r"TrainConfig.early_stopping='yes'"):
        TrainConfig(early_stopping="yes")  # type: ignore[arg-type]
    c = TrainConfig(early_stopping=EarlyStopping(patience=2, min_delta=0.01))
    assert TrainConfig.from_dict(c.to_dict()) == c  # config.json round trip


# -- our trainer -------------------------------------------------------------------------------------------


def _weights_at_evals(trainer: LoRATrainer) -> dict[int, dict[str, torch.Tensor]]:
    """The adapter's tensors after each evaluation (the loop awaits its subscribers: nothing trains meanwhile)."""
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def on(event: Event) -> None:
        if isinstance(event, EvalMetrics):
            seen[event.step] = {k: v.clone() for k, v in lora_state_dict(trainer.model).items()}

    trainer.subscribe(on)
    return seen


def _config(tmp_path: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(max_steps=16, batch_size=4, eval_every=2, eval_batches=2, warmup_steps=0,
                                block_size=64, adapter_stats=False, sample_prompts=(), device="cpu",
                                output_dir=str(tmp_path))  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def shipped() -> Any:
    return load_base_model()


@pytest.mark.parametrize(
    ("lr", "rule", "reason"),
    [
        (
            0.3,
            EarlyStopping(patience=2, divergence_factor=None),
            "patience",
        ),  # too high: never beats the base
        (0.9, EarlyStopping(patience=None), "diverged"),  # the loss doubles
        (
            3e-3,
            EarlyStopping(patience=2, min_delta=0.5),
            "patience",
        ),  # small gains: best moves, count goes on
    ],
)
def test_a_run_stops_early_and_keeps_its_best_adapter(
    shipped: Any, tmp_path: Path, lr: float, rule: EarlyStopping, reason: str
) -> None:
    model, tokenizer = shipped
    config = _config(tmp_path, learning_rate=lr, early_stopping=rule)
    trainer = LoRATrainer(model, tokenizer, "python-docs", lora=LoRAConfig(r=4, alpha=8), config=config)
    weights = _weights_at_evals(trainer)
    end = trainer.run_sync()
    assert isinstance(end, RunEarlyStopped), end.message
    assert end.reason == reason and end.step < 16 and trainer.state == "finished"
    assert end.message.startswith(f"Stopped early at step {end.step}")
    assert end.best_step is not None and f"best at step {end.best_step}" in end.message
    assert end.best_val_loss == min(v for v in trainer.history.val_loss if math.isfinite(v))
    assert end.adapter_path is not None
    saved = load_file(str(Path(end.adapter_path) / "adapter_model.safetensors"))
    best = weights[end.best_step]
    assert saved.keys() == best.keys() and all(torch.equal(saved[k], best[k]) for k in best)
    if reason == "patience" and lr < 0.1:
        assert end.best_step > 0  # a trained step, not the base model's evaluation
    # the terminal event reads back from metrics.jsonl as what it was
    assert event_from_dict(end.to_dict()) == end


def test_a_nan_is_a_divergence_stop_when_watched_and_a_failure_when_not(tmp_path: Path) -> None:
    for rule, expected in ((EarlyStopping(patience=None), RunEarlyStopped), (None, RunFailed)):
        model = tiny_llama()
        calls = {"n": 0}

        def poison(_m: Any, _inp: Any, out: Any, calls: dict[str, int] = calls) -> Any:
            calls["n"] += 1
            if calls["n"] > 6 and torch.is_grad_enabled():  # training forwards only, from the 4th update
                out.logits = out.logits * math.nan
            return out

        handle = model.register_forward_hook(poison)
        data = patterned_batch(32, 16)  # [32, 16]
        config = TrainConfig(max_steps=10, batch_size=4, eval_every=2, val_fraction=0.25, warmup_steps=0,
                             adapter_stats=False, sample_prompts=(), device="cpu", output_dir=str(tmp_path),
                             early_stopping=rule)  # fmt: skip
        end = LoRATrainer(
            model, None, data, lora=LoRAConfig(r=2, target_modules=["q_proj"]), config=config
        ).run_sync()
        handle.remove()
        assert type(end) is expected, end.message
        if rule is not None:
            assert end.reason == "diverged" and "nan" in end.message and end.adapter_path is not None
            saved = load_file(str(Path(end.adapter_path) / "adapter_model.safetensors"))
            assert all(bool(torch.isfinite(t).all()) for t in saved.values())


def test_patience_without_validation_data_is_bad_input(tmp_path: Path) -> None:
    config = TrainConfig(max_steps=4, batch_size=4, val_fraction=0.0, device="cpu", output_dir=str(tmp_path),
                         early_stopping=EarlyStopping(), adapter_stats=False, sample_prompts=())  # fmt: skip
    end = LoRATrainer(
        tiny_llama(), None, patterned_batch(16, 16), lora=LoRAConfig(r=2), config=config
    ).run_sync()
    assert isinstance(end, RunFailed) and end.reason == "bad_input" and "no validation data" in end.message


# -- an attached HF trainer ---------------------------------------------------------------------------------


def test_the_hf_callback_stops_where_transformers_callback_does(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lora_widgets.hf import EventCallback

    rows = [{"input_ids": r, "labels": r} for r in patterned_batch(32, 32)]

    def train(callback: Any, out: str) -> Any:
        torch.manual_seed(0)
        config = peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        )
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / out), max_steps=30, per_device_train_batch_size=4, learning_rate=0.5,
            logging_steps=1, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
            load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
            report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
        )  # fmt: skip
        hf = transformers.Trainer(
            model=peft.get_peft_model(tiny_llama(), config),
            args=args,
            train_dataset=rows,
            eval_dataset=rows[:8],
        )
        hf.remove_callback(transformers.PrinterCallback)
        hf.add_callback(callback)
        hf.train()
        return hf.state.global_step

    theirs = train(transformers.EarlyStoppingCallback(early_stopping_patience=2), "theirs")
    ours_cb = EventCallback(early_stopping=EarlyStopping(patience=2, divergence_factor=None))
    ours = train(ours_cb, "ours")
    assert ours == theirs < 30
    end = ours_cb.last_event
    assert isinstance(end, RunEarlyStopped) and end.reason == "patience" and end.step == ours
    assert "restored: load_best_model_at_end" in end.message


def test_an_hf_trainer_that_never_evaluates_refuses_patience_before_training(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers' Trainer needs it (the lowest-versions job has none)
    import asyncio

    from lora_widgets.hf import EventCallback, HFRun

    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                          report_to="none", use_cpu=True, disable_tqdm=True)  # fmt: skip
    rows = [{"input_ids": r, "labels": r} for r in patterned_batch(16, 16)]
    hf = transformers.Trainer(model=model, args=args, train_dataset=rows)  # eval_strategy "no"
    end = asyncio.run(HFRun(hf, early_stopping=EarlyStopping(patience=2)).run())
    assert isinstance(end, RunFailed) and end.reason == "bad_input"
    assert "EarlyStopping(patience=2) counts evaluations" in end.message and "eval_strategy=" in end.message
    assert hf.state.global_step == 0 and all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # called directly, train() raises the same before its first step; the divergence stop alone is fine
    plain = transformers.Trainer(model=tiny_llama(), args=args, train_dataset=rows,
                                 callbacks=[EventCallback(early_stopping=EarlyStopping(patience=3))])  # fmt: skip
    with pytest.raises(ValueError, match="counts evaluations, but this run makes none"):
        plain.train()
    divergence = EventCallback(early_stopping=EarlyStopping(patience=None))
    transformers.Trainer(model=tiny_llama(), args=args, train_dataset=rows, callbacks=[divergence]).train()
    assert divergence.last_event is not None and divergence.last_event.kind == "finished"


def test_the_dashboard_says_stopped_early_with_the_best_step() -> None:
    from lora_widgets.widget.callouts import outcome_callout

    end = RunEarlyStopped(4, 1.0, 8.4, 4.6, "/runs/x/adapter", "Stopped early at step 4, best at step 0 (...)",
                          reason="patience", best_step=0)  # fmt: skip
    callout = outcome_callout("run 1", end, 8.4, 4.6)
    assert callout.kind == "success" and callout.title == "Stopped early: run 1"
    assert "best at step 0" in callout.message and "adapter saved in /runs/x/adapter" in callout.message
