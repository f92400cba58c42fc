"""Memory of a quantized base: the estimator's NF4/FP4/int8 bytes against what bitsandbytes really holds on the
CPU, and the pre-flight advice that turns to a 4-bit base when a 16-bit one does not fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from lora_widgets.lora import LoRAConfig
from lora_widgets.memory.fit import GiB, estimate_memory, preflight
from lora_widgets.memory.quant import measured_quantized_bytes, nf4_bytes, quantized_weight_bytes
from lora_widgets.quantization import quantization_config, quantized_layers

pytest.importorskip("bitsandbytes")

LORA = LoRAConfig(r=8, alpha=16, target_modules="all-linear")

# (hidden, intermediate, layers, heads, kv heads, vocab): six shapes, blocks crossing rows included
SHAPES = [
    (160, 432, 4, 5, 5, 2048),  # the shipped model's shape
    (64, 128, 2, 4, 2, 256),
    (96, 256, 3, 4, 4, 512),
    (128, 344, 2, 8, 2, 1000),
    (256, 688, 2, 8, 8, 2048),  # NOTES.md's 2-layer d=256 Llama
    (200, 520, 1, 5, 1, 300),  # odd sizes: the last absmax block is partial
]


def built(tmp_path: Path, shape: tuple[int, ...], quant: object) -> tuple[LlamaConfig, torch.nn.Module]:
    hidden, inter, layers, heads, kv, vocab = shape
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    directory = tmp_path / "-".join(map(str, shape))
    if not directory.exists():
        LlamaForCausalLM(config).save_pretrained(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=quant, device_map="cpu"
    )
    return config, model


def frozen_bytes(model: torch.nn.Module) -> int:
    """Measured bytes of the frozen base: the quantized layers' storage + every other parameter (fp32 here)."""
    quantized = {id(p) for m in quantized_layers(model).values() for p in m.parameters()}
    rest = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in quantized)
    return measured_quantized_bytes(model) + rest


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("base", ["4-bit", "8-bit"])
def test_estimated_base_bytes_match_bitsandbytes_storage(
    tmp_path: Path, shape: tuple[int, ...], base: str
) -> None:
    config, model = built(tmp_path, shape, quantization_config(base, "cpu"))
    quant = {"4-bit": "4bit", "8-bit": "8bit"}[base]
    shapes = [(m.out_features, m.in_features) for m in quantized_layers(model).values()]
    assert quantized_weight_bytes(shapes, quant) == measured_quantized_bytes(model)  # exact, layer by layer
    estimate = estimate_memory(config, LORA, batch_size=1, seq_len=16, base_quantization=quant)
    measured = frozen_bytes(model)
    assert estimate.frozen_weights == pytest.approx(measured, rel=0.02)
    from_model = estimate_memory(model, LORA, batch_size=1, seq_len=16)  # a loaded 4-bit model counts as one
    assert from_model.frozen_weights == estimate.frozen_weights


def test_fp4_and_plain_absmax_are_counted_too(tmp_path: Path) -> None:
    fp4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                             bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    _, model = built(tmp_path, SHAPES[1], fp4)
    layers = quantized_layers(model).values()
    expected = sum(nf4_bytes(m.out_features, m.in_features, double_quant=False) for m in layers)
    assert measured_quantized_bytes(model) == expected


def test_nf4_costs_4_127_bits_a_weight_on_large_layers() -> None:
    """QLoRA sec. 3: 4 bits + 8/64 + 32/(64 * 256) bits of double-quantized constants, plus 1,092 bytes a layer
    (the two code books and the offset)."""
    n = 4096 * 4096
    assert nf4_bytes(4096, 4096) * 8 / n == pytest.approx(
        4 + 8 / 64 + 32 / (64 * 256) + 1092 * 8 / n, rel=1e-9
    )


def test_preflight_suggests_a_4_bit_base_when_16_bit_does_not_fit() -> None:
    result = preflight("Llama-3.1-8B", LoRAConfig(r=16), batch_size=1, seq_len=512, dtype="bfloat16",
                       device="cuda", available_bytes=15 * GiB, weight_dtype="bfloat16")  # fmt: skip
    assert not result.fits
    tip = next(s for s in result.suggestions if "4-bit base" in s)
    assert "base='4-bit'" in tip and "batch_size=" in tip
    qlora = estimate_memory("Llama-3.1-8B", LoRAConfig(r=16), batch_size=1, seq_len=512, dtype="bfloat16",
                            base_quantization="4bit")  # fmt: skip
    assert qlora.required_bytes(cuda=True) < 15 * GiB < result.estimate.required_bytes(cuda=True)
