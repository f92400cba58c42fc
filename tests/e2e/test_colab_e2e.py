"""The dashboard on Colab's widget stack: ipywidgets 7.7.1, bqplot 0.12.47, anywidget 0.9.21, in the classic Notebook 6.

Colab's front end cannot be run here; the classic Notebook 6 speaks the same ipywidgets-7 protocol and loads the
same widget JavaScript, so it is the closest stand-in (NOTES.md). ``scripts/ci_colab.sh`` builds an environment
with exactly Colab's widget versions and runs these tests there; anywhere else (ipywidgets 8, Notebook 7) they
are skipped, and with ``LORA_WIDGETS_COLAB_JOB=1`` (set by that script) a wrong stack fails instead.

The notebook is run as a Colab user runs one, all cells at once as soon as it opens
(``Jupyter.notebook.execute_all_cells()``). Checked: the dashboard renders, Train advances the charts, a cell
runs while it trains, Stop ends the run, and every chart's axes read right (step axis along the bottom, value
axes up the side, heatmap rows labelled in line with their rows: :mod:`tests.e2e.chart_geometry`) at render,
while training and after Stop; then the same for a transformers ``Trainer`` + PEFT attached in one line.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.chart_geometry import DASHBOARD_X_LABELS, settled_axis_problems
from tests.e2e.conftest import JupyterServer, serve_jupyter, write_notebook
from tests.e2e.test_dashboard_e2e import (
    KNOWN_NOISE,
    dashboard_cell,
    loss_path_length,
    progress_step,
    shoot,
    status,
)
from tests.e2e.test_hf_e2e import hf_cell, raw_loss_path

pytestmark = [pytest.mark.e2e, pytest.mark.colab]

COLAB_WIDGETS = {"ipywidgets": "7.7.1", "bqplot": "0.12.47", "anywidget": "0.9.21"}
"""Colab's widget versions (its published pip freeze, 2026-08 runtime); scripts/ci_colab.sh installs them."""
BLOCKS = ["0", "1", "2", "3"]  # the shipped model's blocks: the heatmap's rows, top to bottom


def _not_colab_stack() -> str | None:
    """Why this environment is not Colab's widget stack in a classic Notebook 6, or None when it is."""
    try:
        found = {name: version(name) for name in [*COLAB_WIDGETS, "notebook"]}
    except PackageNotFoundError as exc:
        return f"{exc.name} is not installed"
    wrong = [f"{n} {found[n]} (Colab: {v})" for n, v in COLAB_WIDGETS.items() if found[n] != v]
    if not found["notebook"].startswith("6."):
        wrong.append(f"notebook {found['notebook']} (the classic front end is notebook<7)")
    return ", ".join(wrong) or None


@pytest.fixture(scope="module")
def notebook6_server(tmp_path_factory: pytest.TempPathFactory, chromium: str) -> Iterator[JupyterServer]:
    """The classic ``jupyter notebook`` (6.x) of this environment, when it has Colab's widget versions."""
    reason = _not_colab_stack()
    if reason is not None:
        message = f"not Colab's widget stack: {reason}; `bash scripts/ci_colab.sh` builds one and runs these"
        if os.environ.get("LORA_WIDGETS_COLAB_JOB") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    with serve_jupyter("notebook6", tmp_path_factory.mktemp("notebook6")) as server:
        yield server


def open_and_run_all(page: Any, server: JupyterServer, notebook: str, timeout_s: float = 90.0) -> None:
    """Open ``notebook`` in Notebook 6 and run all its cells once the kernel is connected.

    An execute sent in the moment before the kernel's channels are up is dropped, so it is sent again until the
    first cell's prompt reads ``In [*]`` or ``In [1]``.
    """
    page.goto(server.notebook7_url(notebook))
    connected = "() => window.Jupyter && Jupyter.notebook && Jupyter.notebook.kernel && Jupyter.notebook.kernel.is_connected()"
    page.wait_for_function(connected, timeout=60_000)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        page.evaluate("() => Jupyter.notebook.execute_all_cells()")
        try:
            page.wait_for_function(
                "() => /\\[(\\*|\\d+)\\]/.test(document.querySelector('#notebook-container .cell .input_prompt').textContent)",
                timeout=5_000,
            )
            return
        except Exception:
            continue
    raise AssertionError(f"the cells never started within {timeout_s:.0f} s")


def timed_tick(page: Any, index: int) -> float:
    """Seconds from executing the trivial cell ``index`` until it has run again and shows ``tick <n>``."""
    cell = f"document.querySelectorAll('#notebook-container .cell')[{index}]"
    before = page.evaluate(f"() => {cell}.querySelector('.input_prompt').textContent")
    t0 = time.perf_counter()
    page.evaluate(f"() => Jupyter.notebook.execute_cells([{index}])")
    page.wait_for_function(
        f"""([before]) => {{
            const prompt = {cell}.querySelector('.input_prompt').textContent;
            const out = {cell}.querySelector('.output_area');
            return prompt !== before && /\\[\\d+\\]/.test(prompt) && out && /^tick \\d+$/.test(out.textContent.trim());
        }}""",
        arg=[before],
        polling=10,
        timeout=30_000,
    )
    return time.perf_counter() - t0


UPSTREAM_BLANK = ("Could not add child view to box", "processPhosphorMessage")
"""What the classic Notebook 6's widget manager (ipywidgets 7) logs when it leaves a box blank: while it loads
the kernel's widgets at start-up, "Run All" creating widgets races it, with or without this package (a plain
VBox of bqplot figures did the same in 1 of 6 runs). A user sees an empty output and runs the cell again."""


def wait_for_dashboard(page: Any, errors: list[str], timeout_s: float = 180.0) -> int:
    """The dashboard's Train button shown and enabled (the model loaded), its six figures drawn.

    When the first cell has finished but its output stayed blank, with :data:`UPSTREAM_BLANK` in the console or
    silently for 20 s (seen once in 8 runs, with no message), the cell is run again, as a user would. Returns how
    many times that was needed.
    """
    reruns, deadline, seen = 0, time.monotonic() + timeout_s, 0

    def upstream() -> int:  # the manager's blank-render errors logged so far
        return sum(any(m in e for m in UPSTREAM_BLANK) for e in errors)

    done = "() => /\\[\\d+\\]/.test(document.querySelector('#notebook-container .cell .input_prompt').textContent)"
    train, finished_at = page.locator(".lw-dash .lw-train"), None
    while not train.is_visible():
        if finished_at is None and page.evaluate(done):
            finished_at = time.monotonic()
            failed = page.locator("#notebook-container .cell").first.locator(".output_error")
            if failed.count():
                raise AssertionError(f"the first cell failed:\n{failed.first.inner_text()[-1500:]}")
        silent = finished_at is not None and time.monotonic() - finished_at > 20 and not train.count()
        if finished_at is not None and (upstream() > seen or silent) and reruns < 2:
            page.wait_for_timeout(3000)  # a late render is not a blank one
            if not train.is_visible():
                finished_at = None
                reruns, seen = reruns + 1, upstream()
                errors.append(f"(re-ran the first cell after a blank render, {reruns})")
                page.evaluate("() => Jupyter.notebook.execute_cells([0])")
                page.wait_for_function(f"() => !({done})()", timeout=30_000)
        if time.monotonic() > deadline:
            raise AssertionError(f"the dashboard did not render within {timeout_s:.0f} s ({reruns} re-runs)")
        page.wait_for_timeout(500)
    page.wait_for_function("() => !document.querySelector('.lw-dash .lw-train').disabled", timeout=30_000)
    page.wait_for_function(
        "() => document.querySelectorAll('.lw-dashboard .bqplot .plotarea_background').length === 6"
    )
    assert status(page) == "idle"
    return reruns


def unexpected_console_errors(errors: list[str], reruns: int) -> list[str]:
    """Console errors that are neither JupyterLab's 404 noise nor, after a blank render, the manager's own."""
    return [
        e for e in errors
        if KNOWN_NOISE not in e and not e.startswith("(re-ran") and not (reruns and any(m in e for m in UPSTREAM_BLANK))
    ]  # fmt: skip


def assert_axes_read_right(page: Any, when: str, heatmap: bool = False) -> None:
    problems = settled_axis_problems(page, DASHBOARD_X_LABELS, heatmap_rows=BLOCKS if heatmap else None)
    assert problems == [], f"{when}: " + "\n".join(problems)


def stop_run(page: Any, limit: int) -> float:
    """Click Stop; seconds until the status reads 'stopped' (which it must within 15 s) at a step below limit."""
    t0 = time.perf_counter()
    page.locator(".lw-dash .lw-stop").click()
    page.wait_for_function(
        "() => document.querySelector('.lw-dash .lw-status')?.dataset.state === 'stopped'", timeout=15_000
    )
    assert 0 < progress_step(page) < limit
    return time.perf_counter() - t0


def _failure(
    page: Any, exc: Exception, shots: Path, server: JupyterServer, errors: list[str]
) -> AssertionError:
    shoot(page, "failure.png", shots)
    cells = page.evaluate(
        "() => [...document.querySelectorAll('#notebook-container .cell')].map(c => c.innerText.slice(-1200))"
    )
    return AssertionError(
        f"{exc}\nscreenshot: {shots / 'failure.png'}\ncells: {cells}\nconsole: {errors}\n"
        f"server log: {server.log_tail(1500)}"
    )


def test_dashboard_trains_and_stops_in_notebook6_with_colabs_widgets(
    notebook6_server: JupyterServer, browser_page: tuple[Any, list[str]], tmp_path: Path
) -> None:
    page, console_errors = browser_page
    config = dashboard_cell(notebook6_server.root / "runs").replace("eval_every=25", "eval_every=10")
    write_notebook(notebook6_server.root / "colab.ipynb", [config, 'print(f"tick {next(_tick)}")'])
    try:
        open_and_run_all(page, notebook6_server, "colab.ipynb")
        reruns = wait_for_dashboard(page, console_errors)
        assert_axes_read_right(page, "rendered")

        page.locator(".lw-dash .lw-train").click()
        page.wait_for_function(
            "() => document.querySelector('.lw-dash .lw-status')?.dataset.state === 'running'"
        )
        page.wait_for_function(
            "() => Number(document.querySelector('.lw-dash .lw-bar')?.dataset.step) >= 3", timeout=60_000
        )
        page.wait_for_function(
            "() => [...document.querySelectorAll('.lw-dashboard .bqplot path.line')].some(p => (p.getAttribute('d') || '').length > 40)",
            timeout=30_000,
        )
        first_step, first_len = progress_step(page), loss_path_length(page)
        busy = timed_tick(page, 1)
        page.wait_for_function(
            f"() => Number(document.querySelector('.lw-dash .lw-bar')?.dataset.step) >= {first_step + 5}",
            timeout=30_000,
        )
        assert loss_path_length(page) > first_len  # the loss line grew
        # the heatmap is drawn at the first evaluation (step 10): 4 blocks x q, v
        page.wait_for_function(
            "() => document.querySelectorAll('.lw-dashboard .heatmapcell').length === 8", timeout=60_000
        )
        page.wait_for_timeout(1200)  # one flush: the detail figure follows
        assert_axes_read_right(page, "training", heatmap=True)
        stop_s = stop_run(page, 400)
        page.wait_for_timeout(500)
        assert_axes_read_right(page, "stopped", heatmap=True)
        shoot(page, "colab-stopped.png", tmp_path)
    except Exception as exc:
        raise _failure(page, exc, tmp_path, notebook6_server, console_errors) from exc
    print(
        f"\nNotebook 6 + Colab widgets: trivial cell while training {busy:.2f} s; Stop to stopped {stop_s:.2f} s; "
        f"first cell re-run after a blank render: {reruns}"
    )
    assert unexpected_console_errors(console_errors, reruns) == [], console_errors


def test_an_attached_hf_trainer_in_notebook6_with_colabs_widgets(
    notebook6_server: JupyterServer, browser_page: tuple[Any, list[str]], tmp_path: Path
) -> None:
    pytest.importorskip("peft")
    page, console_errors = browser_page
    write_notebook(
        notebook6_server.root / "colab_hf.ipynb",
        [hf_cell(notebook6_server.root / "hf-out"), 'print(f"tick {next(_tick)}")'],
    )
    try:
        open_and_run_all(page, notebook6_server, "colab_hf.ipynb")
        reruns = wait_for_dashboard(page, console_errors)
        assert "Trainer settings (read-only" in page.locator(".lw-dash .lw-settings").inner_text()
        assert page.locator(".lw-dash .lw-input:visible").count() == 0
        page.locator(".lw-dash .lw-train").click()
        page.wait_for_function(
            "() => Number(document.querySelector('.lw-dash .lw-bar')?.dataset.step) >= 3", timeout=90_000
        )
        first_step, first_path = progress_step(page), raw_loss_path(page)
        assert first_path  # the logged points are drawn
        busy = timed_tick(page, 1)
        page.wait_for_function(
            f"() => Number(document.querySelector('.lw-dash .lw-bar')?.dataset.step) >= {first_step + 3}",
            timeout=60_000,
        )
        page.wait_for_timeout(1200)  # one flush interval
        assert raw_loss_path(page) != first_path  # the loss line advanced
        assert_axes_read_right(page, "attached trainer, training")
        stop_s = stop_run(page, 2000)
        assert page.locator(".lw-dash .lw-callout", has_text="Stopped").count() >= 1
    except Exception as exc:
        raise _failure(page, exc, tmp_path, notebook6_server, console_errors) from exc
    print(f"\nattached HF trainer, Notebook 6: trivial cell while training {busy:.2f} s; Stop {stop_s:.2f} s; "
          f"re-runs after a blank render: {reruns}")  # fmt: skip
    assert unexpected_console_errors(console_errors, reruns) == [], console_errors
