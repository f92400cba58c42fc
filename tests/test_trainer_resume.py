"""Checkpoints: atomic, pickle-free files; resuming reproduces the uninterrupted run exactly on CPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lora_widgets.events.types import CheckpointSaved, Event, RunFinished, StepMetrics
from lora_widgets.lora.layers import LoRAConfig
from lora_widgets.lora.peft_format import load_adapter, lora_state_dict
from lora_widgets.training import checkpoint as ckpt
from lora_widgets.training.config import TrainConfig
from lora_widgets.training.trainer import LoRATrainer
from tests.helpers import tiny_gpt2, tiny_llama


def blocks(n: int = 26, seq: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def cfg(tmp_path: Path, **changes: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "max_steps": 12,  # 24 train blocks / batch 4 = 6 steps per epoch: the run crosses an epoch
        "batch_size": 4,
        "warmup_steps": 3,
        "weight_decay": 0.01,
        "eval_every": 4,
        "eval_batches": 1,
        "checkpoint_every": 4,
        "val_fraction": 0.08,
        "output_dir": str(tmp_path / "runs"),
        "device": "cpu",
    }
    base.update(changes)
    return TrainConfig(**base)


def run(
    model: torch.nn.Module, config: TrainConfig, resume_from: Path | None = None
) -> tuple[LoRATrainer, list[Event]]:
    t = LoRATrainer(model, None, blocks(), lora=LoRAConfig(r=4, dropout=0.1), config=config)
    events: list[Event] = []
    t.subscribe(events.append)
    end = t.run_sync(resume_from=resume_from)
    assert isinstance(end, RunFinished), end.message
    return t, events


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2])
def test_resume_reproduces_later_losses_exactly(tmp_path: Path, make_model: Any) -> None:
    config = cfg(tmp_path)
    full, events = run(make_model(), config)
    saved = [e for e in events if isinstance(e, CheckpointSaved)]
    assert [e.step for e in saved] == [4, 8, 12]
    losses = {e.step: e.loss for e in events if isinstance(e, StepMetrics)}

    resumed, events2 = run(make_model(), config, resume_from=Path(saved[0].path))
    resumed_losses = {e.step: e.loss for e in events2 if isinstance(e, StepMetrics)}
    assert sorted(resumed_losses) == list(range(5, 13))
    assert resumed_losses == {s: losses[s] for s in range(5, 13)}  # bit-identical, crossing an epoch
    for k, v in lora_state_dict(resumed.model).items():
        torch.testing.assert_close(v, lora_state_dict(full.model)[k], rtol=0, atol=0)
    assert resumed.history.step.tolist() == list(range(1, 13))  # earlier steps read from the first run
    assert resumed.history.loss.tolist() == full.history.loss.tolist()
    assert resumed.history.eval_step.tolist() == full.history.eval_step.tolist()
    assert resumed.run_dir != full.run_dir
    info = json.loads((resumed.run_dir / "config.json").read_text())  # type: ignore[operator]
    assert info["resumed_from"] == saved[0].path


def test_checkpoint_layout_is_pickle_free_and_loads(tmp_path: Path) -> None:
    t, events = run(tiny_llama(), cfg(tmp_path, max_steps=4, checkpoint_every=4))
    path = Path(next(e.path for e in events if isinstance(e, CheckpointSaved)))
    names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert names == [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "state.safetensors",
        "trainable.safetensors",
        "trainer_state.json",
    ]
    state = ckpt.read_checkpoint_state(path)
    assert state["step"] == 4
    assert state["extra"]["data_position"] == {"micro_batch": 4, "epoch": 0, "step_in_epoch": 4}
    assert state["extra"]["config"]["max_steps"] == 4
    fresh = tiny_llama()
    load_adapter(fresh, path / "adapter")  # the checkpoint's adapter is an ordinary PEFT adapter
    for k, v in lora_state_dict(fresh).items():
        torch.testing.assert_close(v, lora_state_dict(t.model)[k])
    assert not list(path.parent.glob(".*"))  # no temporary directories left behind


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    target = tmp_path / "ckpts" / "step-000001"
    ckpt.save_checkpoint(target, model, opt, step=1)
    before = (target / "trainer_state.json").read_text()

    def crash(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(target, model, opt, step=2)
    assert (target / "trainer_state.json").read_text() == before  # the old checkpoint is intact
    assert sorted(p.name for p in target.parent.iterdir()) == ["step-000001"]  # no half-written leftovers


def test_rng_round_trip() -> None:
    import random

    import numpy as np

    ckpt.seed_everything(3)
    meta, tensors = ckpt.capture_rng()
    meta = json.loads(json.dumps(meta))  # survives JSON
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ckpt.restore_rng(meta, tensors)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == a
