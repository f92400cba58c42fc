"""A transformers ``Trainer`` / TRL ``SFTTrainer`` as a RunSource: events, Stop, Pause, failures (offline, tiny)."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lora_widgets.events.types import (  # noqa: E402
    Event,
    RunFailed,
    RunFinished,
    RunSource,
    RunStopped,
    event_from_dict,
)
from lora_widgets.hf import EventCallback, HFRun, describe_settings, logging_advice  # noqa: E402
from tests.helpers import patterned_batch, tiny_llama  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _rows(n: int = 32, seq: int = 32) -> list[dict[str, torch.Tensor]]:
    ids = torch.cat([patterned_batch(8, seq)] * (n // 8))  # [n, seq]
    return [{"input_ids": r, "labels": r} for r in ids]


def _peft_model() -> Any:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return peft.get_peft_model(tiny_llama(), config)


def _hf_trainer(tmp_path: Path, cls: type | None = None, **overrides: Any) -> Any:
    kwargs: dict[str, Any] = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 12,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
    }
    kwargs.update(overrides)
    args = transformers.TrainingArguments(**kwargs)
    cls = cls or transformers.Trainer
    trainer = cls(model=_peft_model(), args=args, train_dataset=_rows(), eval_dataset=_rows(8))
    trainer.remove_callback(transformers.PrinterCallback)  # keeps the test output (and kernel cells) quiet
    return trainer


class _Recorder:
    """Subscriber that records events and the thread each arrived on."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.threads: set[int] = set()

    def __call__(self, event: Event) -> None:
        self.threads.add(threading.get_ident())
        self.events.append(event)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    def of(self, kind: str) -> list[Any]:
        return [e for e in self.events if e.kind == kind]


def _run(run: HFRun, rec: _Recorder, driver: Any = None) -> tuple[Any, int]:
    """``await run.run()`` on a fresh loop (with an optional coroutine ``driver(run)`` beside it); returns the
    terminal event and the loop thread's id."""

    async def main() -> Any:
        run.subscribe(rec)
        task = asyncio.get_running_loop().create_task(run.run())
        if driver is not None:
            await driver(run)
        return await asyncio.wait_for(task, 120)

    return asyncio.run(main()), threading.get_ident()


def test_events_in_order_with_the_logged_points(tmp_path: Path) -> None:
    hf = _hf_trainer(
        tmp_path, logging_steps=2, eval_strategy="steps", eval_steps=6, save_strategy="steps", save_steps=6
    )
    run = HFRun(hf)
    assert isinstance(run, RunSource)
    rec = _Recorder()
    end, loop_thread = _run(run, rec)

    assert isinstance(end, RunFinished) and end.step == 12 and run.state == "finished" and not run.running
    assert rec.threads == {loop_thread}  # every event was published on the loop's thread
    kinds = rec.kinds()
    assert kinds[:2] == ["state", "run_started"] and kinds[-2:] == ["state", "finished"]
    assert kinds.count("state") == 2  # running, finished: one "running", not one per layer
    started = rec.of("run_started")[0]
    assert started.total_steps == 12 and started.config["logging_steps"] == 2 and started.lora["r"] == 4
    assert 0 < started.trainable_params < started.total_params

    logged = [h for h in hf.state.log_history if "loss" in h]
    steps = rec.of("step")
    assert [s.step for s in steps] == [h["step"] for h in logged] == [2, 4, 6, 8, 10, 12]
    assert [s.loss for s in steps] == pytest.approx([h["loss"] for h in logged])
    assert [s.learning_rate for s in steps] == pytest.approx([h["learning_rate"] for h in logged])
    assert [s.grad_norm for s in steps] == pytest.approx([h["grad_norm"] for h in logged])
    assert all(s.tokens_per_s > 0 and s.memory_bytes > 0 and s.total_steps == 12 for s in steps)
    assert steps[-1].eta_s == 0 and steps[0].eta_s > 0
    assert steps[-1].loss < steps[0].loss  # the patterned data is learnable

    evals = rec.of("eval")
    assert [e.step for e in evals] == [6, 12]
    assert [e.val_loss for e in evals] == pytest.approx(
        [h["eval_loss"] for h in hf.state.log_history if "eval_loss" in h]
    )
    assert evals[-1].best_val_loss == min(e.val_loss for e in evals)
    assert [c.step for c in rec.of("checkpoint")] == [6, 12]
    assert end.adapter_path == str(tmp_path / "out" / "checkpoint-12")
    assert end.final_loss == steps[-1].loss and end.best_val_loss == evals[-1].best_val_loss

    # every event is on disk too, readable back into the same objects
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [event_from_dict(json.loads(line)) for line in lines] == rec.events


def test_stop_ends_within_one_step_and_the_adapter_loads_with_peft(tmp_path: Path) -> None:
    hf = _hf_trainer(tmp_path, max_steps=10_000, save_strategy="steps", save_steps=100_000)
    run = HFRun(hf)
    rec = _Recorder()
    seen_at_stop: list[int] = []

    def stop_at_three(event: Event) -> None:
        if event.kind == "step" and event.step >= 3 and not seen_at_stop:
            seen_at_stop.append(hf.state.global_step)  # updates completed when stop() is called
            run.stop()

    run.subscribe(stop_at_three)
    end, _ = _run(run, rec)

    assert isinstance(end, RunStopped) and run.state == "stopped"
    assert seen_at_stop[0] <= end.step <= seen_at_stop[0] + 1
    assert rec.of("step")[-1].step == end.step  # the last step is charted
    assert end.adapter_path == str(
        tmp_path / "out" / f"checkpoint-{end.step}"
    )  # saved: save_strategy="steps"
    trained = {k: v for k, v in hf.model.state_dict().items() if "lora_" in k}
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), end.adapter_path)
    again = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert trained.keys() == again.keys() and len(trained) == 8
    assert all(torch.equal(trained[k], again[k]) for k in trained)
    assert "checkpoint" in rec.of("stopped")[0].message


def test_pause_holds_the_worker_and_resume_releases_it(tmp_path: Path) -> None:
    hf = _hf_trainer(tmp_path, max_steps=8)
    run = HFRun(hf)
    rec = _Recorder()

    async def driver(r: HFRun) -> None:
        while not rec.of("step"):
            await asyncio.sleep(0.005)
        r.pause()
        while r.state != "paused":
            await asyncio.sleep(0.005)
        held = hf.state.global_step
        await asyncio.sleep(0.4)  # the loop is free meanwhile: this coroutine runs
        assert hf.state.global_step == held and r.state == "paused" and r.running
        r.resume()

    end, _ = _run(run, rec, driver)
    assert isinstance(end, RunFinished) and end.step == 8
    states = [e.state for e in rec.of("state")]
    assert states == ["running", "paused", "running", "finished"]
    assert [s.step for s in rec.of("step")] == list(range(1, 9))


def test_stop_while_paused_ends_at_the_paused_step(tmp_path: Path) -> None:
    hf = _hf_trainer(tmp_path, max_steps=1000)
    run = HFRun(hf)
    rec = _Recorder()

    async def driver(r: HFRun) -> None:
        while not rec.of("step"):
            await asyncio.sleep(0.005)
        r.pause()
        while r.state != "paused":
            await asyncio.sleep(0.005)
        r.stop()

    end, _ = _run(run, rec, driver)
    paused_at = next(e.step for e in rec.of("state") if e.state == "paused")
    assert isinstance(end, RunStopped) and end.step == paused_at
    assert end.adapter_path is None and "save_model" in end.message  # save_strategy="no": in memory only


class _FailingTrainer(transformers.Trainer):
    """A user's Trainer whose ``compute_loss`` goes wrong at update 3 (``fault``: raise, oom or nan)."""

    fault = "raise"

    def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        if self.state.global_step >= 2:
            if self.fault == "raise":
                raise ValueError("my custom loss needs a 'weights' column")
            if self.fault == "oom":
                torch.empty(2**50, dtype=torch.uint8)  # the CPU allocator refuses 1 PiB: a real OOM
            if self.fault == "nan":
                return loss * float("nan")
        return loss


@pytest.mark.parametrize("fault", ["raise", "oom", "nan"])
def test_a_failure_in_compute_loss_ends_in_run_failed(tmp_path: Path, fault: str) -> None:
    cls = type(f"Failing_{fault}", (_FailingTrainer,), {"fault": fault})
    hf = _hf_trainer(tmp_path, cls=cls, max_steps=50)
    run = HFRun(hf)
    rec = _Recorder()
    end, loop_thread = _run(run, rec)  # returns: no exception, no hung task

    assert isinstance(end, RunFailed) and run.state == "failed" and not run.running
    assert rec.kinds()[-2:] == ["state", "failed"] and rec.threads == {loop_thread}
    assert end.suggestions and end.message
    if fault == "raise":
        assert end.reason == "error" and end.error_type == "ValueError" and end.step == 2
        assert "weights" in end.message and "lora_widgets.hf.run" in " ".join(end.suggestions)
    elif fault == "oom":
        assert end.reason == "oom" and end.step == 2
        assert "per_device_train_batch_size=4" in end.message
        text = " ".join(end.suggestions)
        assert "per_device_train_batch_size=2" in text and "gradient_accumulation_steps=2" in text
        assert "gradient_checkpointing=True" in text and "LoRA rank r=2" in text
    else:
        assert end.reason == "nan" and end.step >= 3
        assert "learning_rate" in end.suggestions[0] and f"step {end.step}" in end.message
        assert "resume_from_checkpoint" in end.message  # HF applied the NaN update: say how to recover
        return
    # the same trainer can train again after the failure (a fresh run, not a dead object)
    hf.fault = "none"
    hf.args.max_steps = hf.state.global_step + 2
    again = asyncio.run(run.run())
    assert isinstance(again, RunFinished), again


def test_bad_data_ends_in_run_failed_naming_the_problem(tmp_path: Path) -> None:
    hf = _hf_trainer(tmp_path)
    hf.train_dataset = []  # refused before training starts: bad input
    end = asyncio.run(HFRun(hf).run())
    assert isinstance(end, RunFailed) and end.step == 0 and end.reason == "bad_input"
    assert "num_samples=0" in end.message and "save_model" not in end.message  # nothing was trained
    hf.train_dataset = [{"text": "no input ids here"}] * 8  # refused by the model at the first step
    end = asyncio.run(HFRun(hf).run())
    assert isinstance(end, RunFailed) and end.step == 0 and end.reason == "error"
    assert "input_ids" in end.message and end.error_type == "ValueError"


def test_event_callback_alone_delivers_synchronously(tmp_path: Path) -> None:
    cb = EventCallback()
    hf = _hf_trainer(tmp_path, max_steps=4)
    hf.add_callback(cb)
    rec = _Recorder()
    cb.subscribe(rec)
    hf.train()  # the user's own blocking call
    assert rec.threads == {threading.get_ident()}
    assert rec.kinds() == ["state", "run_started", "step", "step", "step", "step", "state", "finished"]
    assert cb.last_event is not None and cb.last_event.kind == "finished"
    # HFRun reuses the callback already attached rather than adding a second one
    run = HFRun(hf)
    assert run.callback is cb
    assert sum(isinstance(c, EventCallback) for c in hf.callback_handler.callbacks) == 1


def test_cancelling_the_task_stops_training_and_waits_for_it(tmp_path: Path) -> None:
    hf = _hf_trainer(tmp_path, max_steps=10_000)
    run = HFRun(hf)
    rec = _Recorder()

    async def main() -> None:
        run.subscribe(rec)
        task = asyncio.get_running_loop().create_task(run.run())
        while not rec.of("step"):
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not run.running and not hf.is_in_train  # the worker had finished when the cancel propagated

    asyncio.run(main())
    assert rec.kinds()[-1] == "stopped" and run.state == "stopped"


def test_sft_trainer_on_conversations_carries_trl_metrics(tmp_path: Path) -> None:
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from lora_widgets import load_base_model

    _, tokenizer = load_base_model()
    tokenizer.chat_template = CHAT_TEMPLATE
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i}+{i}?"},
                {"role": "assistant", "content": f"{2 * i}."},
            ]
        }
        for i in range(24)
    ]
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=4,
        per_device_train_batch_size=4,
        logging_steps=1,
        max_length=64,
        bf16=False,
        activation_checkpointing=False,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    sft = trl.SFTTrainer(
        model=tiny_llama(vocab_size=len(tokenizer)),
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft.LoraConfig(r=4, target_modules="all-linear"),
    )
    run = HFRun(sft)
    rec = _Recorder()
    end, loop_thread = _run(run, rec)
    assert isinstance(end, RunFinished) and rec.threads == {loop_thread}
    steps = rec.of("step")
    assert [s.step for s in steps] == [1, 2, 3, 4]
    for s in steps:
        assert {"mean_token_accuracy", "num_tokens", "entropy"} <= s.extra.keys()
    # tokens/s from TRL's own count of the tokens it trained on
    counts = [0.0] + [s.extra["num_tokens"] for s in steps]
    spans = [steps[0].elapsed_s] + [b.elapsed_s - a.elapsed_s for a, b in itertools.pairwise(steps)]
    for i, s in enumerate(steps):
        assert s.tokens_per_s == pytest.approx((counts[i + 1] - counts[i]) / spans[i], rel=0.05)
    settings = rec.of("run_started")[0].config
    assert settings["max_length"] == 64 and settings["lora_r"] == 4 and settings["packing"] is False


def test_settings_and_logging_advice(tmp_path: Path) -> None:
    hf = _hf_trainer(tmp_path, max_steps=300, logging_steps=500)
    settings = describe_settings(hf)
    assert settings["trainer"] == "Trainer" and settings["precision"] == "fp32"
    assert settings["per_device_train_batch_size"] == 4 and settings["lora_target_modules"] == [
        "q_proj",
        "v_proj",
    ]
    assert settings["logging_strategy"] == "steps"  # enums as their plain values
    json.dumps(settings)  # JSON-safe

    advice = HFRun(hf).advice()
    assert advice is not None and "logging_steps=500" in advice and "logging_steps=6" in advice
    args = hf.args
    assert logging_advice(args, 300) == advice
    args.logging_steps = 6
    assert logging_advice(args, 300) is None  # 50 points
    args.logging_steps = 15
    assert logging_advice(args, 300) is None  # 20 points: enough
    args.logging_steps = 0.1  # a fraction of the run: every 30 steps, 10 points
    assert "10 loss point" in (logging_advice(args, 300) or "")
    args.logging_steps = 2
    assert "logging_steps=1" in (logging_advice(args, 10) or "")  # short runs: log every step
    args.logging_steps = 1
    assert logging_advice(args, 10) is None
    args.logging_strategy = transformers.IntervalStrategy.NO
    assert "logging_strategy='no'" in (logging_advice(args, 300) or "")


def test_epoch_based_runs_count_their_steps(tmp_path: Path) -> None:
    hf = _hf_trainer(tmp_path, max_steps=-1, num_train_epochs=2, gradient_accumulation_steps=2)
    run = HFRun(hf)
    assert run.total_steps == 8  # 32 rows / 4 per batch = 8 batches / 2 accumulated = 4 updates x 2 epochs
    rec = _Recorder()
    end, _ = _run(run, rec)
    assert end.step == run.total_steps == rec.of("run_started")[0].total_steps


def test_controls_are_no_ops_when_idle_and_runs_do_not_overlap(tmp_path: Path) -> None:
    hf = _hf_trainer(tmp_path, max_steps=3)
    run = HFRun(hf)
    run.stop()
    run.pause()
    run.resume()
    rec = _Recorder()
    end, _ = _run(run, rec)
    assert isinstance(end, RunFinished) and end.step == 3  # the idle stop()/pause() were not remembered

    async def twice() -> None:
        task = asyncio.get_running_loop().create_task(run.run())
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="already training"):
            await run.run()
        await task

    hf.args.max_steps = 5
    asyncio.run(twice())
    with pytest.raises(TypeError, match=r"transformers\.Trainer"):
        HFRun(object())


def test_nan_detected_is_reported_even_with_the_loss_filter(tmp_path: Path) -> None:
    """transformers replaces a NaN step loss by the running mean (logging_nan_inf_filter); the gradient norm
    still shows it, so the run still ends in a NaN callout rather than training on NaN weights."""
    cls = type("Nan", (_FailingTrainer,), {"fault": "nan"})
    hf = _hf_trainer(tmp_path, cls=cls, max_steps=50, logging_nan_inf_filter=True)
    end = asyncio.run(HFRun(hf).run())
    assert isinstance(end, RunFailed) and end.reason == "nan" and end.step == 3
    last = [h for h in hf.state.log_history if "loss" in h][-1]
    assert math.isfinite(last["loss"]) and math.isnan(last["grad_norm"])  # what the filter leaves to see


def test_training_in_a_real_kernel_leaves_cells_free(tmp_path: Path) -> None:
    """HFRun as a background task in an IPython kernel: later cells execute while it trains, see it progress,
    and stop it; every event was delivered on the kernel's own thread."""
    pytest.importorskip("jupyter_client")
    pytest.importorskip("ipykernel")
    from tests.kernel import assert_progresses_between_cells, run_cell, running_kernel

    with running_kernel() as kc:
        run_cell(
            kc,
            f"""
import asyncio, threading
from pathlib import Path
from tests.test_hf_bridge import _hf_trainer
from lora_widgets.hf import HFRun
hf = _hf_trainer(Path({str(tmp_path)!r}), max_steps=100_000)
run = HFRun(hf)
steps, threads = [], set()
def on_event(e):
    threads.add(threading.get_ident())
    if e.kind == "step":
        steps.append(e.step)
run.subscribe(on_event)
task = asyncio.get_event_loop().create_task(run.run())
""",
        )
        assert_progresses_between_cells(kc, "print(run.state, len(steps))")
        out = run_cell(
            kc, "run.stop()\nend = await task\nprint(end.kind, run.state, threads == {threading.get_ident()})"
        )
        assert out.splitlines()[-1] == "stopped stopped True"
