"""The T4 path without a T4: ``precision="auto"`` and the 4-bit compute dtype follow the device's capabilities,
simulated by patching ``torch.cuda.is_bf16_supported`` (nothing here needs a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_widgets.devices import best_precision
from lora_widgets.lora import LoRAConfig, apply_lora
from lora_widgets.quantization import compute_dtype, quantization_config, quantized_layers
from lora_widgets.training.config import PRECISIONS, TrainConfig
from lora_widgets.training.kbit import prepare_kbit
from lora_widgets.training.precision import AUTOCAST_DTYPES, grad_scaler
from lora_widgets.training.trainer import LoRATrainer
from tests.helpers import tiny_llama
from tests.test_qlora import quantized_tiny

GPUS = [("T4", False, "fp16", torch.float16), ("A100", True, "bf16", torch.bfloat16)]


def fake_gpu(native_bf16: bool):  # type: ignore[no-untyped-def]
    """``torch.cuda.is_bf16_supported`` as torch answers it on such a GPU: with its default
    ``including_emulation=True`` it says True on a T4 too (bf16 emulated), so only the native answer tells."""
    return lambda including_emulation=True: native_bf16 or including_emulation


@pytest.mark.parametrize("gpu, bf16, precision, dtype", GPUS)
def test_auto_precision_and_4_bit_compute_dtype_agree_on_each_gpu(
    monkeypatch: pytest.MonkeyPatch, gpu: str, bf16: bool, precision: str, dtype: torch.dtype
) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", fake_gpu(bf16))
    assert best_precision("cuda") == precision
    assert TrainConfig(precision="auto").resolved("cuda").precision == precision
    assert compute_dtype("cuda") == dtype == AUTOCAST_DTYPES[precision]
    assert quantization_config("4-bit", "cuda:0").bnb_4bit_compute_dtype == dtype
    TrainConfig(precision="auto").check_device("cuda")  # auto never refuses a device


def test_auto_on_the_cpu_is_fp32_and_a_run_records_it(tmp_path: Path) -> None:
    assert best_precision("cpu") == "fp32" and compute_dtype("cpu") == torch.float32
    assert "auto" in PRECISIONS
    config = TrainConfig(precision="auto", max_steps=1, output_dir=str(tmp_path), device="cpu")
    trainer = LoRATrainer(
        tiny_llama(), None, torch.randint(0, 128, (8, 8)), lora=LoRAConfig(r=2), config=config
    )
    assert trainer.config.precision == "fp32"  # resolved once, for the run's config.json and checkpoints
    assert config.precision == "auto"  # the user's config is untouched


def test_fp16_gets_a_loss_scaler_and_bf16_none() -> None:
    """fp16 gradients underflow without loss scaling (Micikevicius et al. 2018, sec. 3.2); bf16 has fp32's range."""
    device = torch.device("cuda")
    if not torch.cuda.is_available():
        with pytest.warns(UserWarning, match="CUDA is not available"):  # torch disables it without CUDA
            grad_scaler("fp16", device)
    assert not grad_scaler("bf16", device).is_enabled()
    assert not grad_scaler("fp32", device).is_enabled()


def test_bf16_on_a_gpu_without_it_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", fake_gpu(False))  # a T4: bf16 only emulated
    with pytest.raises(
        ValueError, match=r"precision='bf16' is not supported by this GPU.*precision='fp16' on a T4"
    ):
        TrainConfig(precision="bf16").check_device("cuda")


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("fp32", torch.float32)])
def test_the_4_bit_compute_dtype_follows_the_runs_precision(
    tmp_path: Path, precision: str, dtype: torch.dtype
) -> None:
    _, model = quantized_tiny(tmp_path)
    apply_lora(model, LoRAConfig(r=2, alpha=2))
    prepare_kbit(model, precision=precision, gradient_checkpointing=False)
    layers = quantized_layers(model).values()
    assert layers and all(layer.compute_dtype == dtype for layer in layers)
