"""The dashboard in marimo, driven through headless Chromium: ``notebooks/marimo/dashboard_walkthrough.py``.

``marimo run`` serves the notebook as an app on 127.0.0.1 (its cells run at once); the test opens it, checks
that the dashboard renders as marimo shows anywidgets (no "Jupyter widgets are not supported" notice, six SVG
charts), clicks Train, sees the loss line drawn and advancing (the points of its SVG path), moves a slider whose
cell answers while the run trains, pauses and resumes, clicks Stop and sees the reactive cell that reads ``board.value["run_state"]``
run again with the saved adapter's path; asking for a GPU on a machine without one stops the notebook with a
callout (``mo.stop``). The MemoryPlanner renders too, and the console stays clean.

With ``LORA_WIDGETS_SCREENSHOT_DIR`` set, the running dashboard's screenshot is also copied to
``docs/img/dashboard_marimo.png``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import _free_port, _missing, stop_process

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "marimo" / "dashboard_walkthrough.py"
NOT_SUPPORTED = "Jupyter widgets are not supported"


@contextlib.contextmanager
def serve_marimo(notebook: Path, log: Path) -> Iterator[str]:
    """``marimo run notebook --headless`` on 127.0.0.1 and a free port, without a token (local only)."""
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    cmd = [sys.executable, "-m", "marimo", "run", str(notebook), "--headless", "--host", "127.0.0.1",
           "--port", str(port), "--no-token"]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=notebook.parent)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"marimo did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.5)
        yield url
    finally:
        stop_process(proc)


@pytest.fixture
def marimo_app(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The walkthrough served from a copy in ``tmp_path`` (its runs are written beside it)."""
    try:
        import marimo  # noqa: F401
    except ImportError:
        _missing("marimo; `pip install marimo` (or the dev extra)")
    copy = tmp_path / NOTEBOOK.name
    shutil.copyfile(NOTEBOOK, copy)
    with serve_marimo(copy, tmp_path / "marimo.log") as url:
        yield url, tmp_path


def loss_points(page: Any) -> int:
    """Points of the loss chart's raw line: its ``data-points``, checked against the path's own commands."""
    path = page.locator("path.lw-line-raw_loss")
    if path.count() == 0:  # an empty chart says "no data yet" and draws no line
        return 0
    points, d = path.evaluate("p => [p.getAttribute('data-points'), p.getAttribute('d')]")  # one redraw's
    n = int(points or 0)
    assert n == 0 or len(re.findall(r"[ML]", d)) == n, (n, d[:200])
    return n


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_the_dashboard_trains_and_stops_in_marimo(
    marimo_app: tuple[str, Path], browser_page: tuple[Any, list[str]], tmp_path: Path
) -> None:
    url, root = marimo_app
    page, console_errors = browser_page
    page.set_viewport_size({"width": 1400, "height": 3200})  # everything on screen: marimo scrolls inside
    keep_dir = os.environ.get("LORA_WIDGETS_SCREENSHOT_DIR")
    shots = Path(keep_dir) if keep_dir else tmp_path / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    try:
        _session(page, url, root, shots, keep_dir)
    except Exception as exc:
        page.screenshot(path=str(shots / "marimo-failure.png"))
        log = (root / "marimo.log").read_text(errors="replace")[-2000:]
        raise AssertionError(f"{exc}\nscreenshot: {shots / 'marimo-failure.png'}\nconsole: {console_errors}\n"
                             f"server log: {log}") from exc  # fmt: skip
    assert not [e for e in console_errors if "404" not in e], console_errors


def _session(page: Any, url: str, root: Path, shots: Path, keep_dir: str | None) -> None:
    page.goto(url)
    train, status = page.locator(".lw-train"), page.locator(".lw-status")
    train.wait_for(timeout=180_000)  # marimo runs every cell: the model and the data load first
    assert page.locator("svg.lw-chart").count() == 6  # loss, LR, memory, throughput, heatmap, detail
    assert page.get_by_text(NOT_SUPPORTED).count() == 0
    page.get_by_text("Waiting for a run to end").wait_for(timeout=30_000)  # the reactive cell, before a run
    page.locator(".lw-planner").first.wait_for(timeout=30_000)  # MemoryPlanner renders in marimo too
    assert loss_points(page) == 0

    train.click()
    wait_for(lambda: status.text_content() == "running", 30, "status 'running'")
    first = wait_for(lambda: loss_points(page) >= 3, 120, "the loss line to be drawn")
    later = wait_for(lambda: (n := loss_points(page)) > first and n, 60, "the loss line to advance")

    probe = page.locator("#lw-probe")
    before = probe.text_content() or ""
    assert before.startswith("r = 8"), before
    page.locator("[role=slider]").first.focus()
    page.keyboard.press("ArrowRight")
    wait_for(lambda: (probe.text_content() or "").startswith("r = 9"), 20, "the slider's cell while training")
    assert status.text_content() == "running"  # the run kept going while that cell ran
    wait_for(
        lambda: loss_points(page) > max(later, 24), 90, "the loss line to advance after the other cell ran"
    )
    _screenshot(page, shots / "marimo-running.png", keep_dir)

    pause = page.locator(".lw-pause")
    pause.click()
    wait_for(lambda: status.text_content() == "paused", 30, "status 'paused'")
    held = loss_points(page)
    time.sleep(3)
    assert loss_points(page) == held  # held between two steps
    pause.click()  # now "Resume"
    wait_for(lambda: status.text_content() == "running", 30, "status 'running' again")

    page.locator(".lw-stop").click()
    wait_for(lambda: status.text_content() == "stopped", 60, "status 'stopped'")
    done = page.get_by_text("the adapter is in")
    done.wait_for(timeout=30_000)  # the cell that reads board.value["run_state"] ran again
    adapter = re.search(r"`?(/\S+/adapter)`?", done.text_content() or "")
    assert adapter and Path(adapter.group(1)).is_relative_to(root)
    assert (Path(adapter.group(1)) / "adapter_model.safetensors").is_file()

    import torch

    if not torch.cuda.is_available():  # ask for the GPU this machine lacks: mo.stop shows the callout
        page.locator("select").first.select_option(label="GPU (CUDA)")
        page.get_by_text("No GPU found.").wait_for(timeout=30_000)
        assert page.locator(".lw-train").count() == 0  # the cells under it did not run


def _screenshot(page: Any, path: Path, keep_dir: str | None) -> None:
    """The dashboard (panel and charts) while it trains; kept in docs/img/ when screenshots are kept."""
    top = page.locator(".lw-dash").bounding_box()
    bottom = page.locator(".lw-charts").bounding_box()
    clip = {"x": top["x"] - 4, "y": top["y"] - 4, "width": top["width"] + 8,
            "height": bottom["y"] + bottom["height"] - top["y"] + 8}  # fmt: skip
    page.screenshot(path=str(path), clip=clip)
    if keep_dir:
        shutil.copyfile(path, ROOT / "docs" / "img" / "dashboard_marimo.png")
