"""What a long run costs the network: comm messages and bytes a LoRADashboard sends per second of training.

A run of N steps is fed through the dashboard's own path (``dash.watch(source)``) by a scripted
:class:`~lora_widgets.events.types.RunSource` on a fake clock (``StepMetrics`` every step; every 100 steps an
``EvalMetrics`` with the adapter statistics of the shipped model's 28 adapters and two sample answers, as the
trainer publishes them; a loss spike a third of the way in), so the throttle and decimation decide exactly as in a
live kernel. Every message a widget sends is counted by patching ``ipywidgets.Widget._send`` (JSON part +
binary buffers).

Printed side by side, in one run: the dashboard's policy ("after": one push per second, one point per pixel
column, only changed marks) at 1,000, 10,000 and 100,000 steps, and the policy it replaced ("before": a push
every 0.25 s with up to 2,000 points per line), selectable here only. The budget is at most 10 messages and
20 KB per simulated second, the same at 1k and 100k steps. The "sweep" cases feed a 50-run sweep's events
(issue 22) to a ``SweepView`` on the same fake clock (runs of 200 and of 20 steps); "points_per_line" is then
the longest run's curve and "spike_kept" that every run reached the table.
The "marimo" columns are the same policy with the
dashboard marimo gets (``renderer="svg"``: one anywidget whose charts ``static/charts.js`` draws from the same
chart model).
Run: ``python benchmarks/bench_streaming.py``.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ipywidgets
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_widgets.events.types import EvalMetrics, RunFinished, RunStarted, StepMetrics
from lora_widgets.lora.layers import LoRAConfig
from lora_widgets.sweep.events import SweepEnded, SweepRunEnded, SweepRunStarted, SweepStarted
from lora_widgets.training.config import TrainConfig
from lora_widgets.widget.charts import Charts
from lora_widgets.widget.dashboard import LoRADashboard
from lora_widgets.widget.web_charts import WebCharts
from tests.helpers import FakeLoop, ScriptedRun, scripted_adapter_stats, scripted_samples, tiny_llama

STEPS_PER_S = 50.0  # a small model on a GPU; the shipped model on this CPU does ~5-20
POLICIES = {"after": (LoRADashboard.flush_interval, LoRADashboard.max_points), "before": (0.25, 2000)}
"""(seconds between pushes, points per line): today's dashboard, and the pacing/decimation it replaced."""


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


def events(n_steps: int, gpu: bool = False) -> Any:
    yield RunStarted("r", "/tmp/r", {}, None, "cpu", "CPU", 10_000, 1_500_000, n_steps, 1024, 0.0)
    for i in range(1, n_steps + 1):
        loss = 4.0 * math.exp(-i / n_steps) + 0.1 * math.sin(i) + (5.0 if i == n_steps // 3 else 0.0)
        reserved, util = (400 * 2**20 + 2**20 * (i % 7), 80.0 + i % 13) if gpu else (None, None)
        yield StepMetrics(i, n_steps, i / n_steps, loss, 1e-3, 1.0, 5e4, i / STEPS_PER_S, 1.0,
                          300 * 2**20 + 2**16 * (i % 5), reserved, util)  # fmt: skip
        if i % 100 == 0:
            yield scripted_adapter_stats(i)
            yield EvalMetrics(i, loss, math.exp(loss), loss)
            yield scripted_samples(i)


def simulate(n_steps: int, policy: str, gpu: bool = False, renderer: str = "bqplot") -> dict[str, float]:
    """``renderer="svg"``: the dashboard marimo gets (one anywidget, its charts drawn by charts.js)."""
    dash = LoRADashboard(
        model=tiny_llama(),
        train_data=torch.randint(0, 128, (64, 32)),
        lora=LoRAConfig(r=4),
        train=TrainConfig(max_steps=n_steps, warmup_steps=0, block_size=32),
        renderer=renderer,
    )
    dash.flush_interval, points = POLICIES[policy]
    if renderer == "svg":
        dash.charts = WebCharts(dash.panel, gpu=gpu, points_per_line=points)
    else:
        dash.charts = Charts(gpu=gpu, points_per_line=points)  # a GPU's memory chart has three lines
    loop = FakeLoop()
    dash._flusher.clock, dash._flusher.call_later = loop.time, loop.call_later
    counter = Counter()
    original = ipywidgets.Widget._send

    def send(widget: Any, msg: Any, buffers: Any = None) -> None:
        counter.send(widget, msg, buffers)

    async def watch() -> Any:
        dash.watch(ScriptedRun(events(n_steps, gpu), loop, 1.0 / STEPS_PER_S))
        return await dash.wait()

    ipywidgets.Widget._send = send  # type: ignore[method-assign]
    t0 = time.perf_counter()
    try:
        asyncio.run(watch())
    finally:
        ipywidgets.Widget._send = original  # type: ignore[method-assign]
    wall = time.perf_counter() - t0
    sim_s = n_steps / STEPS_PER_S
    return {
        "steps": n_steps,
        "simulated_s": sim_s,
        "flushes": dash._flusher.flushes,
        "messages": counter.messages,
        "messages_per_s": counter.messages / sim_s,
        "KB_per_s": counter.bytes / 1e3 / sim_s,
        "largest_msg_KB": counter.largest / 1e3,
        "points_per_line": len(raw_y := _raw_loss_y(dash)),
        "spike_kept": float(np.max(raw_y) > 5.0),
        "handler_us_per_step": 1e6 * wall / n_steps,
    }


def sweep_events(n_runs: int, steps: int) -> Any:
    """A sweep's stream as :class:`~lora_widgets.sweep.runner.Sweep` publishes it: per run its own events
    (a step every step, an evaluation every 50) between SweepRunStarted and SweepRunEnded."""
    yield SweepStarted("/tmp/s", ("learning_rate", "r"), n_runs // 2, (0, 1), n_runs)
    for k in range(n_runs):
        lr, r, seed = 10 ** (-4 + 2 * (k // 2) / max(n_runs // 2 - 1, 1)), 2 ** (1 + k % 5), k % 2
        settings = {"learning_rate": lr, "r": r}
        yield SweepRunStarted(k, k // 2, settings, seed, 0, steps, f"run {k}")
        yield RunStarted(f"r{k}", "/tmp/r", {}, None, "cpu", "CPU", 10_000, 1_500_000, steps, 1024, 0.0)
        best = math.inf
        for i in range(1, steps + 1):
            loss = 4.0 * math.exp(-i / steps) + abs(math.log10(lr) + 2.5) + 0.1 * math.sin(i + k)
            yield StepMetrics(i, steps, i / steps, loss, lr, 1.0, 5e4, i / STEPS_PER_S, 1.0, 300 * 2**20)
            if i % 50 == 0 or i == steps:
                best = min(best, loss)
                yield EvalMetrics(i, loss, math.exp(loss), best)
        yield RunFinished(steps, steps / STEPS_PER_S, loss, best, "/tmp/a", "done")
        yield SweepRunEnded(k, k // 2, settings, seed, 0, steps, "finished", steps, steps / STEPS_PER_S, best,
                            loss, f"Finished {steps} steps.", "", None, f"/tmp/r{k}", 120_000)  # fmt: skip
    yield SweepEnded("finished", n_runs, 0, n_runs * steps / STEPS_PER_S, "Sweep finished.", True)


def simulate_sweep(n_runs: int, steps: int) -> dict[str, float]:
    """A SweepView fed a whole sweep on a fake clock; every message counted as for the dashboard."""
    from lora_widgets.sweep import Sweep
    from lora_widgets.widget.sweep_view import SweepView
    from tests.helpers import patterned_batch

    with tempfile.TemporaryDirectory() as tmp:
        sweep = Sweep(tiny_llama(), None, patterned_batch(16, 16), space={"learning_rate": [1e-3], "r": [2]},
                      seeds=[0, 1], directory=tmp, config=TrainConfig(max_steps=steps))  # fmt: skip
    view = SweepView(sweep)
    loop = FakeLoop()
    view._flusher.clock, view._flusher.call_later = loop.time, loop.call_later
    counter = Counter()
    original = ipywidgets.Widget._send
    ipywidgets.Widget._send = lambda w, msg, buffers=None: counter.send(w, msg, buffers)  # type: ignore[method-assign]
    t0 = time.perf_counter()
    try:
        for event in sweep_events(n_runs, steps):
            view._on_event(event)
            if event.kind == "step":
                loop.advance(1.0 / STEPS_PER_S)
    finally:
        ipywidgets.Widget._send = original  # type: ignore[method-assign]
    wall = time.perf_counter() - t0
    sim_s = n_runs * steps / STEPS_PER_S
    return {
        "steps": n_runs * steps,
        "simulated_s": sim_s,
        "flushes": view._flusher.flushes,
        "messages": counter.messages,
        "messages_per_s": counter.messages / sim_s,
        "KB_per_s": counter.bytes / 1e3 / sim_s,
        "largest_msg_KB": counter.largest / 1e3,
        "points_per_line": max(len(view.board.curve(i)) for i in range(n_runs)),
        "spike_kept": float(len(view.rows) == n_runs),  # here: every run is in the table
        "handler_us_per_step": 1e6 * wall / (n_runs * steps),
    }


def _raw_loss_y(dash: LoRADashboard) -> np.ndarray:
    """The raw loss line's y values, from either renderer."""
    charts = dash.charts
    return charts.series["raw_loss"].y if isinstance(charts, WebCharts) else np.asarray(charts.raw_loss.y)


def main() -> None:
    runs = [
        ("before, 10k", simulate(10_000, "before")),
        ("before, 100k", simulate(100_000, "before")),
        ("after, 1k", simulate(1_000, "after")),
        ("after, 10k", simulate(10_000, "after")),
        ("after, 100k", simulate(100_000, "after")),
        ("after, 100k GPU", simulate(100_000, "after", gpu=True)),
        ("after, sweep 50x200", simulate_sweep(50, 200)),  # issue 22: a 50-run sweep in the SweepView
        ("after, sweep 50x20", simulate_sweep(50, 20)),  # short runs: 2.5 runs end per second
        ("marimo, 10k", simulate(10_000, "after", renderer="svg")),
        ("marimo, 100k GPU", simulate(100_000, "after", gpu=True, renderer="svg")),
    ]
    print(f"step rate {STEPS_PER_S:g}/s (fake clock); before: push every {POLICIES['before'][0]} s, "
          f"{POLICIES['before'][1]} points per line; after: push every {POLICIES['after'][0]} s, "
          f"{POLICIES['after'][1]} points per line, only changed marks")  # fmt: skip
    keys = list(runs[0][1])
    width = max(len(k) for k in keys) + 2
    print(" " * width + "".join(f"{name:>17}" for name, _ in runs))
    for k in keys:
        row = "".join(f"{r[k]:>17,.1f}" if isinstance(r[k], float) else f"{r[k]:>17,}" for _, r in runs)
        print(f"{k:<{width}}{row}")
    res = dict(runs)
    b10, a1, a10, a100 = res["before, 10k"], res["after, 1k"], res["after, 10k"], res["after, 100k"]
    print(f"\nafter, 100k/1k per simulated second: messages {a100['messages_per_s'] / a1['messages_per_s']:.2f}x, "
          f"bytes {a100['KB_per_s'] / a1['KB_per_s']:.2f}x; 100k/10k: messages "
          f"{a100['messages_per_s'] / a10['messages_per_s']:.2f}x, bytes {a100['KB_per_s'] / a10['KB_per_s']:.2f}x")  # fmt: skip
    print(f"before/after at 10k steps: messages per second {b10['messages_per_s'] / a10['messages_per_s']:.1f}x, "
          f"bytes per second {b10['KB_per_s'] / a10['KB_per_s']:.1f}x")  # fmt: skip
    m10 = res["marimo, 10k"]
    print(f"marimo (SVG charts)/Jupyter (bqplot) at 10k steps: messages per second "
          f"{m10['messages_per_s'] / a10['messages_per_s']:.2f}x, bytes per second {m10['KB_per_s'] / a10['KB_per_s']:.2f}x")  # fmt: skip
    after = [r for name, r in runs if not name.startswith("before")]
    ok = all(r["messages_per_s"] <= 10 and r["KB_per_s"] <= 20 for r in after)
    print(
        f"budget (<= 10 messages/s and <= 20 KB/s, every 'after' and 'marimo' run): {'met' if ok else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
