"""``LoRADashboard(trainer=hf_trainer)``: a transformers ``Trainer`` / TRL ``SFTTrainer`` in the dashboard.

Real libraries, offline, tiny models from configs (as in ``tests/test_hf_bridge.py``): the charts receive the
logged points, Stop/Pause/Resume act through the attached source, failures end in the failure callout, the
trainer's settings are shown read-only and the logging advice before the run starts.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lora_widgets import LoRADashboard  # noqa: E402
from lora_widgets.hf import HFRun, describe_settings  # noqa: E402
from lora_widgets.lora.layers import count_parameters  # noqa: E402
from lora_widgets.widget import readouts  # noqa: E402
from tests.helpers import tiny_llama  # noqa: E402
from tests.test_hf_bridge import CHAT_TEMPLATE, _FailingTrainer, _hf_trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _logged(hf: Any, key: str) -> tuple[list[int], list[float]]:
    rows = [h for h in hf.state.log_history if key in h and "loss" in h]
    return [int(h["step"]) for h in rows], [float(h[key]) for h in rows]


def _callout(dash: LoRADashboard, title_part: str) -> dict[str, Any] | None:
    return next((c for c in dash.panel.callouts if title_part in c["title"]), None)


async def _until(condition: Any, timeout: float = 120.0) -> None:
    """Let the loop run (the worker trains meanwhile) until ``condition()`` holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


def _step_now(dash: LoRADashboard) -> int:
    last = dash.history.last_step if dash.history is not None else None
    return 0 if last is None else int(last.step)


def test_train_charts_the_logged_points_and_previews_the_schedule(tmp_path: Path) -> None:
    hf = _hf_trainer(tmp_path, max_steps=8, logging_steps=2, lr_scheduler_type="cosine", warmup_steps=0.25)
    dash = LoRADashboard(trainer=hf)
    assert isinstance(dash.trainer, HFRun) and dash.trainer.hf_trainer is hf
    # read-only: no inputs, the trainer's own settings instead
    assert dash.panel.control_specs == [] and dash.panel.errors == {}
    assert dash.panel.attached_settings == describe_settings(hf)
    assert _callout(dash, "Attached to your Trainer") and _callout(dash, "Learning rate") is None
    assert (dash.panel.summary["trainable"], dash.panel.summary["total"]) == count_parameters(hf.model)
    assert dash.panel.summary["train_rows"] == 32
    preview = np.array(dash.charts.lr_line.y, dtype=float)  # before Train: the cosine schedule, 8 steps
    assert list(dash.charts.lr_line.x) == list(range(1, 9))

    async def main() -> Any:
        task = dash.start()
        assert dash.panel.progress["total"] == 8  # known before the first event
        return await task

    end = asyncio.run(main())
    assert end.kind == "finished" and dash.state == "finished" and not dash.running
    steps, losses = _logged(hf, "loss")
    assert steps == [2, 4, 6, 8]
    assert list(dash.charts.raw_loss.x) == steps
    assert list(dash.charts.raw_loss.y) == pytest.approx(losses)
    # the preview was the schedule the trainer followed: identical to the rates it logged
    _, rates = _logged(hf, "learning_rate")
    assert preview[np.array(steps) - 1] == pytest.approx(rates, rel=1e-6)  # float32 on the wire
    assert dash.panel.progress["step"] == 8 and dash.panel.run_label.startswith("run 1: r=4")
    assert _callout(dash, "Finished run 1")["kind"] == "success"  # type: ignore[index]
    assert "run 1" in dash.static_summary_html()


def test_stop_ends_within_one_step_and_the_adapter_loads_with_peft(tmp_path: Path) -> None:
    hf = _hf_trainer(tmp_path, max_steps=10_000, save_strategy="steps", save_steps=100_000)
    dash = LoRADashboard(trainer=hf)
    seen: list[int] = []

    async def main() -> Any:
        dash.panel._handle_custom_msg({"type": "train"}, [])  # the Train button
        await _until(lambda: _step_now(dash) >= 2)
        seen.append(hf.state.global_step)  # updates completed when Stop is clicked
        dash.panel._handle_custom_msg({"type": "stop"}, [])
        return await dash.wait()

    end = asyncio.run(main())
    assert end.kind == "stopped" and dash.state == "stopped"
    assert seen[0] <= end.step <= seen[0] + 1
    assert dash.charts.raw_loss.x[-1] == end.step  # the last step is charted
    assert end.adapter_path == str(tmp_path / "out" / f"checkpoint-{end.step}")
    assert dash.panel.summary["adapter_path"] == end.adapter_path
    trained = {k: v for k, v in hf.model.state_dict().items() if "lora_" in k}
    for path in (end.adapter_path, dash.save_adapter(tmp_path / "saved")):
        loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(path))
        again = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
        assert trained.keys() == again.keys() and len(trained) == 8
        assert all(torch.equal(trained[k], again[k]) for k in trained)


def test_pause_resume_and_the_logged_lr_when_the_schedule_has_no_preview(tmp_path: Path) -> None:
    hf = _hf_trainer(tmp_path, max_steps=10_000, lr_scheduler_type="cosine_with_restarts")
    dash = LoRADashboard(trainer=hf)
    note = _callout(dash, "Learning rate")
    assert note is not None and "cosine_with_restarts" in note["message"]
    assert len(dash.charts.lr_line.x) == 0  # no preview drawn

    async def main() -> Any:
        dash.start()
        await _until(lambda: _step_now(dash) >= 1)
        dash.pause()
        await _until(lambda: dash.state == "paused")
        held, shown = hf.state.global_step, dash.panel.progress["step"]
        await asyncio.sleep(0.5)  # the loop is free meanwhile, the worker is held
        assert hf.state.global_step == held and dash.state == "paused" and dash.running
        assert dash.panel.progress["step"] == shown  # nothing moves while paused
        dash.resume()
        await _until(lambda: dash.state == "running" and _step_now(dash) > held)
        dash.stop()
        return await dash.wait()

    end = asyncio.run(main())
    assert end.kind == "stopped"
    steps, rates = _logged(hf, "learning_rate")
    dash._flush()  # the last flush ran at the end; idempotent
    assert list(dash.charts.lr_line.x) == steps  # the chart draws the rates the trainer logged
    assert list(dash.charts.lr_line.y) == pytest.approx(rates)


@pytest.mark.parametrize("fault", ["raise", "oom"])
def test_a_failure_in_compute_loss_ends_in_the_failure_callout(tmp_path: Path, fault: str) -> None:
    cls = type(f"Failing_{fault}", (_FailingTrainer,), {"fault": fault})
    hf = _hf_trainer(tmp_path, cls=cls, max_steps=50)
    dash = LoRADashboard(trainer=hf)
    end = asyncio.run(dash.run())  # returns: the task ends, no exception escapes
    assert end.kind == "failed" and dash.state == "failed" and not dash.running
    danger = [c for c in dash.panel.callouts if c["kind"] == "danger"]
    assert len(danger) == 1 and danger[0]["suggestions"]
    if fault == "raise":
        assert "weights" in danger[0]["message"]
    else:
        assert "per_device_train_batch_size=2" in " ".join(danger[0]["suggestions"])
    # the dashboard can train the same trainer again
    hf.fault = "none"
    hf.args.max_steps = hf.state.global_step + 2
    again = asyncio.run(dash.run())
    assert again.kind == "finished" and len(dash.runs) == 2


def test_sft_trainer_on_conversations_shows_trl_metrics(tmp_path: Path) -> None:
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from lora_widgets import load_base_model

    _, tokenizer = load_base_model()
    tokenizer.chat_template = CHAT_TEMPLATE
    rows = [
        {"messages": [{"role": "user", "content": f"What is {i}+{i}?"},
                      {"role": "assistant", "content": f"{2 * i}."}]}
        for i in range(16)
    ]  # fmt: skip
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"), max_steps=3, per_device_train_batch_size=4, logging_steps=1,
        eval_strategy="steps", eval_steps=3, max_length=64, bf16=False, activation_checkpointing=False,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    data = datasets.Dataset.from_list(rows)
    sft = trl.SFTTrainer(
        model=tiny_llama(vocab_size=len(tokenizer)), args=args, train_dataset=data, eval_dataset=data.select(range(4)),
        processing_class=tokenizer, peft_config=peft.LoraConfig(r=4, target_modules="all-linear"),
    )  # fmt: skip
    dash = LoRADashboard(trainer=sft)
    settings = dash.panel.attached_settings
    assert settings["trainer"] == "SFTTrainer" and settings["max_length"] == 64 and settings["lora_r"] == 4
    assert _callout(dash, "Attached to your SFTTrainer")
    end = asyncio.run(dash.run())
    assert end.kind == "finished" and list(dash.charts.raw_loss.x) == [1, 2, 3]
    extra = dash.panel.progress["extra"]
    assert set(extra) == {"mean_token_accuracy", "entropy", "num_tokens"}
    assert 0 <= extra["mean_token_accuracy"] <= 1 and extra["num_tokens"] > 0
    assert 0 <= dash.panel.summary["val_token_accuracy"] <= 1
    assert dash.panel.summary["val_loss"] == pytest.approx(dash.history.last_eval.val_loss)  # type: ignore[union-attr]


def test_sparse_logging_is_advised_before_the_run_and_the_advice_follows_the_args(tmp_path: Path) -> None:
    hf = _hf_trainer(tmp_path, max_steps=300, logging_steps=500)
    dash = LoRADashboard(trainer=hf)
    advice = _callout(dash, "nearly empty")
    assert advice is not None and advice["kind"] == "warning"
    assert "logging_steps=500" in advice["message"] and "logging_steps=6" in advice["message"]
    assert dash.panel.attached_settings["logging_steps"] == 500
    assert dash.state == "idle" and dash.runs == []  # said before any run
    hf.args.logging_steps = 1
    hf.args.max_steps = 2

    async def main() -> Any:
        task = dash.start()  # Train re-reads the settings: the advice is gone, the table follows
        assert _callout(dash, "nearly empty") is None and dash.panel.attached_settings["logging_steps"] == 1
        return await task

    assert asyncio.run(main()).kind == "finished"


def test_bad_arguments_are_refused_and_the_dashboard_replaces_the_progress_printer(tmp_path: Path) -> None:
    hf = _hf_trainer(tmp_path)
    hf.add_callback(
        transformers.PrinterCallback
    )  # what disable_tqdm=True gives (a notebook: its progress bar)
    hf.add_callback(transformers.trainer_callback.ProgressCallback)
    dash = LoRADashboard(trainer=hf)  # prints from the worker thread would land in whichever cell ran last
    kept = [type(c).__name__ for c in hf.callback_handler.callbacks]
    assert "PrinterCallback" not in kept and "ProgressCallback" not in kept and "EventCallback" in kept
    assert dash.trainer.callback in hf.callback_handler.callbacks  # type: ignore[union-attr]
    with pytest.raises(TypeError, match=r"got lora, train_data too.*TrainingArguments"):
        LoRADashboard(trainer=hf, lora=object(), train_data="python-docs")
    with pytest.raises(TypeError, match=r"trainer must be a transformers\.Trainer.*got str"):
        LoRADashboard(trainer="my_trainer")


def test_watch_shows_an_hf_run_read_only_and_an_own_run_clears_it(tmp_path: Path) -> None:
    from tests.test_dashboard import FakeTrainer, make_dash

    dash = make_dash(FakeTrainer, max_steps=4)
    assert dash.panel.control_specs and dash.panel.attached_settings == {}
    hf = _hf_trainer(tmp_path, max_steps=2, logging_steps=500)

    async def main() -> None:
        task = dash.watch(HFRun(hf))
        assert dash.panel.attached_settings["max_steps"] == 2 and _callout(dash, "nearly empty")
        assert (await task).kind == "finished"  # type: ignore[union-attr]
        await dash.run()  # the dashboard's own run: the watched trainer's settings no longer apply

    asyncio.run(main())
    assert dash.panel.attached_settings == {} and _callout(dash, "nearly empty") is None
    assert len(dash.runs) == 2 and dash.runs[1].result.kind == "finished"  # type: ignore[union-attr]


def test_hf_schedule_preview_rules() -> None:
    base = {"learning_rate": 1e-3, "lr_scheduler_kwargs": None}
    linear = readouts.schedule_preview({**base, "lr_scheduler_type": "linear", "warmup_steps": 0.25}, 8)
    assert linear is not None and list(linear[1][:3]) == pytest.approx([0, 0.5e-3, 1e-3])  # ceil(0.25 x 8)
    const = readouts.schedule_preview({**base, "lr_scheduler_type": "constant", "warmup_steps": 5}, 8)
    assert const is not None and set(const[1]) == {1e-3}  # transformers' "constant" has no warm-up
    for odd in ({"lr_scheduler_type": "polynomial"}, {"lr_scheduler_type": "cosine", "lr_scheduler_kwargs": {"num_cycles": 2}}):  # fmt: skip
        config = {**base, "warmup_steps": 0, **odd}
        assert readouts.schedule_preview(config, 8) is None
        assert "logs" in (readouts.schedule_note(config) or "")
    assert readouts.schedule_note({**base, "lr_scheduler_type": "cosine"}) is None
    assert readouts.schedule_note({"schedule": "cosine"}) is None and readouts.schedule_note({}) is None


def test_the_dashboard_does_not_import_transformers_trainer() -> None:
    code = (
        "import sys, lora_widgets\nfrom lora_widgets import LoRADashboard\n"
        "print([m for m in ('transformers.trainer', 'trl', 'lora_widgets.hf.run') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
