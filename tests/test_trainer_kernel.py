"""The LoRATrainer as a background task in a real IPython kernel: other cells run while it trains, stop() works."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("jupyter_client")
pytest.importorskip("ipykernel")

from tests.kernel import assert_progresses_between_cells, run_cell, running_kernel


def test_training_task_in_a_kernel(tmp_path: Path) -> None:
    with running_kernel() as kc:
        run_cell(
            kc,
            f"""
import asyncio, torch
from tests.helpers import tiny_llama
from lora_widgets.lora.layers import LoRAConfig
from lora_widgets.training.config import TrainConfig
from lora_widgets.training.trainer import LoRATrainer
cfg = TrainConfig(max_steps=100_000, batch_size=4, eval_every=None, val_fraction=0.0,
                  output_dir={str(tmp_path)!r}, device="cpu")
t = LoRATrainer(tiny_llama(), None, torch.randint(0, 128, (64, 32)), lora=LoRAConfig(r=4), config=cfg)
steps = []
t.subscribe(lambda e: steps.append(e.step) if e.kind == "step" else None)
task = asyncio.get_event_loop().create_task(t.run())
""",
        )
        # The cell above returned while the run goes on: later cells execute and see it progress.
        assert_progresses_between_cells(kc, "print(t.state, len(steps))")
        out = run_cell(kc, "t.stop()\nend = await task\nprint(end.kind, t.state, end.step >= len(steps))")
        assert out == "stopped stopped True"
