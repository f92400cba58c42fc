"""What a long run costs the browser: comm messages and bytes a LoRADashboard sends, with a fake clock.

A run of N steps is simulated by feeding ``StepMetrics`` (and an ``EvalMetrics`` every 100 steps) through
the dashboard's own event handler, with time advanced by a fake loop at a fixed step rate, so the
throttle and decimation decide exactly as in a live kernel. Every message a widget sends is counted by
patching ``ipywidgets.Widget._send`` (JSON part + binary buffers).

Printed side by side: a 10,000-step and a 100,000-step run with the dashboard's policy (one flush per
0.25 s, at most 2,000 points per line), and, as the baseline it replaces, the 10,000-step run with a
push after every step (still decimated). Run: ``python benchmarks/bench_streaming.py``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import ipywidgets
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_widgets.events import EvalMetrics, RunFinished, RunStarted, StepMetrics
from lora_widgets.lora import LoRAConfig
from lora_widgets.train_config import TrainConfig
from lora_widgets.widget.dashboard import DashboardRun, LoRADashboard
from lora_widgets.widget.throttle import Throttle
from tests.helpers import FakeLoop, tiny_llama

STEPS_PER_S = 50.0  # a small model on a GPU; the shipped model on this CPU does ~5-20


class Counter:
    def __init__(self) -> None:
        self.messages = 0
        self.bytes = 0
        self.largest = 0

    def send(self, _widget: Any, msg: Any, buffers: Any = None) -> None:
        size = len(json.dumps(msg, default=str)) + sum(memoryview(b).nbytes for b in buffers or [])
        self.messages += 1
        self.bytes += size
        self.largest = max(self.largest, size)


def simulate(n_steps: int, throttled: bool = True) -> dict[str, float]:
    dash = LoRADashboard(
        model=tiny_llama(),
        train_data=torch.randint(0, 128, (64, 32)),
        lora=LoRAConfig(r=4),
        train=TrainConfig(max_steps=n_steps, warmup_steps=0, block_size=32),
    )
    loop = FakeLoop()
    dash._clock = loop.time
    dash._call_later = loop.call_later
    lora, train = dash.current_configs()
    dash.runs.append(DashboardRun(1, "run 1", lora, train, trainer=None))
    if not throttled:
        dash._throttle = Throttle(1e-9)  # a push after every step
    counter = Counter()
    original = ipywidgets.Widget._send

    def send(widget: Any, msg: Any, buffers: Any = None) -> None:
        counter.send(widget, msg, buffers)

    ipywidgets.Widget._send = send  # type: ignore[method-assign]
    t0 = time.perf_counter()
    try:
        dash._on_event(RunStarted("r", "/tmp/r", {}, {}, "cpu", "CPU", 10_000, 1_500_000, n_steps, 1024, 0.0))
        for i in range(1, n_steps + 1):
            loss = 4.0 * math.exp(-i / n_steps) + 0.1 * math.sin(i)
            dash._on_event(
                StepMetrics(i, n_steps, i / n_steps, loss, 1e-3, 1.0, 5e4, i / STEPS_PER_S, 1.0, 300 * 2**20)
            )
            if i % 100 == 0:
                dash._on_event(EvalMetrics(i, loss, math.exp(loss), loss))
            loop.advance(1.0 / STEPS_PER_S)
        dash._on_event(RunFinished(n_steps, n_steps / STEPS_PER_S, 0.1, 0.1, None, "done"))
        dash._end_run(dash.runs[-1])
    finally:
        ipywidgets.Widget._send = original  # type: ignore[method-assign]
    wall = time.perf_counter() - t0
    sim_s = n_steps / STEPS_PER_S
    return {
        "steps": n_steps,
        "simulated_s": sim_s,
        "flushes": dash._throttle.flushes,
        "messages": counter.messages,
        "messages_per_s": counter.messages / sim_s,
        "MB": counter.bytes / 1e6,
        "KB_per_s": counter.bytes / 1e3 / sim_s,
        "largest_msg_KB": counter.largest / 1e3,
        "points_per_line": len(dash.charts.raw_loss.x),
        "handler_us_per_step": 1e6 * wall / n_steps,
    }


def main() -> None:
    runs = [
        ("10k steps, throttled", simulate(10_000)),
        ("100k steps, throttled", simulate(100_000)),
        ("10k steps, push per step", simulate(10_000, throttled=False)),
    ]
    print(f"step rate {STEPS_PER_S:g}/s (fake clock); flush interval {LoRADashboard.flush_interval} s; "
          f"max points per line {LoRADashboard.max_points}")  # fmt: skip
    keys = list(runs[0][1])
    width = max(len(k) for k in keys) + 2
    print(" " * width + "".join(f"{name:>28}" for name, _ in runs))
    for k in keys:
        row = "".join(f"{r[k]:>28,.1f}" if isinstance(r[k], float) else f"{r[k]:>28,}" for _, r in runs)
        print(f"{k:<{width}}{row}")
    a, b, c = (r for _, r in runs)
    print(f"\n100k/10k: messages per simulated second {b['messages_per_s'] / a['messages_per_s']:.2f}x, "
          f"bytes per simulated second {b['KB_per_s'] / a['KB_per_s']:.2f}x, "
          f"largest message {b['largest_msg_KB'] / a['largest_msg_KB']:.2f}x")  # fmt: skip
    print(f"push per step / throttled (10k): messages {c['messages'] / a['messages']:.0f}x, "
          f"bytes {c['MB'] / a['MB']:.0f}x")  # fmt: skip


if __name__ == "__main__":
    main()
