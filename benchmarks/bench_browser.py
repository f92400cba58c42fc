"""What a long run costs the *browser*: JavaScript heap and DOM size of a live dashboard, 1k to 40k steps.

``bench_streaming.py`` counts what the kernel sends; this measures what the page keeps. A real JupyterLab
on 127.0.0.1 and Debian's headless Chromium (as in the e2e tests) show a ``LoRADashboard`` while a cell
replays simulated training steps into it (``dash.replay(events, interval=...)``) at a fixed real-time rate,
so the throttle and decimation act exactly as in a live run (an evaluation every 100 steps). At 1,000, 10,000,
20,000 and 40,000 steps the
page's garbage is collected (Chrome DevTools Protocol ``HeapProfiler.collectGarbage``) and the used JS
heap (``Runtime.getHeapUsage``), the number of DOM elements and the loss line's path length are read.

A bounded dashboard keeps these flat however long the run; a chart that appended every point (or re-created
its figure) would grow with the step count. Lines are decimated to ``max_points``; validation dots (three
SVG elements each) grow until ``max_markers`` and then stay there. Ratios are against the first sample.

Needs ``/usr/bin/chromium`` (``apt-get install -y chromium``) and the dev install.
Run: ``python benchmarks/bench_browser.py [--steps-per-s 800]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.conftest import CHROMIUM_FLAGS, chromium_path, serve_jupyter, write_notebook

CHECKPOINTS = (1_000, 10_000, 20_000, 40_000)

SETUP = """\
import math, torch
from lora_widgets import LoRAConfig, LoRADashboard, TrainConfig
from lora_widgets.events.types import EvalMetrics, RunStarted, StepMetrics
from tests.helpers import tiny_llama

N = {n}
dash = LoRADashboard(model=tiny_llama(), train_data=torch.randint(0, 128, (64, 32)), lora=LoRAConfig(r=4),
                     train=TrainConfig(max_steps=N, warmup_steps=0, block_size=32, output_dir={out!r}))

def events(rate):
    yield RunStarted("r", "/tmp/r", {{}}, None, "cpu", "CPU", 10_000, 1_500_000, N, 1024, 0.0)
    for i in range(1, N + 1):
        loss = 4.0 * math.exp(-i / N) + 0.1 * math.sin(i)
        yield StepMetrics(i, N, i / N, loss, 1e-3, 1.0, 5e4, i / rate, 1.0, 300 * 2**20)
        if i % 100 == 0:
            yield EvalMetrics(i, loss, math.exp(loss), loss)
dash
"""


def sample(page: Any, cdp: Any) -> dict[str, float]:
    cdp.send("HeapProfiler.collectGarbage")
    heap = cdp.send("Runtime.getHeapUsage")
    dom, path, dots = page.evaluate(
        """() => [document.getElementsByTagName('*').length,
                  Math.max(0, ...[...document.querySelectorAll('.lw-dashboard .bqplot path.line')]
                                 .map(p => (p.getAttribute('d') || '').length)),
                  document.querySelectorAll('.lw-dashboard .bqplot path.dot').length]"""
    )
    step = int(page.locator(".lw-dash .lw-bar").get_attribute("data-step") or 0)
    return {
        "step": step,
        "js_heap_MB": heap["usedSize"] / 2**20,
        "dom_elements": dom,
        "loss_path_chars": path,
        "validation_dots": dots,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-per-s", type=float, default=800.0)
    args = parser.parse_args()
    chromium = chromium_path()
    if chromium is None:
        sys.exit("needs Chromium: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp, serve_jupyter("lab", Path(tmp)) as server:
        write_notebook(
            server.root / "bench.ipynb",
            [
                SETUP.format(n=CHECKPOINTS[-1], out=str(Path(tmp) / "runs")),
                f"task = dash.replay(list(events({args.steps_per_s})), interval=1 / {args.steps_per_s})",
            ],
        )
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 2000})
            cdp = page.context.new_cdp_session(page)
            page.goto(server.lab_url("bench.ipynb"))
            page.wait_for_selector(".jp-Notebook .jp-Cell .cm-content", timeout=60_000)
            deadline = time.monotonic() + 90
            idle = "() => [...document.querySelectorAll('.jp-StatusBar-TextItem')].some(e => /\\| Idle/.test(e.textContent))"
            while not page.evaluate(idle) and time.monotonic() < deadline:
                page.wait_for_timeout(200)
            for index in (0, 1):
                page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".cm-content").click()
                page.keyboard.press("Shift+Enter")
                if index == 0:
                    page.locator(".lw-dash .lw-train").wait_for(state="visible", timeout=120_000)
            samples = []
            for target in CHECKPOINTS:
                page.wait_for_function(
                    f"() => Number(document.querySelector('.lw-dash .lw-bar').dataset.step) >= {target}",
                    timeout=600_000,
                    polling=100,
                )
                samples.append(sample(page, cdp))
            browser.close()
    first = samples[0]
    print(f"simulated steps fed at {args.steps_per_s:g}/s; sampled after a forced GC")
    print(f"{'steps':>8}{'JS heap (MB)':>15}{'DOM elements':>15}{'val dots':>10}{'loss path chars':>17}"
          f"{'heap x':>9}{'DOM x':>8}")  # fmt: skip
    for s in samples:
        print(f"{s['step']:>8,}{s['js_heap_MB']:>15.1f}{s['dom_elements']:>15,}{s['validation_dots']:>10,}"
              f"{s['loss_path_chars']:>17,}{s['js_heap_MB'] / first['js_heap_MB']:>9.2f}"
              f"{s['dom_elements'] / first['dom_elements']:>8.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
