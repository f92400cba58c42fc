"""Injected faults around a run: one model one owner, memory on the CPU, full disks, bad output folders,
failures before the first step, and what a killed run left behind. Each ends in a typed event, never an
exception, and leaves the user's model and earlier files as they were."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from lora_widgets import atomic
from lora_widgets.events.types import CheckpointSaved, Event, RunFailed, RunFinished, RunSource, StepMetrics
from lora_widgets.lora.layers import LoRAConfig, apply_lora, merge_lora, unmerge_lora
from lora_widgets.lora.peft_format import load_adapter, lora_state_dict
from lora_widgets.training import checkpoint as ckpt
from lora_widgets.training.config import TrainConfig
from lora_widgets.training.diagnosis import is_out_of_memory
from lora_widgets.training.trainer import LoRATrainer
from tests.helpers import tiny_llama, tiny_trainer


def blocks(n: int = 40, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def make(tmp_path: Path, model: torch.nn.Module | None = None, **changes: Any) -> LoRATrainer:
    cfg: dict[str, Any] = {
        "max_steps": 6,
        "batch_size": 4,
        "warmup_steps": 0,
        "eval_every": None,
        "val_fraction": 0.0,
    }
    return tiny_trainer(tmp_path, model, blocks(), **{**cfg, **changes})


def record(trainer: LoRATrainer) -> list[Event]:
    events: list[Event] = []
    trainer.subscribe(events.append)
    return events


def snapshot(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool], list[str]]:
    """State dict, requires_grad flags and module tree: what 'the model is unchanged' means."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    tree = [f"{n}:{type(m).__name__}" for n, m in model.named_modules()]
    return state, flags, tree


def assert_same(a: Any, b: Any) -> None:
    assert a[1] == b[1] and a[2] == b[2]
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


def test_the_trainer_is_a_run_source(tmp_path: Path) -> None:
    assert isinstance(make(tmp_path), RunSource)


# -- one model, one owner --------------------------------------------------------------------------


def test_no_marker_attribute_is_written_onto_the_model(tmp_path: Path) -> None:
    model = tiny_llama()
    make(tmp_path, model=model).run_sync()
    assert not [k for k in vars(model) if "trainer" in k]
    LoRATrainer(model, None, blocks(), lora=LoRAConfig(r=2), config=TrainConfig(max_steps=1, device="cpu"))


def test_a_second_trainer_cannot_replace_the_adapters_of_a_training_model(tmp_path: Path) -> None:
    t = make(tmp_path, max_steps=200)

    async def main() -> None:
        task = asyncio.create_task(t.run())
        while len(t.history) < 1:
            await asyncio.sleep(0.005)
        with pytest.raises(RuntimeError, match="another LoRATrainer is training this model"):
            LoRATrainer(t.model, None, blocks(), lora=LoRAConfig(r=2), config=t.config)
        t.pause()  # (a paused run still owns its model)
        while t.state != "paused":
            await asyncio.sleep(0.005)
        before = snapshot(t.model)
        with pytest.raises(RuntimeError, match="another LoRATrainer is training this model"):
            LoRATrainer(t.model, None, blocks(), lora=LoRAConfig(r=2), config=t.config)
        assert_same(snapshot(t.model), before)  # nothing was swapped under the paused run
        t.stop()
        await task

    asyncio.run(main())
    LoRATrainer(t.model, None, blocks(), lora=LoRAConfig(r=2), config=t.config)  # free again after the run


def test_merged_adapters_are_refused_with_the_fix(tmp_path: Path) -> None:
    model = tiny_llama()
    apply_lora(model, LoRAConfig(r=2))
    merge_lora(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"merged.*unmerge_lora"):
        LoRATrainer(model, None, blocks(), lora=None, config=TrainConfig(device="cpu"))
    with pytest.raises(ValueError, match=r"merged.*unmerge_lora"):
        LoRATrainer(model, None, blocks(), lora=LoRAConfig(r=4), config=TrainConfig(device="cpu"))
    assert_same(snapshot(model), before)
    unmerge_lora(model)
    LoRATrainer(model, None, blocks(), lora=None, config=TrainConfig(device="cpu"))


def test_replacing_a_trainers_adapters_with_a_bad_config_keeps_the_trained_ones(tmp_path: Path) -> None:
    model = tiny_llama()
    make(tmp_path, model=model, learning_rate=1e-2).run_sync()
    before = snapshot(model)
    with pytest.raises(ValueError, match="matched no"):
        LoRATrainer(
            model, None, blocks(), lora=LoRAConfig(r=2, target_modules=["nope"]), config=TrainConfig()
        )
    assert_same(snapshot(model), before)
    t = LoRATrainer(model, None, blocks(), lora=LoRAConfig(r=2), config=TrainConfig(device="cpu"))
    assert (
        t.report is not None and t.report.config is not None and t.report.config.r == 2
    )  # still replaceable


# -- failures, located and classified ----------------------------------------------------------------


def raise_on_call(model: torch.nn.Module, n: int, exc: BaseException) -> None:
    calls = [0]

    def hook(*_: Any) -> None:
        calls[0] += 1
        if calls[0] == n:
            raise exc

    model.lm_head.register_forward_hook(hook)  # type: ignore[union-attr,operator]


@pytest.mark.parametrize(
    "text",
    [
        "[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: you tried to "
        "allocate 34359738368 bytes. Error code 12 (Cannot allocate memory)",
        "[enforce fail at C:\\cb\\alloc_cpu.cpp:72] data. DefaultCPUAllocator: not enough memory: you tried "
        "to allocate 34359738368 bytes.",
    ],
)
def test_a_cpu_allocation_failure_is_out_of_memory(tmp_path: Path, text: str) -> None:
    assert is_out_of_memory(RuntimeError(text)) and not is_out_of_memory(RuntimeError("shape mismatch"))
    t = make(tmp_path)
    raise_on_call(t.model, 3, RuntimeError(text))
    end = t.run_sync()
    assert isinstance(end, RunFailed) and end.reason == "oom" and end.step == 2
    assert "Out of memory at step 3" in end.message and "batch_size=4" in end.message
    assert any("batch_size=2" in s for s in end.suggestions)
    assert end.adapter_path is not None


def test_a_failure_before_the_first_step_is_not_called_step_1(tmp_path: Path) -> None:
    t = make(tmp_path, val_fraction=0.1)  # the base model is evaluated before any update
    events = record(t)
    raise_on_call(t.model, 1, KeyError("broken head"))
    end = t.run_sync()
    assert isinstance(end, RunFailed) and end.reason == "error" and end.step == 0
    assert "before the first step" in end.message and "step 1" not in end.message
    assert not [e for e in events if isinstance(e, StepMetrics)]


def test_an_output_dir_that_is_a_file_is_bad_input(tmp_path: Path) -> None:
    a_file = tmp_path / "runs"
    a_file.write_text("not a folder")
    t = make(tmp_path)
    events = record(t)
    end = t.run_sync()  # does not raise
    assert isinstance(end, RunFailed) and end.reason == "bad_input"
    assert str(a_file) in end.message and "output_dir" in end.message
    assert [e.kind for e in events] == ["state", "state", "failed"] and t.run_dir is None


def test_a_full_disk_while_checkpointing_names_file_and_step_and_keeps_what_was_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = make(tmp_path, max_steps=6, checkpoint_every=2)
    events = record(t)
    real_save = ckpt.save_file
    calls = [0]

    def full_disk(tensors: Any, filename: str, metadata: Any = None) -> None:
        calls[0] += 1
        if calls[0] == 3:  # the second checkpoint's first file (each checkpoint writes two)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    end = t.run_sync()
    assert isinstance(end, RunFailed) and end.step == 4
    assert "checkpoint of step 4" in end.message and "No space left on device" in end.message
    assert str(Path("checkpoints", "step-000004", "trainable.safetensors")) in end.message
    assert any("checkpoint_every" in s for s in end.suggestions)
    assert [e.step for e in events if isinstance(e, CheckpointSaved)] == [2]
    assert t.run_dir is not None
    kept = t.run_dir / "checkpoints"
    assert sorted(p.name for p in kept.iterdir()) == ["step-000002"]  # no half-written checkpoint
    fresh = tiny_llama()
    load_adapter(fresh, kept / "step-000002" / "adapter")  # the last good checkpoint loads
    assert end.adapter_path is not None  # and the adapter of step 4 was saved at the end
    saved = tiny_llama()
    load_adapter(saved, end.adapter_path)
    for k, v in lora_state_dict(saved).items():
        torch.testing.assert_close(v, lora_state_dict(t.model)[k], rtol=0, atol=0)


def test_temporaries_of_a_killed_run_are_removed_at_the_next_start(tmp_path: Path) -> None:
    old = tmp_path / "runs" / "20250101-000000-r4-lr3e-3" / "checkpoints"
    old.mkdir(parents=True)
    (old / "step-000002").mkdir()  # a complete checkpoint: kept
    dead = old / ".step-000004.tmp-999999999-x1y2z3"  # its writer (pid 999999999) is gone
    legacy = old / ".step-000006.tmp-k2j3h4g5"  # what releases before this one left
    alive = old / f".step-000008.tmp-{os.getppid()}-a1b2c3"  # another process writing right now
    for d in (dead, legacy, alive):
        d.mkdir()
        (d / "trainable.safetensors").write_bytes(b"half")
    stray = old.parent / ".config.json.tmp-999999999-q1w2e3"
    stray.write_text("{")
    assert isinstance(make(tmp_path, max_steps=1).run_sync(), RunFinished)
    assert sorted(p.name for p in old.iterdir()) == sorted(["step-000002", alive.name])
    assert not stray.exists()


def test_atomic_writes_keep_the_old_file_and_name_the_destination(tmp_path: Path) -> None:
    target = tmp_path / "config.json"
    atomic.atomic_write_json(target, {"a": 1})

    def fail(path: Path) -> None:
        path.write_text("partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    with pytest.raises(OSError) as info:
        atomic.atomic_write(target, fail)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert target.read_text() == '{"a": 1}' and [p.name for p in tmp_path.iterdir()] == ["config.json"]
