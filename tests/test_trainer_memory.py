"""Clean-up: after a run nothing holds optimizer state, gradients or activations; memory returns to its level."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from lora_widgets.events.types import RunFinished
from lora_widgets.lora.layers import LoRAConfig
from lora_widgets.training.config import TrainConfig
from lora_widgets.training.trainer import LoRATrainer
from tests.helpers import tiny_llama


def _rss() -> int:
    gc.collect()
    return int(psutil.Process().memory_info().rss)


def test_ten_consecutive_runs_leave_memory_at_its_starting_level(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    optimizers: list[weakref.ref[torch.optim.Optimizer]] = []

    class TrackedAdamW(torch.optim.AdamW):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            optimizers.append(weakref.ref(self))

    monkeypatch.setattr(torch.optim, "AdamW", TrackedAdamW)
    data = torch.randint(0, 128, (48, 64), generator=torch.Generator().manual_seed(0))
    config = TrainConfig(
        max_steps=5,
        batch_size=8,
        eval_every=None,
        eval_batches=2,
        output_dir=str(tmp_path / "runs"),
        device="cpu",
    )
    model = tiny_llama()

    def one_run() -> None:
        t = LoRATrainer(model, None, data, lora=LoRAConfig(r=8), config=config)
        assert isinstance(t.run_sync(), RunFinished)

    one_run()  # warm-up: allocator pools, lazy imports, thread pool
    start = _rss()
    for _ in range(10):
        one_run()
    end = _rss()
    assert abs(end - start) <= 0.05 * start, (start, end)
    # and nothing keeps an optimizer (with its state) or gradients alive
    assert len(optimizers) == 11 and all(ref() is None for ref in optimizers)
    assert all(p.grad is None for p in model.parameters())
