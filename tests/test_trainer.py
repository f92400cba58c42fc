"""The async LoRATrainer: configuration, event stream, control (stop/pause/resume), reproducibility, files."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lora_widgets.events.types import (
    EvalMetrics,
    Event,
    RunFinished,
    RunStarted,
    RunStopped,
    StateChanged,
    StepMetrics,
    event_from_dict,
)
from lora_widgets.lora.layers import LoRAConfig, has_lora
from lora_widgets.lora.peft_format import load_adapter, lora_state_dict
from lora_widgets.training.config import TrainConfig
from lora_widgets.training.trainer import LoRATrainer
from tests.helpers import tiny_gpt2, tiny_llama


def blocks(n: int = 40, seq: int = 32, seed: int = 0) -> torch.Tensor:
    """Random token blocks [n, seq] from a fixed generator (vocab 128, like the tiny models)."""
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def config(tmp_path: Path, **changes: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "max_steps": 6,
        "batch_size": 4,
        "warmup_steps": 2,
        "eval_every": 3,
        "eval_batches": 2,
        "output_dir": str(tmp_path / "runs"),
        "device": "cpu",
    }
    base.update(changes)
    return TrainConfig(**base)


def make(
    tmp_path: Path, model: torch.nn.Module | None = None, data: Any = None, **changes: Any
) -> LoRATrainer:
    return LoRATrainer(
        model if model is not None else tiny_llama(),
        None,
        blocks() if data is None else data,
        lora=LoRAConfig(r=4),
        config=config(tmp_path, **changes),
    )


def record(trainer: LoRATrainer) -> list[Event]:
    events: list[Event] = []
    trainer.subscribe(events.append)
    return events


# -- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("learning_rate", 0.0),
        ("learning_rate", float("nan")),
        ("batch_size", 0),
        ("batch_size", 2.5),
        ("grad_accum_steps", 0),
        ("epochs", 0),
        ("max_steps", 0),
        ("warmup_steps", -1),
        ("schedule", "exponential"),
        ("weight_decay", -0.1),
        ("max_grad_norm", 0.0),
        ("eval_every", 0),
        ("seed", -1),
        ("precision", "fp8"),
        ("log_every", 0),
        ("checkpoint_every", 0),
        ("block_size", 1),
        ("val_fraction", 0.9),
        ("gradient_checkpointing", "yes"),
        ("batch_size", True),
    ],
)
def test_config_validation_names_field_and_value(field: str, value: Any) -> None:
    with pytest.raises(ValueError) as info:
        TrainConfig(**{field: value})
    assert f"TrainConfig.{field}={value!r}" in str(info.value)


def test_config_defaults_round_trip() -> None:
    c = TrainConfig()
    assert (c.learning_rate, c.batch_size, c.max_steps, c.schedule, c.precision) == (
        3e-3,
        8,
        200,
        "cosine",
        "fp32",
    )
    assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert c.replace(batch_size=2).batch_size == 2
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"lr": 1e-3})


def test_constructor_errors(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"nn\.Module"):
        LoRATrainer("not a model", None, blocks())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fp16"):
        LoRATrainer(
            tiny_llama(), None, blocks(), lora=LoRAConfig(), config=config(tmp_path, precision="fp16")
        )
    frozen = tiny_llama().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        LoRATrainer(frozen, None, blocks(), config=config(tmp_path))
    model = tiny_llama()
    from lora_widgets.lora.layers import apply_lora

    apply_lora(model, LoRAConfig(r=2))  # applied by the user, not by a LoRATrainer
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        LoRATrainer(model, None, blocks(), lora=LoRAConfig(), config=config(tmp_path))


def test_total_steps_and_schedule_preview(tmp_path: Path) -> None:
    t = make(tmp_path, max_steps=None, epochs=2, val_fraction=0.1)  # 36 train blocks / 4 = 9 steps per epoch
    assert t.total_steps == 18
    curve = t.lr_schedule()
    assert curve.shape == (18,) and curve[0] == 0.0 and curve.max() == pytest.approx(3e-3)
    t2 = make(tmp_path, max_steps=50)
    assert t2.total_steps == 50  # max_steps overrides epochs and cycles the data


# -- a full run ------------------------------------------------------------------------------------


def test_run_publishes_ordered_events_and_writes_files(tmp_path: Path) -> None:
    t = make(tmp_path)
    events = record(t)
    threads: set[int] = set()
    t.subscribe(lambda e: threads.add(threading.get_ident()))
    states: list[str] = []
    t.subscribe(lambda e: states.append(t.state))
    end = t.run_sync()

    assert isinstance(end, RunFinished) and end.step == 6 and end is events[-1]
    kinds = [e.kind for e in events]
    # adapter statistics on the first update, every eval_every and the last; no tokenizer, so no samples
    assert kinds == [
        "state", "data", "run_started", "eval",
        "step", "adapter_stats", "step", "step", "adapter_stats", "eval",
        "step", "step", "step", "adapter_stats", "eval",
        "state", "finished",
    ]  # fmt: skip
    started = events[2]
    assert isinstance(started, RunStarted)
    assert started.total_steps == 6 and started.tokens_per_step == 4 * 32 and started.device == "cpu"
    assert 0 < started.trainable_params < started.total_params
    assert [e.state for e in events if isinstance(e, StateChanged)] == ["running", "finished"]
    steps = [e for e in events if isinstance(e, StepMetrics)]
    assert [s.step for s in steps] == [1, 2, 3, 4, 5, 6]
    assert steps[0].learning_rate == 0.0 and steps[2].learning_rate == pytest.approx(3e-3)
    assert all(np.isfinite(s.loss) and s.tokens_per_s > 0 and s.memory_bytes > 0 for s in steps)
    assert steps[-1].eta_s == 0.0
    evals = [e for e in events if isinstance(e, EvalMetrics)]
    assert [e.step for e in evals] == [0, 3, 6]
    assert evals[-1].best_val_loss == min(e.val_loss for e in evals)
    assert evals[0].perplexity == pytest.approx(np.exp(evals[0].val_loss))
    assert threads == {threading.get_ident()}  # callbacks on the loop's (here: the main) thread
    assert states[0] == "running" and states[-1] == "finished" and t.state == "finished"

    # history mirrors the events
    assert t.history.step.tolist() == [1, 2, 3, 4, 5, 6]
    assert t.history.loss.tolist() == [s.loss for s in steps]
    assert t.history.eval_step.tolist() == [0, 3, 6]

    # run directory: config.json, metrics.jsonl readable back into the same events, the adapter
    assert t.run_dir is not None and t.run_id is not None and t.run_dir.name == t.run_id
    assert "-r4-lr3e-3" in t.run_id
    cfg = json.loads((t.run_dir / "config.json").read_text())
    assert cfg["train"]["max_steps"] == 6 and cfg["lora"]["r"] == 4
    lines = (t.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [event_from_dict(json.loads(line)) for line in lines] == events
    assert end.adapter_path == str(t.run_dir / "adapter")
    fresh = tiny_llama()
    load_adapter(fresh, end.adapter_path)
    x = blocks(2, 16, seed=5)
    torch.testing.assert_close(fresh(x).logits, t.model(x).logits)
    assert t.model.training is False  # tiny_llama() is in eval mode; the run restored it


def test_log_every_and_unique_run_dirs(tmp_path: Path) -> None:
    t = make(tmp_path, max_steps=10, log_every=3, eval_every=None)
    events = record(t)
    t.run_sync()
    assert [e.step for e in events if isinstance(e, StepMetrics)] == [3, 6, 9, 10]  # and the last step
    assert [e.step for e in events if isinstance(e, EvalMetrics)] == [0, 10]  # start and end only
    first = t.run_dir
    t.run_sync()
    assert t.run_dir != first and first is not None and first.exists()


def test_stop_from_a_callback_takes_effect_before_the_next_step(tmp_path: Path) -> None:
    t = make(tmp_path, max_steps=50, eval_every=None)
    events = record(t)
    t.subscribe(lambda e: t.stop() if isinstance(e, StepMetrics) and e.step == 3 else None)
    end = t.run_sync()
    assert isinstance(end, RunStopped) and end.step == 3
    assert max(e.step for e in events if isinstance(e, StepMetrics)) == 3
    assert [e.state for e in events if isinstance(e, StateChanged)] == ["running", "stopped"]
    assert end.adapter_path is not None and Path(end.adapter_path, "adapter_model.safetensors").exists()
    t.stop()  # no run: nothing happens


def test_stop_from_another_task_within_one_step(tmp_path: Path) -> None:
    t = make(tmp_path, max_steps=200, eval_every=None)
    events = record(t)

    async def main() -> tuple[RunStopped, int]:
        first_step = asyncio.Event()
        t.subscribe(lambda e: first_step.set() if isinstance(e, StepMetrics) else None)
        task = asyncio.create_task(t.run())
        await first_step.wait()
        await asyncio.sleep(0.01)  # a step is (probably) in flight now
        done_when_stopped = len(t.history)
        t.stop()
        end = await task
        assert isinstance(end, RunStopped)
        return end, done_when_stopped

    end, done = asyncio.run(main())
    assert done <= end.step <= done + 1  # at most the step in flight completes
    assert events[-1] is end


def test_pause_and_resume(tmp_path: Path) -> None:
    t = make(tmp_path, max_steps=8, eval_every=None, val_fraction=0.0)
    events = record(t)
    t.subscribe(lambda e: t.pause() if isinstance(e, StepMetrics) and e.step == 2 else None)

    async def main() -> None:
        task = asyncio.create_task(t.run())
        while t.state != "paused":
            await asyncio.sleep(0.005)
        held = len(t.history)
        for _ in range(20):  # the loop keeps running other tasks; the run makes no progress
            await asyncio.sleep(0.005)
        assert len(t.history) == held == 2
        t.resume()
        end = await task
        assert isinstance(end, RunFinished) and end.step == 8

    asyncio.run(main())
    assert [e.state for e in events if isinstance(e, StateChanged)] == [
        "running",
        "paused",
        "running",
        "finished",
    ]
    kinds = [(e.kind, getattr(e, "step", None)) for e in events]
    assert kinds.index(("state", 2)) == kinds.index(("step", 2)) + 1


def test_stop_while_paused(tmp_path: Path) -> None:
    t = make(tmp_path, max_steps=8, eval_every=None)
    t.subscribe(lambda e: t.pause() if isinstance(e, StepMetrics) and e.step == 1 else None)

    async def main() -> Any:
        task = asyncio.create_task(t.run())
        while t.state != "paused":
            await asyncio.sleep(0.005)
        t.stop()
        return await task

    end = asyncio.run(main())
    assert isinstance(end, RunStopped) and end.step == 1 and t.state == "stopped"


def test_second_concurrent_run_is_refused(tmp_path: Path) -> None:
    t = make(tmp_path, max_steps=4, eval_every=None)

    async def main() -> None:
        task = asyncio.create_task(t.run())
        await asyncio.sleep(0)
        assert t.running
        with pytest.raises(RuntimeError, match="already running"):
            await t.run()
        other = LoRATrainer(t.model, None, blocks(), config=t.config)  # same model, existing adapters
        with pytest.raises(RuntimeError, match="another LoRATrainer is training this model"):
            await other.run()
        with pytest.raises(RuntimeError, match=re.escape("await trainer.run()")):
            t.run_sync()
        with pytest.raises(RuntimeError, match="pause"):
            t.save_adapter(tmp_path / "now")
        assert isinstance(await task, RunFinished)

    asyncio.run(main())
    assert not t.running


def test_loop_stays_responsive_during_steps(tmp_path: Path) -> None:
    t = make(tmp_path, max_steps=6, eval_every=None, batch_size=8, data=blocks(64, 64))
    ticks = [0]
    at_step: list[int] = []
    t.subscribe(lambda e: at_step.append(ticks[0]) if isinstance(e, StepMetrics) else None)

    async def ticker() -> None:
        while True:
            ticks[0] += 1
            await asyncio.sleep(0)

    async def main() -> None:
        tick = asyncio.create_task(ticker())
        await t.run()
        tick.cancel()

    asyncio.run(main())
    # other tasks ran while steps computed in the worker thread
    assert all(b > a for a, b in itertools.pairwise(at_step))


# -- reproducibility -------------------------------------------------------------------------------


def _losses(tmp_path: Path, dropout: float = 0.1, **changes: Any) -> list[float]:
    t = LoRATrainer(
        tiny_llama(),
        None,
        blocks(),
        lora=LoRAConfig(r=4, dropout=dropout),  # dropout draws from the seeded RNG too
        config=config(tmp_path, max_steps=8, eval_every=None, **changes),
    )
    t.run_sync()
    return t.history.loss.tolist()


def test_same_seed_same_losses_other_seed_other_losses(tmp_path: Path) -> None:
    a = _losses(tmp_path)
    b = _losses(tmp_path)
    c = _losses(tmp_path, seed=7)
    assert a == b  # bit-identical on CPU
    assert a != c


def test_rerun_on_same_trainer_restarts_adapters_from_seed(tmp_path: Path) -> None:
    t = make(tmp_path, max_steps=4, eval_every=None)
    t.run_sync()
    first = t.history.loss.tolist()
    weights = {k: v.clone() for k, v in lora_state_dict(t.model).items()}
    t.run_sync()
    assert t.history.loss.tolist() == first
    for k, v in lora_state_dict(t.model).items():
        torch.testing.assert_close(v, weights[k], rtol=0, atol=0)


def test_grad_accumulation_matches_the_larger_batch(tmp_path: Path) -> None:
    big = _losses(tmp_path, dropout=0.0, batch_size=8)  # (dropout masks depend on the batch shape)
    accum = _losses(tmp_path, dropout=0.0, batch_size=4, grad_accum_steps=2)
    np.testing.assert_allclose(accum, big, rtol=1e-5)


def test_new_trainer_replaces_adapters_a_trainer_made(tmp_path: Path) -> None:
    model = tiny_llama()
    make(tmp_path, model=model, max_steps=2, eval_every=None).run_sync()
    t2 = LoRATrainer(model, None, blocks(), lora=LoRAConfig(r=2), config=config(tmp_path, max_steps=2))
    assert t2.report is not None and t2.report.config is not None and t2.report.config.r == 2
    assert isinstance(t2.run_sync(), RunFinished)


# -- other models, precisions, options -------------------------------------------------------------


def test_gpt2_bf16_and_gradient_checkpointing(tmp_path: Path) -> None:
    t = LoRATrainer(
        tiny_gpt2(), None, blocks(), lora=LoRAConfig(r=4), config=config(tmp_path, precision="bf16")
    )
    end = t.run_sync()
    assert isinstance(end, RunFinished) and np.isfinite(t.history.loss).all()
    plain = _losses(tmp_path, dropout=0.0)
    ckpt = _losses(tmp_path, dropout=0.0, gradient_checkpointing=True)
    np.testing.assert_allclose(ckpt, plain, rtol=1e-5)


def test_full_fine_tuning_saves_the_model(tmp_path: Path) -> None:
    model = tiny_llama()
    t = LoRATrainer(model, None, blocks(), lora=None, config=config(tmp_path, max_steps=3))
    assert t.report is None and not has_lora(model)
    end = t.run_sync()
    assert isinstance(end, RunFinished) and end.adapter_path is not None
    assert Path(end.adapter_path, "model.safetensors").exists()
    assert "-full-" in (t.run_id or "")


def test_peft_model_is_trained_as_is(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    t = LoRATrainer(
        model, None, blocks(), lora=None, config=config(tmp_path, max_steps=3, learning_rate=1e-2)
    )
    end = t.run_sync()
    assert isinstance(end, RunFinished) and end.adapter_path is not None
    assert Path(end.adapter_path, "adapter_model.safetensors").exists()
    after = dict(model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_token_blocks_from_text_source(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({f"w{i}": i for i in range(127)} | {"[EOS]": 127}, unk_token="w0")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="[EOS]")
    texts = [" ".join(f"w{(i * 7 + j) % 127}" for j in range(60)) for i in range(40)]
    t = LoRATrainer(
        tiny_llama(), tokenizer, texts, lora=LoRAConfig(r=4), config=config(tmp_path, block_size=32)
    )
    end = t.run_sync()
    assert isinstance(end, RunFinished), end.message


def test_stop_and_pause_from_another_thread(tmp_path: Path) -> None:
    t = make(tmp_path, max_steps=300, eval_every=None)
    seen_pause = threading.Event()

    def control() -> None:  # e.g. a widget callback arriving on a comm thread
        while len(t.history) < 2:
            threading.Event().wait(0.005)
        t.pause()
        while t.state != "paused":
            threading.Event().wait(0.005)
        seen_pause.set()
        held = len(t.history)
        threading.Event().wait(0.05)
        assert len(t.history) == held
        t.save_adapter(tmp_path / "while_paused")  # allowed while paused: no step is in flight
        t.resume()
        while len(t.history) < held + 2:
            threading.Event().wait(0.005)
        t.stop()

    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            control()
        except BaseException as exc:  # surface assertion errors from the thread
            errors.append(exc)
            t.stop()

    worker = threading.Thread(target=guarded)
    worker.start()
    end = t.run_sync()
    worker.join()
    assert not errors, errors
    assert seen_pause.is_set()
    assert isinstance(end, RunStopped) and end.step < 300
    assert (tmp_path / "while_paused" / "adapter_model.safetensors").exists()
