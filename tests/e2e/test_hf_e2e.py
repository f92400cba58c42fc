"""``LoRADashboard(trainer=hf_trainer)`` in a real JupyterLab, driven through headless Chromium.

A notebook cell builds a transformers ``Trainer`` around a PEFT model of the shipped base model (a few hundred
blocks of the fine-tuning corpus) and attaches the dashboard in one line. Clicking Train runs ``train()`` in the
background: the read-only settings table is shown instead of the inputs, the loss line advances, a trivial cell
executes meanwhile, and Stop ends the run.

With ``LORA_WIDGETS_SCREENSHOT_DIR`` set, the running dashboard's screenshot is also copied to
``docs/img/dashboard_hf.png``.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import JupyterServer, write_notebook
from tests.e2e.test_dashboard_e2e import (
    KNOWN_NOISE,
    _cell,
    progress_step,
    run_cell,
    shoot,
    status,
    timed_trivial_cell,
    wait_for_idle_kernel,
)

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def hf_cell(out_dir: Path) -> str:
    """A user's own HF Trainer + PEFT on the shipped model, then the one line that attaches the dashboard."""
    return (
        "import itertools\n"
        "_tick = itertools.count()\n"
        "import peft, transformers\n"
        "from lora_widgets import LoRADashboard, load_base_model, load_corpus\n"
        "from lora_widgets.data import pack_blocks\n"
        "model, tokenizer = load_base_model()\n"
        "model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=['q_proj', 'v_proj']))\n"
        "blocks = pack_blocks(load_corpus('finetune'), tokenizer, 64)[:300]  # [300, 64]\n"
        f"args = transformers.TrainingArguments(output_dir={str(out_dir)!r}, max_steps=2000, "
        "per_device_train_batch_size=4, logging_steps=1, learning_rate=1e-3, lr_scheduler_type='cosine', "
        "warmup_steps=20, save_strategy='no', report_to='none', use_cpu=True)\n"
        "hf_trainer = transformers.Trainer(model=model, args=args, "
        "train_dataset=[{'input_ids': b, 'labels': b} for b in blocks])\n"
        "LoRADashboard(trainer=hf_trainer)"
    )


def raw_loss_path(page: Any) -> str:
    """The ``d`` of the longest line in the loss figure (the raw loss): it changes as points are added."""
    return str(
        page.evaluate(
            """() => {
                const fig = document.querySelector('.lw-dashboard .bqplot');
                let best = '';
                for (const p of fig ? fig.querySelectorAll('path.line') : []) {
                    const d = p.getAttribute('d') || '';
                    if (d.length > best.length) best = d;
                }
                return best;
            }"""
        )
    )


def test_an_attached_hf_trainer_trains_and_stops_in_jupyterlab(
    jupyter_server: JupyterServer, browser_page: tuple[Any, list[str]], tmp_path: Path
) -> None:
    page, console_errors = browser_page
    keep_dir = os.environ.get("LORA_WIDGETS_SCREENSHOT_DIR")
    shots = Path(keep_dir) if keep_dir else tmp_path / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    write_notebook(
        jupyter_server.root / "hf.ipynb",
        [hf_cell(jupyter_server.root / "hf-out"), 'print(f"tick {next(_tick)}")'],
    )
    try:
        page.goto(jupyter_server.lab_url("hf.ipynb"))
        page.wait_for_selector(".jp-Notebook .jp-Cell .cm-content", timeout=60_000)
        wait_for_idle_kernel(page)
        run_cell(page, 0)
        train = page.locator(".lw-dash .lw-train")
        train.wait_for(state="visible", timeout=120_000)
        page.wait_for_function("() => !document.querySelector('.lw-dash .lw-train').disabled", timeout=30_000)
        assert status(page) == "idle"
        # read-only: the trainer's settings as a table, no inputs
        settings = page.locator(".lw-dash .lw-settings")
        assert settings.is_visible() and "Trainer settings (read-only" in settings.inner_text()
        assert "per_device_train_batch_size" in settings.inner_text()
        # no setting to edit (the data view's index box stays hidden: an attached trainer's data is not ours)
        assert page.locator(".lw-dash .lw-input:visible").count() == 0
        assert page.locator(".lw-dash .lw-callout", has_text="Attached to your Trainer").count() == 1

        train.click()
        page.wait_for_function(
            "() => document.querySelector('.lw-dash .lw-status').dataset.state === 'running'"
        )
        page.wait_for_function(
            "() => Number(document.querySelector('.lw-dash .lw-bar').dataset.step) >= 3", timeout=90_000
        )
        first_step, first_path = progress_step(page), raw_loss_path(page)
        assert first_path  # the logged points are drawn
        busy = timed_trivial_cell(page, 0)  # the kernel is free while train() runs in its worker thread
        page.wait_for_function(
            f"() => Number(document.querySelector('.lw-dash .lw-bar').dataset.step) >= {first_step + 3}",
            timeout=60_000,
        )
        page.wait_for_timeout(1200)  # one flush interval: the marks follow the progress bar
        assert raw_loss_path(page) != first_path  # the loss line advanced
        assert "tokens/s" in page.locator(".lw-dash .lw-progress-text").inner_text()
        running = shoot(page, "hf-running.png", shots, element=_cell(page, 0).locator(".lw-dashboard").first)
        if keep_dir:
            shutil.copyfile(running, ROOT / "docs" / "img" / "dashboard_hf.png")

        t0 = time.perf_counter()
        page.locator(".lw-dash .lw-stop").click()
        page.wait_for_function(
            "() => document.querySelector('.lw-dash .lw-status').dataset.state === 'stopped'", timeout=15_000
        )
        stop_s = time.perf_counter() - t0
        assert 0 < progress_step(page) < 2000
        assert page.locator(".lw-dash .lw-callout", has_text="Stopped").count() >= 1
    except Exception as exc:
        shoot(page, "hf-failure.png", shots)
        outputs = page.evaluate(
            "() => [...document.querySelectorAll('.jp-Notebook .jp-Cell')].map(c => c.innerText.slice(-1500))"
        )
        raise AssertionError(
            f"{exc}\nscreenshot: {shots / 'hf-failure.png'}\ncells: {outputs}\nconsole: {console_errors}\n"
            f"server log: {jupyter_server.log_tail(1500)}"
        ) from exc
    print(f"\ntrivial cell while training: {busy:.2f} s; Stop to stopped: {stop_s:.2f} s")
    other = [e for e in console_errors if KNOWN_NOISE not in e]
    assert other == [], console_errors
