"""The sweep view: a 3 x 2 grid with two seeds on the shipped model, started from the dashboard, live."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from lora_widgets import EarlyStopping, LoRAConfig, TrainConfig, load_base_model
from lora_widgets.widget.dashboard import LoRADashboard
from lora_widgets.widget.sweep_state import CURVE_POINTS
from lora_widgets.widget.sweep_static import log_axis, scatter_svg, table_html
from lora_widgets.widget.sweep_view import SweepView
from tests.test_sweep import _FakeTrainer, _sweep

STATIC = Path(__file__).resolve().parents[1] / "lora_widgets" / "widget" / "static"


def test_a_3x2_grid_with_two_seeds_runs_from_the_dashboard_while_the_loop_stays_free(tmp_path: Path) -> None:
    model, tokenizer = load_base_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train = TrainConfig(max_steps=6, batch_size=4, eval_every=2, eval_batches=2, warmup_steps=0, block_size=64,
                        adapter_stats=False, sample_prompts=(), device="cpu", output_dir=str(tmp_path),
                        early_stopping=EarlyStopping(patience=3))  # fmt: skip
    # patience 3 of evaluations at steps 2, 4, 6: a sound rate always finishes (with 2, an unlucky 8-block validation
    # set could stop one at step 4); a rate of 0.5 diverges and stops before step 6 either way
    dash = LoRADashboard(model, tokenizer, "python-docs", lora=LoRAConfig(r=4, alpha=8), train=train)
    view = SweepView.from_dashboard(dash, {"r": [2, 4, 8], "learning_rate": [3e-3, 0.5]}, seeds=[0, 1],
                                directory=tmp_path / "sweep")  # fmt: skip
    sent: list[Any] = []
    view.send = lambda content, buffers=None: sent.append(content)  # type: ignore[method-assign]
    seen_rows: list[int] = []
    view.observe(lambda change: seen_rows.append(len(change["new"])), names=["rows"])

    async def main() -> tuple[Any, int, float]:
        ticks, worst, t0 = 0, 0.0, time.perf_counter()
        task = view.start()
        with pytest.raises(RuntimeError, match="already running"):
            view.start()
        last = time.perf_counter()
        while not task.done():  # another cell's work, meanwhile
            await asyncio.sleep(0.02)
            now = time.perf_counter()
            ticks, worst, last = ticks + 1, max(worst, now - last), now
        print(
            f"\n12 runs in {time.perf_counter() - t0:.1f} s; loop ticked {ticks} times, longest gap {worst:.2f} s"
        )
        rows = await view.wait()
        view._on_msg(
            view, {"type": "select", "index": 0}, []
        )  # a clicked row: the run's charts in the dashboard
        await dash.wait()
        return rows, ticks, worst

    rows, ticks, _worst = asyncio.run(main())
    assert ticks > 50  # the loop stayed free (the steps run in a worker thread)
    assert len(rows) == 12 and len(view.rows) == 12
    # the table filled in while the sweep ran (several partial tables seen between loop ticks), never shrinking
    partial = sorted({n for n in seen_rows if 0 < n < 12})
    assert len(partial) >= 3 and seen_rows == sorted(seen_rows), seen_rows
    too_high = [r for r in view.rows if r["settings"]["learning_rate"] == 0.5]
    assert all(r["outcome"] == "early_stopped" and r["step"] < 6 for r in too_high)
    assert all(r["outcome"] == "finished" and r["step"] == 6 for r in view.rows if r not in too_high)
    assert all(r["std_val"] is not None for r in view.rows)  # spread over the two seeds
    best = next(r for r in view.rows if r["index"] == view.best_index)
    assert best["settings"]["learning_rate"] == 3e-3 and view.state == "finished"
    curves = {k: c for m in sent if m["type"] == "curves" for k, c in m["curves"].items()}
    assert sorted(map(int, curves)) == list(range(12)) and all(
        0 < len(c) <= CURVE_POINTS for c in curves.values()
    )
    html = view.static_html()
    assert html.count("<tr") == 13 and "<svg" in html and "learning_rate (log scale)" in html
    shown = dash.runs[-1]
    assert (
        list(shown.history.step) == [1, 2, 3, 4, 5, 6] and shown.result is not None and shown.result.step == 6
    )
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # bit-identical base
    assert model.state_dict().keys() == before.keys()


def test_the_page_buttons_skip_and_stop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sweep = _sweep(tmp_path, space={"r": [2, 4, 8]})
    sweep.trainer_factory = _FakeTrainer
    view = SweepView(sweep)
    written: list[tuple[dict[str, str], str]] = []
    monkeypatch.setattr("lora_widgets.widget.sweep_view.update_display",
                        lambda data, raw, display_id: written.append((data, display_id)))  # fmt: skip
    view._display_id = "sweep-summary"  # as _ipython_display_ leaves it

    async def main() -> None:
        _FakeTrainer.hold = True
        task = view.start()
        await asyncio.sleep(0.05)
        view._on_msg(view, {"type": "skip"}, [])  # what the "Skip this run" button sends
        await asyncio.sleep(0.05)
        view._on_msg(view, {"type": "stop"}, [])  # "Stop sweep"
        await task

    try:
        asyncio.run(main())
    finally:
        _FakeTrainer.hold = False
    assert [r["outcome"] for r in view.rows] == ["skipped"] and view.state == "stopped"
    data, display_id = written[-1]  # the saved notebook's table, written when the sweep ended
    assert (
        display_id == "sweep-summary"
        and "skipped" in data["text/html"]
        and "Sweep stopped" in data["text/html"]
    )


def test_the_static_summary_table_and_scatter() -> None:
    rows = [
        {"index": i, "point": i, "settings": {"learning_rate": lr, "target_modules": ["q_proj"]}, "seed": 0,
         "rung": 0, "best_val": v, "mean_val": v, "std_val": None, "step": 10, "max_steps": 10, "elapsed_s": 1.0,
         "adapter_bytes": 2048, "outcome": "failed" if v is None else "finished", "reason": "oom" if v is None else "",
         "message": "<boom>"}
        for i, (lr, v) in enumerate([(1e-4, 3.0), (1e-3, 2.5), (1e-2, None)])
    ]  # fmt: skip
    html = table_html(rows, 1, "done")
    assert "font-weight:bold" in html.split("<tr")[3] and "failed (oom)" in html and "&lt;boom&gt;" in html
    svg = scatter_svg(rows, "learning_rate", 1)
    assert svg.count("<circle") == 2 and "(log scale)" in svg  # the failed run has no loss to plot
    assert scatter_svg(rows, "target_modules", 1) == ""  # not numeric: no scatter
    assert log_axis("r", [4, 128]) and not log_axis("r", [4, 8]) and log_axis("learning_rate", [1e-3, 2e-3])


def test_the_board_shows_what_a_resumed_sweep_reused(tmp_path: Path) -> None:
    from lora_widgets.sweep.events import SweepStarted
    from lora_widgets.widget.sweep_state import SweepBoard

    first = _sweep(tmp_path)
    first.trainer_factory = _FakeTrainer
    first.run_sync()
    again = _sweep(tmp_path)
    again.trainer_factory = _FakeTrainer
    board, shown = SweepBoard(), []

    def on(event: Any) -> None:
        board.on_event(event)
        if isinstance(event, SweepStarted):
            shown.append(board.message)  # what the view's status line says while the sweep runs

    again.subscribe(on)
    again.run_sync()
    note = f"resumed 2 of 2 runs from {tmp_path / 'sweep'}"
    assert shown == [note] and f"({note})" in board.message and len(board.rows) == 2  # and at the end


# -- the view in a real browser, without Jupyter: a fake anywidget model drives sweep.js --------------------

_PAGE = """<!doctype html><html><head><meta charset="utf-8"><style>{css}</style></head><body>
<div id="root"></div>
<script type="module">
const state = {state};
const handlers = {{}};
window.sent = []; window.msgs = [];
const model = {{
  get: (k) => state[k],
  set: (k, v) => {{ window.sent.push([k, v]); window.update(k, v); }},
  save_changes: () => {{}},
  send: (m) => window.msgs.push(m),
  on: (ev, f) => {{ (handlers[ev] = handlers[ev] || []).push(f); }},
}};
window.update = (k, v) => {{ state[k] = v; (handlers["change:" + k] || []).forEach((f) => f()); }};
window.custom = (m) => (handlers["msg:custom"] || []).forEach((f) => f(m));
const mod = await import("data:text/javascript;base64,{js}");
mod.default.render({{ model, el: document.getElementById("root") }});
window.ready = true;
</script></body></html>"""


def _board_state() -> tuple[dict[str, Any], dict[str, Any]]:
    from lora_widgets.events import StepMetrics
    from lora_widgets.sweep.events import SweepRunEnded, SweepRunStarted, SweepStarted
    from lora_widgets.widget.sweep_state import SweepBoard

    board = SweepBoard()
    board.on_event(SweepStarted("/s", ("learning_rate", "r"), 3, (0,), 3))
    for k, (lr, val) in enumerate([(1e-4, 3.0), (1e-3, 2.5), (1e-1, None)]):
        board.on_event(SweepRunStarted(k, k, {"learning_rate": lr, "r": 4}, 0, 0, 10, f"run {k}"))
        for i in range(1, 11):
            board.on_event(StepMetrics(i, 10, 0.0, 4.0 - i * 0.1 * (k + 1), lr, 1.0, 1.0, 0.0, 0.0, 0))
        board.on_event(SweepRunEnded(k, k, {"learning_rate": lr, "r": 4}, 0, 0, 10,
                                     "failed" if val is None else "finished", 10, 1.0, val, 3.0,
                                     "out of memory" if val is None else "done", "oom" if val is None else "",
                                     None, f"/r{k}", 4096))  # fmt: skip
    state = {"rows": board.rows, "settings": ["learning_rate", "r"], "scatter_setting": "learning_rate",
             "best_index": board.best_index, "live": {}, "state": "running", "message": ""}  # fmt: skip
    curves = {str(k): board.curve(k) for k in range(3)}
    return state, curves


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Chromium (apt-get install chromium)")
def test_the_page_sorts_highlights_overlays_and_sends_the_buttons(tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    state, curves = _board_state()
    js = base64.b64encode((STATIC / "sweep.js").read_bytes()).decode()
    page_file = tmp_path / "sweep.html"
    page_file.write_text(_PAGE.format(css=(STATIC / "sweep.css").read_text(), state=json.dumps(state), js=js))
    errors: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=shutil.which("chromium"), args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(page_file.as_uri())
        page.wait_for_function("window.ready === true", timeout=10_000)
        assert page.evaluate("window.msgs") == [{"type": "curves"}]  # asks for the finished curves once
        page.evaluate(f"window.custom({{type: 'curves', curves: {json.dumps(curves)}}})")
        rows = page.locator(".lw-sweep-table tr[data-index]")
        assert rows.count() == 3
        assert page.locator("tr.lw-sweep-best").get_attribute("data-index") == "1"
        assert (
            page.locator(".lw-sweep-line").count() == 3 and page.locator(".lw-sweep-line.best").count() == 1
        )
        assert (
            page.locator(".lw-sweep-dot").count() == 2
            and "log scale" in page.locator(".lw-sweep-scatter").inner_text()
        )
        page.click("th[data-key=best_val]")  # sort by best validation loss, then descending
        assert [rows.nth(i).get_attribute("data-index") for i in range(3)] == ["1", "0", "2"]
        page.click("th[data-key=best_val]")
        assert [rows.nth(i).get_attribute("data-index") for i in range(3)] == ["0", "1", "2"]  # missing last
        page.click("tr[data-index='0']")
        assert page.locator(".lw-sweep-line.selected").count() == 1
        page.click(".lw-sweep-skip")
        page.click(".lw-sweep-stop")
        assert page.evaluate("window.msgs")[1:] == [
            {"type": "select", "index": 0},
            {"type": "skip"},
            {"type": "stop"},
        ]
        page.select_option(".lw-sweep-setting", "r")
        assert ["scatter_setting", "r"] in page.evaluate("window.sent")
        page.evaluate("window.update('state', 'finished')")
        assert page.locator(".lw-sweep-stop").is_disabled()
        browser.close()
    assert errors == []


def test_a_sweep_after_a_dashboard_run_replaces_its_adapters_but_refuses_your_own(tmp_path: Path) -> None:
    from lora_widgets import apply_lora
    from lora_widgets.lora import has_lora
    from tests.helpers import patterned_batch, tiny_llama

    model = tiny_llama()
    train = TrainConfig(max_steps=2, batch_size=4, warmup_steps=0, eval_every=None, adapter_stats=False,
                        sample_prompts=(), device="cpu", output_dir=str(tmp_path))  # fmt: skip
    dash = LoRADashboard(model, None, patterned_batch(32, 16), lora=LoRAConfig(r=2), train=train)

    async def main() -> Any:
        dash.start()
        return await dash.wait()

    end = asyncio.run(main())
    assert has_lora(model) and end is not None and end.adapter_path is not None  # saved in its run directory
    view = SweepView.from_dashboard(dash, {"r": [2, 4]}, directory=tmp_path / "s")
    assert not has_lora(model) and view.sweep.lora.r == 2 and view.settings == ["r"]
    mine = tiny_llama()
    apply_lora(mine, LoRAConfig(r=2))
    dash2 = LoRADashboard(mine, None, patterned_batch(32, 16), train=train)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        SweepView.from_dashboard(dash2, {"r": [2]}, directory=tmp_path / "s2")
