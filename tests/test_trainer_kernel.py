"""The LoRATrainer as a background task in a real IPython kernel: other cells run while it trains, stop() works."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

jupyter_client = pytest.importorskip("jupyter_client")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def running_kernel() -> Iterator[Any]:
    """A real IPython kernel started in the repository (so ``tests.helpers`` imports), ready; its client."""
    km = jupyter_client.KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(REPO))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)
        yield kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def _run_cell(kc: Any, code: str) -> str:
    """Execute ``code`` and return its stdout; fail on an error reply."""
    chunks: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream":
            chunks.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            chunks.append("\n".join(msg["content"]["traceback"]))

    reply = kc.execute_interactive(code, timeout=120, output_hook=hook)
    assert reply["content"]["status"] == "ok", "".join(chunks)
    return "".join(chunks).strip()


def test_training_task_in_a_kernel(tmp_path: Path) -> None:
    with running_kernel() as kc:
        _run_cell(
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
        first: int | None = None  # steps seen by the first cell that saw any
        latest = 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            state, n = _run_cell(kc, "print(t.state, len(steps))").split()
            assert state == "running"
            latest = int(n)
            if first is None and latest > 0:
                first = latest
            elif first is not None and latest > first:
                break  # it progressed between two of our cells
            time.sleep(0.1)
        assert first is not None and latest > first, (first, latest)
        out = _run_cell(kc, "t.stop()\nend = await task\nprint(end.kind, t.state, end.step >= len(steps))")
        assert out == "stopped stopped True"
