"""The dashboard's "base" control: a 4-bit run of the shipped model through the dashboard's start path (no browser),
the label naming the base, and the errors the control shows."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from lora_widgets import LoRAConfig, LoRADashboard, TrainConfig
from lora_widgets.events import RunFinished
from lora_widgets.lora import lora_layers
from lora_widgets.quantization import base_of
from lora_widgets.widget.controls import validate_settings
from tests.helpers import tiny_llama

bnb = pytest.importorskip("bitsandbytes")


def small_run(tmp_path: Path) -> TrainConfig:
    return TrainConfig(max_steps=12, eval_every=12, eval_batches=2, batch_size=4, warmup_steps=2,
                       learning_rate=5e-3, output_dir=str(tmp_path), sample_prompts=(), seed=0)  # fmt: skip


def test_the_shipped_model_fine_tunes_on_a_4_bit_base_from_the_dashboard(tmp_path: Path) -> None:
    dash = LoRADashboard(
        lora=LoRAConfig(r=8, alpha=16, target_modules="all-linear"), train=small_run(tmp_path)
    )
    assert dash.panel.base == "16-bit" and base_of(dash.model) == "16-bit"  # shows what it loaded
    spec = next(s for s in dash.panel.control_specs if s["name"] == "base")
    assert spec["choices"] == ["16-bit", "8-bit", "4-bit"] and spec["kind"] == "select"
    dash.panel.base = "4-bit"
    assert dash.panel.errors == {}
    result = asyncio.run(dash.run())
    assert isinstance(result, RunFinished), result
    assert base_of(dash.model) == "4-bit" and base_of(dash.trainer.model) == "4-bit"  # type: ignore[union-attr]
    assert all(layer.quantized == "4-bit" for layer in lora_layers(dash.model).values())
    run = dash.runs[-1]
    assert run.label.endswith(" 4-bit") and dash.panel.run_label == run.label
    val = run.history.val_loss
    assert len(val) == 2 and val[-1] < val[0] - 0.05, val
    assert run.train is not None and run.train.base == "4-bit"


def test_a_model_object_cannot_be_reloaded_at_another_base(tmp_path: Path) -> None:
    model = tiny_llama()
    dash = LoRADashboard(model=model, tokenizer=object(), train_data=torch.randint(0, 128, (32, 16)),
                         lora=LoRAConfig(r=2), train=small_run(tmp_path))  # fmt: skip
    dash.panel.base = "4-bit"
    with pytest.raises(
        ValueError, match=r"base='4-bit': this dashboard was given a 16-bit model object.*load_model"
    ):
        asyncio.run(dash.run())
    assert dash.model is model and not lora_layers(model)
    assert any("given a 16-bit model object" in c["message"] for c in dash.panel.callouts)


def test_the_base_control_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bnb, "supported_torch_devices", {"cpu", "cuda"})
    errors = validate_settings({"base": "4-bit"}, device_type="mps")
    assert "bitsandbytes cannot use the device 'mps'" in errors["base"]
    assert validate_settings({"base": "4-bit"}, device_type="cpu") == {}
    assert validate_settings({"base": "3-bit"})["base"].startswith("TrainConfig.base='3-bit' is invalid")
