"""Failures end a run with RunFailed (reason, message, suggestions), keep the adapter, leave the model usable."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from lora_widgets.events.types import Event, RunFailed, RunFinished, RunStopped, StateChanged, StepMetrics
from lora_widgets.lora.layers import LoRAConfig
from lora_widgets.lora.peft_format import load_adapter, lora_state_dict
from lora_widgets.training.trainer import LoRATrainer
from tests.helpers import tiny_llama, tiny_trainer


def blocks(n: int = 40, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def make(
    tmp_path: Path, model: torch.nn.Module | None = None, data: Any = None, **changes: Any
) -> LoRATrainer:
    cfg: dict[str, Any] = {
        "max_steps": 8,
        "batch_size": 4,
        "warmup_steps": 0,
        "schedule": "constant",  # so a shorter reference run uses the same rates
        "eval_every": None,
        "val_fraction": 0.0,  # no evaluation: every forward below is a training micro-batch
    }
    return tiny_trainer(tmp_path, model, blocks() if data is None else data, **{**cfg, **changes})


def fault_on_call(model: torch.nn.Module, n: int, effect: Any) -> torch.utils.hooks.RemovableHandle:
    """Forward hook on the output head: on its n-th call, apply ``effect`` (raise, or return new logits)."""
    calls = [0]

    def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == n:
            return effect(output)  # type: ignore[no-any-return]
        return output

    return model.lm_head.register_forward_hook(hook)  # type: ignore[union-attr,operator]


def record(trainer: LoRATrainer) -> list[Event]:
    events: list[Event] = []
    trainer.subscribe(events.append)
    return events


def reference_adapter(tmp_path: Path, steps: int) -> dict[str, torch.Tensor]:
    """The adapter an undisturbed run has after ``steps`` steps (runs are reproducible)."""
    t = make(tmp_path, max_steps=steps)
    t.run_sync()
    return lora_state_dict(t.model)


def assert_model_usable(model: torch.nn.Module) -> None:
    logits = model(blocks(2, 16, seed=3)).logits
    assert torch.isfinite(logits).all()
    assert all(p.grad is None for p in model.parameters())


def raise_(exc: BaseException) -> Any:
    def effect(_: torch.Tensor) -> torch.Tensor:
        raise exc

    return effect


@pytest.mark.parametrize("oom_type", [torch.OutOfMemoryError, torch.cuda.OutOfMemoryError])
def test_out_of_memory(tmp_path: Path, oom_type: type[Exception]) -> None:
    t = make(tmp_path)
    events = record(t)
    handle = fault_on_call(t.model, 3, raise_(oom_type("CUDA out of memory. Tried to allocate 2.00 GiB")))
    end = t.run_sync()
    handle.remove()
    assert isinstance(end, RunFailed) and end.reason == "oom" and end.error_type == "OutOfMemoryError"
    assert end.step == 2 and events[-1] is end
    assert [e.state for e in events if isinstance(e, StateChanged)] == ["running", "failed"]
    for needle in ("step 3", "batch_size=4", "r=4", "sequence length 32", "in total", "step (2) was kept"):
        assert needle in end.message, needle
    joined = " | ".join(end.suggestions)
    assert "batch_size=2 with grad_accum_steps=2" in joined and "r=2" in joined and "block_size=16" in joined
    assert "gradient_checkpointing=True" in joined
    # the adapter of the last completed step was saved, and it is what 2 undisturbed steps give
    assert end.adapter_path is not None
    ref = reference_adapter(tmp_path, 2)
    for k, v in lora_state_dict(t.model).items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=0)
    saved = tiny_llama()
    load_adapter(saved, end.adapter_path)
    for k, v in lora_state_dict(saved).items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=0)
    assert_model_usable(t.model)


def test_out_of_memory_suggestions_survive_a_broken_estimator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lora_widgets.memory import fit as memory

    def broken(*args: Any, **kwargs: Any) -> list[str]:
        raise RuntimeError("estimator unavailable")

    monkeypatch.setattr(memory, "suggest_fit", broken)
    t = make(tmp_path)
    fault_on_call(t.model, 1, raise_(torch.OutOfMemoryError("out of memory")))
    end = t.run_sync()
    assert isinstance(end, RunFailed) and end.reason == "oom" and end.step == 0
    assert any("batch_size=2" in s for s in end.suggestions)


def test_nan_loss_stops_before_the_update(tmp_path: Path) -> None:
    t = make(tmp_path, learning_rate=1e-2)
    events = record(t)
    handle = fault_on_call(t.model, 4, lambda out: out * float("nan"))
    end = t.run_sync()
    handle.remove()
    assert isinstance(end, RunFailed) and end.reason == "nan"
    assert "step 4" in end.message and end.step == 3
    assert any("learning_rate" in s and "3.3e-3" in s for s in end.suggestions)
    assert max(e.step for e in events if isinstance(e, StepMetrics)) == 3
    ref_run = make(tmp_path, learning_rate=1e-2, max_steps=3)
    ref_run.run_sync()
    for k, v in lora_state_dict(t.model).items():  # the NaN update never reached the weights
        torch.testing.assert_close(v, lora_state_dict(ref_run.model)[k], rtol=0, atol=0)
    assert end.adapter_path is not None
    assert_model_usable(t.model)


def test_nan_on_an_unlogged_step_is_caught_within_log_every(tmp_path: Path) -> None:
    t = make(tmp_path, log_every=3, max_steps=9)
    handle = fault_on_call(t.model, 5, lambda out: out * float("inf"))
    end = t.run_sync()
    handle.remove()
    assert isinstance(end, RunFailed) and end.reason == "nan"
    assert "step 5" in end.message  # the first bad step is named, found at the logged step 6
    assert end.step == 6
    assert end.adapter_path is None and "non-finite" in end.message  # corrupted weights are not saved


def test_other_exception_reports_type_and_message(tmp_path: Path) -> None:
    t = make(tmp_path)
    events = record(t)
    handle = fault_on_call(t.model, 2, raise_(KeyError("boom in the model")))
    end = t.run_sync()
    handle.remove()
    assert isinstance(end, RunFailed) and end.reason == "error" and end.error_type == "KeyError"
    assert "boom in the model" in end.message and "step 2" in end.message
    assert end.step == 1 and events[-1] is end and not t.running and t.state == "failed"
    assert_model_usable(t.model)
    again = t.run_sync()  # the same trainer and model train normally afterwards
    assert isinstance(again, RunFinished)


def test_bad_input(tmp_path: Path) -> None:
    out_of_vocab = blocks()
    out_of_vocab[3, 5] = 500
    t = make(tmp_path, data=out_of_vocab)
    events = record(t)
    end = t.run_sync()
    assert isinstance(end, RunFailed) and end.reason == "bad_input"
    assert "500" in end.message and "vocabulary" in end.message
    assert [e.kind for e in events] == ["state", "state", "failed"]
    with pytest.raises(ValueError, match="vocabulary"):
        _ = t.total_steps

    tiny = make(tmp_path, data=blocks(3))
    end = tiny.run_sync()
    assert isinstance(end, RunFailed) and end.reason == "bad_input" and "batch_size" in end.message

    missing = make(tmp_path, data=str(tmp_path / "nope.txt"))
    missing.tokenizer = object()
    end = missing.run_sync()
    assert isinstance(end, RunFailed) and end.reason == "bad_input"

    floats = make(tmp_path, data=torch.rand(10, 8))
    end = floats.run_sync()
    assert isinstance(end, RunFailed) and end.reason == "bad_input" and "integer" in end.message


def test_resume_from_an_incompatible_checkpoint(tmp_path: Path) -> None:
    first = make(tmp_path, max_steps=2, checkpoint_every=2)
    first.run_sync()
    assert first.run_dir is not None
    ckpt = first.run_dir / "checkpoints" / "step-000002"
    other = LoRATrainer(tiny_llama(), None, blocks(), lora=LoRAConfig(r=2), config=first.config)
    end = other.run_sync(resume_from=ckpt)
    assert isinstance(end, RunFailed) and end.reason == "bad_input" and "shape mismatch" in end.message
    end = other.run_sync(resume_from=tmp_path)
    assert isinstance(end, RunFailed) and "not a training checkpoint" in end.message


def test_a_failing_subscriber_does_not_stop_the_run(tmp_path: Path) -> None:
    t = make(tmp_path, max_steps=3)

    def bad(event: Event) -> None:
        raise ZeroDivisionError("subscriber bug")

    t.subscribe(bad)
    events = record(t)
    assert isinstance(t.run_sync(), RunFinished) and len(events) > 3


def test_cancelled_task_cleans_up_and_reports_stopped(tmp_path: Path) -> None:
    t = make(tmp_path, max_steps=500)
    events = record(t)

    async def main() -> None:
        task = asyncio.create_task(t.run())
        while len(t.history) < 2:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    end = events[-1]
    assert isinstance(end, RunStopped) and "cancelled" in end.message and end.adapter_path is not None
    assert not t.running and t.state == "stopped"
    assert_model_usable(t.model)


def test_out_of_memory_before_the_first_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t = make(tmp_path)

    def too_big(*args: Any, **kwargs: Any) -> torch.nn.Module:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(t.model, "to", too_big)
    events = record(t)
    end = t.run_sync()
    assert isinstance(end, RunFailed) and end.reason == "oom" and end.step == 0
    assert "while moving the model to the device" in end.message and "did not start" in end.message
    assert end.adapter_path is None and [e.kind for e in events] == ["state", "state", "failed"]


def test_out_of_memory_suggestions_from_the_memory_estimator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lora_widgets.memory import fit as memory
    from lora_widgets.training import diagnosis

    t = make(tmp_path, data=blocks(80, 64), batch_size=32)
    from lora_widgets.memory.estimate import CPU_RUNTIME_BYTES

    tensors = memory.estimate_memory(tiny_llama(), LoRAConfig(r=4), batch_size=32, seq_len=64).total
    # a device whose memory beyond torch's CPU runtime is a third of what the step's tensors need
    monkeypatch.setattr(diagnosis, "total_memory", lambda device: tensors // 3 + CPU_RUNTIME_BYTES)
    fault_on_call(t.model, 1, raise_(torch.OutOfMemoryError("out of memory")))
    end = t.run_sync()
    assert isinstance(end, RunFailed) and end.reason == "oom"
    assert any("fits (peak" in s for s in end.suggestions), end.suggestions  # the estimator's concrete fits
    assert any(s.startswith("batch_size=16 with grad_accum_steps=2") for s in end.suggestions)


def test_a_cancelled_run_reports_the_step_its_saved_adapter_is_at(tmp_path: Path) -> None:
    """Cancelling mid-step waits for the step's thread; that step's update counts, so the saved adapter is
    exactly an undisturbed run's adapter after ``end.step`` steps."""
    t = make(tmp_path, max_steps=500)
    events = record(t)
    started = asyncio.Event()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        fault_on_call(t.model, 3, lambda out: (loop.call_soon_threadsafe(started.set), out)[1])
        task = asyncio.create_task(t.run())
        await started.wait()  # step 3's forward is running in its thread now
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    end = events[-1]
    assert isinstance(end, RunStopped) and end.adapter_path is not None
    assert end.step == 3
    model = tiny_llama()
    load_adapter(model, end.adapter_path)
    expected = reference_adapter(tmp_path / "ref", end.step)
    got = lora_state_dict(model)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
