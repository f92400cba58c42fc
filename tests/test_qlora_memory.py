"""Memory of a quantized base: the estimator's NF4/FP4/int8 bytes against what bitsandbytes really holds on the
CPU, and the pre-flight advice that turns to a 4-bit base when a 16-bit one does not fit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from lora_widgets.lora import LoRAConfig
from lora_widgets.lora.layers import lora_layers
from lora_widgets.memory.fit import (
    GiB,
    MemoryEstimate,
    MemoryMeasurement,
    estimate_memory,
    measure_memory,
    preflight,
)
from lora_widgets.memory.quant import QUANT_NAMES, measured_quantized_bytes, nf4_bytes, quantized_weight_bytes
from lora_widgets.quantization import quantization_config, quantized_layers
from tests.helpers import assert_unchanged, snapshot

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


# ----------------------------------------------------------------------------------------------
# A whole training step on a quantized base: the estimate against measure_memory
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepCase:
    """One training step on a quantized base: LoRA r=8 (all linear layers, or q/v), fp32 compute (CPU)."""

    shape: tuple[
        int, int, int, int
    ]  # hidden (a multiple of 64: bitsandbytes' CPU path), MLP width, layers, vocab
    base: str  # "4-bit" or "8-bit"
    batch_size: int
    seq_len: int
    checkpointing: bool = False
    targets: str | None = "all-linear"  # None: the architecture's default (q_proj, v_proj)

    @property
    def label(self) -> str:
        h, _, layers, vocab = self.shape
        targets = self.targets or "q,v"
        gc = " +GC" if self.checkpointing else ""
        return (
            f"d={h} L={layers} V={vocab} {self.base} r=8 {targets} b={self.batch_size} s={self.seq_len}{gc}"
        )

    @property
    def lora(self) -> LoRAConfig:
        return LoRAConfig(r=8, alpha=16, target_modules=self.targets)


def step_config(shape: tuple[int, int, int, int]) -> LlamaConfig:
    hidden, inter, layers, vocab = shape
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=False)  # fmt: skip


def load_quantized(directory: Path, shape: tuple[int, int, int, int], base: str) -> torch.nn.Module:
    """The Llama of ``shape`` (random weights, seed 0) saved in ``directory`` and loaded with a ``base`` base."""
    path = directory / "-".join(map(str, shape))
    if not path.exists():
        torch.manual_seed(0)
        LlamaForCausalLM(step_config(shape)).save_pretrained(path)
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quantization_config(base, "cpu"), device_map="cpu"
    )


def run_step_case(case: StepCase, model: torch.nn.Module) -> tuple[MemoryEstimate, MemoryMeasurement]:
    """The estimate (from the config alone) and the measurement (two AdamW steps on a copy of ``model``)."""
    kwargs: dict[str, Any] = {"batch_size": case.batch_size, "seq_len": case.seq_len,
                              "gradient_checkpointing": case.checkpointing}  # fmt: skip
    quant = QUANT_NAMES[case.base]
    estimate = estimate_memory(step_config(case.shape), case.lora, base_quantization=quant, **kwargs)
    return estimate, measure_memory(model, case.lora, **kwargs)


SMALL, WIDER = (64, 192, 2, 256), (128, 384, 2, 512)
STEP_GRID = [
    StepCase(SMALL, "4-bit", 1, 64),
    StepCase(SMALL, "4-bit", 4, 64, checkpointing=True),
    StepCase(SMALL, "8-bit", 1, 64),
    StepCase(SMALL, "8-bit", 4, 64, checkpointing=True),  # LLM.int8() keeps its inputs past checkpointing
    StepCase(WIDER, "4-bit", 4, 32),
    StepCase(WIDER, "8-bit", 4, 32, checkpointing=True),
    StepCase(WIDER, "4-bit", 2, 64, checkpointing=True, targets=None),
    StepCase(WIDER, "8-bit", 2, 64, targets=None),  # frozen 8-bit layers keep inputs LoRA does not save
]


@pytest.fixture(scope="module")
def quantized_models(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[Any, ...], torch.nn.Module]:
    directory = tmp_path_factory.mktemp("quantized-steps")
    keys = {(case.shape, case.base) for case in STEP_GRID}
    return {key: load_quantized(directory, *key) for key in sorted(keys)}


def test_step_grid_covers_both_bases_batches_and_checkpointing() -> None:
    assert len(STEP_GRID) >= 6
    assert {c.base for c in STEP_GRID} == {"4-bit", "8-bit"} and len({c.shape for c in STEP_GRID}) >= 2
    assert {c.checkpointing for c in STEP_GRID} == {True, False} and {1, 4} <= {
        c.batch_size for c in STEP_GRID
    }


@pytest.mark.parametrize("case", STEP_GRID, ids=[c.label for c in STEP_GRID])
def test_quantized_step_estimate_within_10_percent_of_measurement(
    case: StepCase, quantized_models: dict[tuple[Any, ...], torch.nn.Module]
) -> None:
    estimate, measured = run_step_case(case, quantized_models[case.shape, case.base])
    error = (estimate.total - measured.peak_bytes) / measured.peak_bytes
    assert abs(error) <= 0.10, (
        f"{case.label}: estimate {estimate.total:,} vs measured {measured.peak_bytes:,}"
    )


def test_measuring_a_quantized_model_leaves_it_exactly_as_it_was(
    quantized_models: dict[tuple[Any, ...], torch.nn.Module],
) -> None:
    model = quantized_models[SMALL, "4-bit"]
    layers = quantized_layers(model).values()
    compute = [m.compute_dtype for m in layers]  # type: ignore[union-attr]
    before = snapshot(model)
    result = measure_memory(
        model, LORA, batch_size=1, seq_len=8, gradient_checkpointing=True, dtype="bfloat16"
    )
    assert result.peak_bytes > result.resident_bytes > measured_quantized_bytes(model)
    assert_unchanged(before, snapshot(model))
    assert [m.compute_dtype for m in layers] == compute  # type: ignore[union-attr]
    assert not lora_layers(model) and getattr(model, "_require_grads_hook", None) is None


def test_measuring_a_quantized_model_refuses_full_fine_tuning_and_16_bit_weights(
    quantized_models: dict[tuple[Any, ...], torch.nn.Module],
) -> None:
    model = quantized_models[SMALL, "8-bit"]
    with pytest.raises(ValueError, match=r"cannot be fully fine-tuned.*lora=LoRAConfig"):
        measure_memory(model, None, batch_size=1, seq_len=8)
    with pytest.raises(ValueError, match=r"weight_dtype='bfloat16'.*fp32 adapters"):
        measure_memory(model, LORA, batch_size=1, seq_len=8, weight_dtype="bfloat16")
