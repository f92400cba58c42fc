"""Settings that cannot take effect are said once, as ``AlertRaised`` events and callouts (issue 19, item 3).

Sample answers on a PEFT model or without validation data, a warm-up of at least the run's length, and an
attached transformers trainer whose model has no adapter: each used to be skipped (or trained) without a word.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lora_widgets import LoRADashboard  # noqa: E402
from lora_widgets.events.replay import read_events  # noqa: E402
from lora_widgets.events.types import AlertRaised, Event, RunFinished  # noqa: E402
from lora_widgets.health.notices import warmup_notice  # noqa: E402
from lora_widgets.lora.layers import LoRAConfig  # noqa: E402
from lora_widgets.training.config import TrainConfig  # noqa: E402
from lora_widgets.training.trainer import LoRATrainer  # noqa: E402
from tests.helpers import patterned_batch, tiny_llama  # noqa: E402
from tests.test_hf_bridge import _hf_trainer, _rows  # noqa: E402


def _run(model: Any, tmp_path: Path, lora: LoRAConfig | None = None, **config: Any) -> list[Event]:
    base: dict[str, Any] = dict(
        max_steps=3, batch_size=4, warmup_steps=0, eval_every=None, output_dir=str(tmp_path)
    )
    trainer = LoRATrainer(
        model, None, patterned_batch(8, 16).repeat(3, 1), lora=lora, config=TrainConfig(**{**base, **config})
    )
    events: list[Event] = []
    trainer.subscribe(events.append)
    assert isinstance(trainer.run_sync(), RunFinished), events[-1]
    assert trainer.run_dir is not None
    written = [e for e in read_events(trainer.run_dir / "metrics.jsonl") if isinstance(e, AlertRaised)]
    assert written == [e for e in events if isinstance(e, AlertRaised)]  # in metrics.jsonl too
    return events


def _alerts(events: list[Event]) -> dict[str, AlertRaised]:
    alerts = [e for e in events if isinstance(e, AlertRaised)]
    assert len({a.key for a in alerts}) == len(alerts), "an alert was raised twice"
    return {a.key: a for a in alerts}


def test_a_warmup_as_long_as_the_run_says_the_peak_is_never_trained_at(tmp_path: Path) -> None:
    alerts = _alerts(_run(tiny_llama(), tmp_path, LoRAConfig(r=2), warmup_steps=6, learning_rate=1e-2))
    notice = alerts["warmup_too_long"]
    assert "warmup_steps=6 >= the run's 3 updates" in notice.evidence and "0.005" in notice.evidence
    assert "warmup_steps=1" in notice.fix
    assert warmup_notice(2, 3, 1e-2) is None and warmup_notice(0, 3, 1e-2) is None


def test_sample_prompts_without_validation_data_are_said_to_be_off(tmp_path: Path) -> None:
    alerts = _alerts(_run(tiny_llama(), tmp_path, LoRAConfig(r=2), val_fraction=0.0, sample_prompts=("hi",)))
    assert "no validation data" in alerts["samples_off"].evidence and "eval_data" in alerts["samples_off"].fix
    quiet = _alerts(_run(tiny_llama(), tmp_path / "b", LoRAConfig(r=2), val_fraction=0.0, sample_prompts=()))
    assert "samples_off" not in quiet  # switched off on purpose: nothing to say


def test_samples_on_a_peft_model_are_said_to_be_off(tmp_path: Path) -> None:
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    alerts = _alerts(_run(model, tmp_path, None))
    assert "PEFT" in alerts["samples_off"].evidence


def test_an_attached_model_without_an_adapter_is_said_to_train_every_weight(tmp_path: Path) -> None:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=2, warmup_steps=4, per_device_train_batch_size=4,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    hf = transformers.Trainer(model=tiny_llama(), args=args, train_dataset=_rows())
    hf.remove_callback(transformers.PrinterCallback)
    dash = LoRADashboard(trainer=hf)
    end = asyncio.run(dash.run())
    assert isinstance(end, RunFinished)
    alerts = _alerts(dash.runs[-1].alerts)
    total = sum(p.numel() for p in hf.model.parameters())
    assert f"{total:,} of its {total:,} parameters" in alerts["no_adapter"].evidence
    assert "warmup_steps=4 >= the run's 2 updates" in alerts["warmup_too_long"].evidence
    titles = [c["title"] for c in dash.panel.callouts]
    assert any("No LoRA adapter" in t for t in titles) and any("never trained at" in t for t in titles)
    assert dash.panel.summary["adapter_size"] == "none (no LoRA adapter)"


def test_an_attached_peft_model_raises_no_notice(tmp_path: Path) -> None:
    hf = _hf_trainer(tmp_path, max_steps=2)
    dash = LoRADashboard(trainer=hf)
    asyncio.run(dash.run())
    assert isinstance(dash.runs[-1].result, RunFinished)
    assert "no_adapter" not in {a.key for a in dash.runs[-1].alerts}
