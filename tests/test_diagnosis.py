"""The failure messages: each names the values in play and suggests concrete, smaller or safer settings."""

from __future__ import annotations

import torch

from lora_widgets.lora.layers import LoRAConfig
from lora_widgets.training.config import TrainConfig
from lora_widgets.training.diagnosis import error_diagnosis, format_lr, nan_diagnosis, oom_diagnosis
from tests.helpers import tiny_llama


def test_learning_rates_are_written_as_people_write_them() -> None:
    assert [format_lr(x) for x in (3e-4, 1.5e-3, 1e-2, 2e-5)] == ["3e-4", "1.5e-3", "1e-2", "2e-5"]


def test_out_of_memory_names_the_settings_and_halves_them() -> None:
    config = TrainConfig(batch_size=8, grad_accum_steps=2, precision="fp32", output_dir="unused")
    d = oom_diagnosis(
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        4,
        config=config,
        device=torch.device("cpu"),
        model=tiny_llama(),
        lora=LoRAConfig(r=16),
        seq_len=256,
    )
    assert d.reason == "oom" and d.error_type == "OutOfMemoryError"
    for fact in (
        "at step 5",
        "batch_size=8",
        "grad_accum_steps 2",
        "r=16",
        "sequence length 256",
        "GiB in total",
    ):
        assert fact in d.message, (fact, d.message)
    assert "last completed step (4) was kept" in d.message and "Tried to allocate 2.00 GiB" in d.message
    assert "batch_size=4 with grad_accum_steps=4 (same effective batch of 16 sequences)" in d.suggestions
    assert "LoRA rank r=8" in d.suggestions and "block_size=128 (shorter sequences)" in d.suggestions
    assert any(s.startswith("gradient_checkpointing=True") for s in d.suggestions)


def test_out_of_memory_before_training_says_it_did_not_start() -> None:
    d = oom_diagnosis(
        torch.OutOfMemoryError("x"),
        -1,
        config=TrainConfig(batch_size=1, output_dir="unused"),
        device=torch.device("cpu"),
        model=tiny_llama(),
        lora=None,
        seq_len=16,
    )
    assert "while moving the model to the device" in d.message and "Training did not start." in d.message
    assert "n/a (full fine-tuning)" in d.message
    assert not any(s.startswith("batch_size=") for s in d.suggestions)  # nothing to halve


def test_nan_suggests_a_third_of_the_learning_rate_and_bf16_over_fp16() -> None:
    config = TrainConfig(
        learning_rate=3e-3, warmup_steps=0, max_grad_norm=None, precision="fp16", output_dir="u"
    )
    d = nan_diagnosis(7, True, config=config, total_steps=100)
    assert d.reason == "nan" and "step 7" in d.message and "adapter is that of step 6" in d.message
    assert d.suggestions[0] == "lower learning_rate, e.g. 1e-3 (now 3e-3)"
    assert "longer warm-up, e.g. warmup_steps=20" in d.suggestions
    assert "clip gradients: max_grad_norm=1.0" in d.suggestions
    assert any("bf16" in s for s in d.suggestions)
    late = nan_diagnosis(7, False, config=config, total_steps=100)
    assert "later updates may have spread it" in late.message


def test_other_errors_keep_their_type_and_message() -> None:
    d = error_diagnosis(KeyError("input_ids"), 2)
    assert d.reason == "error" and d.error_type == "KeyError" and "step 3 with KeyError" in d.message
    bad = error_diagnosis(ValueError("block_size=0 must be positive"), 0, bad_input=True)
    assert bad.reason == "bad_input" and bad.message == "Bad input: block_size=0 must be positive"
