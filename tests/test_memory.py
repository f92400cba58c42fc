"""Memory estimator: parameter counts of known architectures, input handling, phases, advice."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from lora_widgets.lora.layers import LoRAConfig, apply_lora, count_parameters
from lora_widgets.memory.arch import known_model_config
from lora_widgets.memory.estimate import CPU_RUNTIME_BYTES, CPU_RUNTIME_BYTES_16BIT
from lora_widgets.memory.fit import (
    GPUS,
    MemoryEstimate,
    estimate_memory,
    known_models,
    measure_memory,
    parse_dtype,
    preflight,
    suggest_fit,
)
from lora_widgets.memory.quant import int8_bytes, nf4_bytes
from tests.helpers import tiny_gpt2, tiny_llama

# Parameter counts of the published checkpoints (sum of the tensors in their safetensors files).
REAL_COUNTS = {
    "SmolLM2-135M": 134_515_008,
    "SmolLM2-360M": 361_821_120,
    "Qwen2.5-0.5B": 494_032_768,
    "Qwen2.5-1.5B": 1_543_714_304,
    "Qwen2.5-7B": 7_615_616_512,
    "Llama-3.2-1B": 1_235_814_400,
    "Llama-3.2-3B": 3_212_749_824,
    "Llama-3.1-8B": 8_030_261_248,
    "Mistral-7B-v0.1": 7_241_732_096,
    "GPT-2": 124_439_808,
}


def test_known_models_are_listed() -> None:
    assert set(known_models()) == set(REAL_COUNTS)


@pytest.mark.parametrize("name", list(REAL_COUNTS))
def test_full_parameter_count_equals_the_real_model(name: str) -> None:
    est = estimate_memory(name, batch_size=1, seq_len=8)
    assert est.total_params == REAL_COUNTS[name]
    assert est.trainable_params == REAL_COUNTS[name]  # full fine-tuning


def test_llama_3_2_3b_lora_r32_on_q_and_v() -> None:
    est = estimate_memory("Llama-3.2-3B", lora=LoRAConfig(r=32, target_modules=["q_proj", "v_proj"]))
    # 28 layers x 32 x ((3072 + 3072) + (3072 + 1024))
    assert est.trainable_params == 9_175_040
    assert est.total_params == REAL_COUNTS["Llama-3.2-3B"] + 9_175_040


def test_lora_counts_match_apply_lora_on_a_real_model() -> None:
    lora = LoRAConfig(r=4, target_modules="all-linear")
    model = tiny_llama()
    est = estimate_memory(model.config, lora=lora, batch_size=2, seq_len=16)
    report = apply_lora(model, lora)
    assert (est.trainable_params, est.total_params) == (report.trainable_params, report.total_params)


def test_hub_id_resolves_to_the_offline_table() -> None:
    a = estimate_memory("meta-llama/Llama-3.1-8B", lora=LoRAConfig(r=16), batch_size=1, seq_len=64)
    b = estimate_memory("Llama-3.1-8B", lora=LoRAConfig(r=16), batch_size=1, seq_len=64)
    assert a == b


def test_local_path_is_read_as_config_only(tmp_path: Path) -> None:
    config = tiny_llama().config
    config.save_pretrained(tmp_path)  # config.json only, no weights
    est = estimate_memory(str(tmp_path), batch_size=2, seq_len=16)
    assert est.total_params == count_parameters(tiny_llama())[1]


def test_a_70b_model_costs_no_memory_to_estimate() -> None:
    config = LlamaConfig(  # Llama-3.1-70B's dimensions
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
    )
    start = time.perf_counter()
    est = estimate_memory(config, lora=LoRAConfig(r=16), batch_size=1, seq_len=512, dtype="bfloat16")
    assert time.perf_counter() - start < 20  # generous: meta tensors, no storage; typically well under 1 s
    assert est.total_params - est.trainable_params == 70_553_706_496
    assert est.frozen_weights == 70_553_706_496 * 2


def test_model_with_adapters_is_counted_as_it_is() -> None:
    model = tiny_llama()
    report = apply_lora(model, LoRAConfig(r=2))
    est = estimate_memory(model, batch_size=2, seq_len=8)
    assert est.trainable_params == report.trainable_params
    with pytest.raises(ValueError, match="already carries LoRA"):
        estimate_memory(model, lora=LoRAConfig(r=4))


def test_gpt2_is_supported() -> None:
    est = estimate_memory(tiny_gpt2(), lora=LoRAConfig(r=4), batch_size=2, seq_len=16)
    assert est.trainable_params == 2 * 4 * (32 + 96)  # c_attn in both layers


@pytest.mark.parametrize("name", ["float32", "fp32", "bf16", "bfloat16", "float16", "torch.bfloat16"])
def test_dtype_names(name: str) -> None:
    assert isinstance(parse_dtype(name), torch.dtype)


def test_bad_inputs_name_the_value_and_the_fix() -> None:
    with pytest.raises(ValueError, match=r"float8.*valid names"):
        estimate_memory("GPT-2", dtype="float8")
    with pytest.raises(ValueError, match="int8"):
        estimate_memory("GPT-2", dtype=torch.int8)
    with pytest.raises(ValueError, match="base_quantization='3bit'"):
        estimate_memory("GPT-2", lora=LoRAConfig(), base_quantization="3bit")
    with pytest.raises(ValueError, match="needs LoRA"):
        estimate_memory("GPT-2", base_quantization="4bit")
    with pytest.raises(ValueError, match="batch_size"):
        estimate_memory("GPT-2", batch_size=0)
    with pytest.raises(ValueError, match="optimizer='lion'"):
        estimate_memory("GPT-2", optimizer="lion")
    with pytest.raises(ValueError, match="not a known model"):
        estimate_memory("no-such-model-anywhere-xyz")
    with pytest.raises(TypeError, match="model_or_config"):
        estimate_memory(42)
    with pytest.raises(TypeError, match="no transformers config"):
        estimate_memory(torch.nn.Linear(2, 2))


def _check_consistent(est: MemoryEstimate) -> None:
    assert est.total == max(est.phases.values()) == est.phases[est.peak_phase]
    assert sum(est.at_peak.values()) == est.total
    assert all(v >= 0 for v in est.at_peak.values())
    assert {k: sum(v.values()) for k, v in est.phase_breakdown.items()} == est.phases
    assert est.naive_total == (
        est.frozen_weights
        + est.trainable_weights
        + est.gradients
        + est.optimizer_states
        + est.activations
        + est.overhead
    )


def test_breakdown_is_consistent() -> None:
    for kwargs in (
        {},
        {"lora": LoRAConfig(r=16)},
        {"lora": LoRAConfig(r=16), "gradient_checkpointing": True},
        {"lora": LoRAConfig(r=16), "base_quantization": "4bit"},
    ):
        _check_consistent(estimate_memory("Llama-3.2-1B", batch_size=4, seq_len=512, dtype="bf16", **kwargs))


def test_full_fine_tuning_parts_follow_the_textbook() -> None:
    n = REAL_COUNTS["Qwen2.5-0.5B"]
    est = estimate_memory("Qwen2.5-0.5B", batch_size=1, seq_len=16, dtype="float32")
    assert est.trainable_weights == est.gradients == 4 * n
    assert est.optimizer_states == 8 * n  # AdamW: two fp32 moments
    # tiny batch: the optimizer step (weights, grads, moments and the foreach temporary) is the peak
    assert est.peak_phase == "optimizer"
    assert est.total == pytest.approx(20 * n, rel=0.01)
    sgd = estimate_memory("Qwen2.5-0.5B", batch_size=1, seq_len=16, optimizer="sgd")
    assert sgd.optimizer_states == 0


def test_quantized_base_uses_qlora_bytes_per_weight() -> None:
    lora = LoRAConfig(r=16)
    plain = estimate_memory("Llama-3.1-8B", lora=lora, batch_size=1, seq_len=256, dtype="bf16")
    q4 = estimate_memory(
        "Llama-3.1-8B", lora=lora, batch_size=1, seq_len=256, dtype="bf16", base_quantization="4bit"
    )
    q8 = estimate_memory(
        "Llama-3.1-8B", lora=lora, batch_size=1, seq_len=256, dtype="bf16", base_quantization="8bit"
    )
    # Linear weights in the blocks (everything but 2 x 128256 x 4096 embeddings/head and the norms)
    linear = 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336)
    rest = REAL_COUNTS["Llama-3.1-8B"] - linear
    # counted layer by layer as bitsandbytes stores them (memory_quant); the rest in fp32 (k-bit preparation)
    shapes = [
        (4096, 4096),
        (1024, 4096),
        (1024, 4096),
        (4096, 4096),
        (14336, 4096),
        (14336, 4096),
        (4096, 14336),
    ]
    assert q4.frozen_weights == 32 * sum(nf4_bytes(o, i) for o, i in shapes) + rest * 4
    assert q8.frozen_weights == 32 * sum(int8_bytes(o, i) for o, i in shapes) + rest * 4
    assert q4.frozen_weights == pytest.approx(linear * 4.127 / 8 + rest * 4, rel=1e-3)
    assert q4.total < q8.total < plain.total
    assert q4.trainable_params == plain.trainable_params


def test_gradient_checkpointing_and_batch_size_move_the_peak_the_right_way() -> None:
    lora = LoRAConfig(r=16)
    base = estimate_memory("Llama-3.2-1B", lora=lora, batch_size=8, seq_len=1024, dtype="bf16")
    gc = estimate_memory(
        "Llama-3.2-1B", lora=lora, batch_size=8, seq_len=1024, dtype="bf16", gradient_checkpointing=True
    )
    small = estimate_memory("Llama-3.2-1B", lora=lora, batch_size=2, seq_len=1024, dtype="bf16")
    assert gc.total < base.total and gc.activations < base.activations
    assert small.total < base.total
    assert base.peak_phase in ("forward", "backward")


def test_peak_differs_from_the_naive_sum_both_ways() -> None:
    # LoRA: the loss's fp32 buffers over the vocabulary come on top of everything saved
    lora = estimate_memory("SmolLM2-135M", lora=LoRAConfig(r=8), batch_size=8, seq_len=512, dtype="bf16")
    assert lora.total > lora.naive_total
    # full fine-tuning with big activations: gradients appear only as activations are released
    full = estimate_memory("Llama-3.1-8B", batch_size=4, seq_len=2048, dtype="bf16")
    assert full.total < full.naive_total


def test_fit_table_has_the_common_gpus() -> None:
    assert {"T4 16 GB", "L4 24 GB", "A10G 24 GB", "A100 40 GB", "A100 80 GB", "H100 80 GB"} <= set(GPUS)
    est = estimate_memory("SmolLM2-135M", lora=LoRAConfig(r=8), batch_size=8, seq_len=512, dtype="bf16")
    assert est.fits(GPUS["T4 16 GB"])
    big = estimate_memory("Llama-3.1-8B", batch_size=8, seq_len=2048, dtype="bf16")
    assert not big.fits(GPUS["H100 80 GB"])


def test_suggest_fit_gives_concrete_settings_that_do_fit() -> None:
    lora = LoRAConfig(r=64)
    available = 12 * 1024**3
    tips = suggest_fit("Llama-3.2-1B", lora, 32, 2048, "bf16", available)
    assert tips, "the configuration does not fit, so there must be advice"
    assert tips[0].startswith("batch_size=")
    b = int(tips[0].split("=")[1].split()[0])
    assert 1 <= b < 32
    assert estimate_memory("Llama-3.2-1B", lora, b, 2048, "bf16").fits(available)
    assert not estimate_memory("Llama-3.2-1B", lora, b + 1, 2048, "bf16").fits(available)
    assert any("gradient_checkpointing=True" in t for t in tips)
    assert suggest_fit("SmolLM2-135M", LoRAConfig(), 1, 64, "bf16", 80 * 1024**3) == []
    with pytest.raises(ValueError, match="available_bytes"):
        suggest_fit("GPT-2", None, 1, 64, "bf16", 0)


def test_suggest_fit_says_so_when_nothing_fits() -> None:
    tips = suggest_fit("Llama-3.1-8B", None, 1, 128, "float32", 1024**3)
    assert len(tips) == 1 and "nothing simple fits" in tips[0]


def test_preflight_on_cpu_and_with_an_explicit_budget() -> None:
    model = tiny_llama()
    result = preflight(model, LoRAConfig(r=4), batch_size=2, seq_len=16, dtype="float32", device="cpu")
    assert result.fits and result.suggestions == [] and result.available_bytes > 0
    assert "fits" in result.message()
    tight = preflight(
        "Llama-3.2-1B",
        LoRAConfig(r=16),
        batch_size=16,
        seq_len=2048,
        dtype="bf16",
        available_bytes=10 * 1024**3,
    )
    assert not tight.fits and tight.suggestions
    assert "will NOT fit" in tight.message() and tight.suggestions[0] in tight.message()


def test_estimate_is_json_safe() -> None:
    est = estimate_memory("GPT-2", lora=LoRAConfig(r=8), batch_size=2, seq_len=64)
    assert json.loads(json.dumps(est.to_dict()))["total"] == est.total
    assert "TOTAL" in est.as_table()


def test_known_model_config_builds_offline() -> None:
    config = known_model_config("Qwen2.5-7B")
    assert config.model_type == "qwen2" and config.hidden_size == 3584


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------


def test_measure_memory_leaves_the_model_untouched() -> None:
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = measure_memory(model, LoRAConfig(r=2), batch_size=2, seq_len=16)
    assert m.method == "dispatch-tracker"
    assert set(m.phase_peaks) == {"forward", "backward", "optimizer"}
    assert m.peak_bytes == max(m.phase_peaks.values()) > m.resident_bytes > 0
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any("lora" in k for k in after)


def test_tracker_agrees_with_the_cpu_allocator() -> None:
    """The dispatch tracker's live bytes equal the allocator's own count (torch.profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    from lora_widgets.memory.fit import LiveBytesTracker

    torch.manual_seed(0)
    x = torch.randn(64, 256, requires_grad=True)
    w = torch.randn(256, 256, requires_grad=True)

    def work() -> None:
        y = torch.nn.functional.gelu(x @ w)  # [64, 256]
        z = torch.softmax(y @ w.T, dim=-1).sum()
        z.backward()

    with LiveBytesTracker() as tracker:
        work()
    x.grad = w.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    x.grad = w.grad = None
    # the allocator reports every allocation (+bytes) and free (-bytes); peak of its running total
    results = prof.profiler.kineto_results  # type: ignore[union-attr]
    events = sorted((e for e in results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    running = peak = 0
    for event in events:
        running += event.nbytes()
        peak = max(peak, running)
    assert peak > 64 * 256 * 4  # the region did allocate
    assert tracker.peak == peak


def test_advice_for_a_model_that_already_carries_the_adapters() -> None:
    """The trainer applies LoRA first; its OOM handler and the dashboard pass that model with its config."""
    lora = LoRAConfig(r=4)
    model = tiny_llama()
    fresh = estimate_memory(model, lora, batch_size=64, seq_len=128)
    apply_lora(model, lora)
    half = fresh.required_bytes(cuda=False) // 2  # half of what the run needs on a CPU, runtime included
    result = preflight(model, lora, batch_size=64, seq_len=128, device="cpu", available_bytes=half)
    assert result.estimate.total == fresh.total
    assert not result.fits and result.suggestions[0].startswith("batch_size=")
    assert suggest_fit(model, lora, 64, 128, "fp32", half, cuda=False) == result.suggestions


def test_device_auto_and_bad_devices() -> None:
    result = preflight("GPT-2", LoRAConfig(r=2), batch_size=1, seq_len=16, device="auto")
    assert result.device.split(":")[0] in ("cpu", "cuda", "mps") and result.available_bytes > 0
    with pytest.raises(ValueError, match="device='gpu0'"):
        preflight("GPT-2", device="gpu0")


def test_mixed_precision_keeps_fp32_state_and_adds_weight_copies() -> None:
    lora = LoRAConfig(r=16)
    pure = estimate_memory("Llama-3.2-1B", lora, 4, 512, "bf16")
    mixed = estimate_memory("Llama-3.2-1B", lora, 4, 512, "bf16", weight_dtype="float32")
    n = REAL_COUNTS["Llama-3.2-1B"]
    assert mixed.frozen_weights == 4 * n and pure.frozen_weights == 2 * n
    assert mixed.gradients == 4 * mixed.trainable_params
    assert mixed.to_dict()["weight_dtype"] == "float32" and pure.to_dict()["weight_dtype"] == "bfloat16"
    # autocast keeps a bf16 copy of (nearly) every weight whose input needs a gradient until backward
    linear = 16 * (2048 * 2048 * 2 + 2048 * 512 * 2 + 3 * 2048 * 8192)  # q, o, k, v, MLP per block
    assert mixed.activations - pure.activations > 0.9 * linear * 2
    _check_consistent(mixed)


def test_preflight_infers_mixed_precision_from_an_fp32_model() -> None:
    model = tiny_llama()  # fp32 parameters; the LoRATrainer's precision="bf16" runs it under autocast
    result = preflight(model, LoRAConfig(r=2), batch_size=2, seq_len=16, dtype="bfloat16", device="cpu")
    # on a CPU, AdamW's default (the trainer's) is the single-tensor step, not foreach
    expected = estimate_memory(
        model.config, LoRAConfig(r=2), 2, 16, "bfloat16", weight_dtype="float32", foreach=False
    )
    assert result.estimate == expected


def test_the_steady_state_step_is_the_peak() -> None:
    """AdamW creates its moments in the first step(); from step 2 on they are resident during forward and
    backward too, so step 2 (what the estimate models) peaks at least as high as step 1."""
    first = measure_memory(tiny_llama(), None, batch_size=2, seq_len=16, steps=1)
    steady = measure_memory(tiny_llama(), None, batch_size=2, seq_len=16, steps=2)
    assert steady.peak_bytes >= first.peak_bytes
    assert steady.phase_peaks["forward"] > first.phase_peaks["forward"]  # the moments are already there
    est = estimate_memory(tiny_llama(), batch_size=2, seq_len=16)
    assert abs(est.total - steady.peak_bytes) / steady.peak_bytes < 0.10


def test_preflight_for_another_machines_gpu_needs_an_explicit_budget() -> None:
    """device='cuda' with available_bytes plans for a GPU elsewhere; without it the GPU must be here."""
    result = preflight(
        "GPT-2", LoRAConfig(r=2), batch_size=1, seq_len=16, device="cuda", available_bytes=16 * 1024**3
    )
    assert result.fits and result.device == "cuda"
    assert result.estimate.required_bytes(cuda=True) > result.estimate.total  # the CUDA allowance applies
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device='cuda'.*no CUDA GPU.*device='cpu'"):
            preflight("GPT-2", LoRAConfig(r=2), device="cuda")


def test_a_cpu_run_needs_torchs_runtime_on_top_of_its_tensors() -> None:
    """The estimate's ``total`` is tensor bytes (what the accuracy grid measures); on a CPU the process also
    grows by torch's runtime (benchmarks/bench_cpu_runtime.py), so pre-flight adds it before comparing."""
    model, lora = tiny_llama(), LoRAConfig(r=4)
    est = estimate_memory(model, lora, batch_size=2, seq_len=16)
    assert est.required_bytes(cuda=False) == est.total + CPU_RUNTIME_BYTES
    bf16 = estimate_memory(model, lora, batch_size=2, seq_len=16, dtype="bfloat16")
    assert (
        bf16.required_bytes(cuda=False)
        == bf16.total + CPU_RUNTIME_BYTES_16BIT
        > bf16.total + CPU_RUNTIME_BYTES
    )
    # a budget that holds the tensors but not the runtime does not fit, and the message says why
    short = preflight(model, lora, 2, 16, device="cpu", available_bytes=est.total + CPU_RUNTIME_BYTES // 2)
    assert not short.fits and "torch's CPU runtime" in short.message()
    enough = preflight(model, lora, 2, 16, device="cpu", available_bytes=est.required_bytes(cuda=False))
    assert enough.fits and not est.fits(est.total, cuda=False)


def test_an_unset_attention_choice_is_estimated_as_the_sdpa_model_transformers_builds() -> None:
    """transformers 4.x's ``config._attn_implementation`` answers "eager" for a config nobody set, then builds
    the model with SDPA; the estimate follows what is built (eager would add the saved s x s softmax)."""
    from transformers import AutoModelForCausalLM

    config = tiny_llama().config
    config._attn_implementation_internal = None  # as a fresh config (or AutoConfig.from_pretrained) has it
    unset = estimate_memory(copy.deepcopy(config), batch_size=2, seq_len=64)
    built = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    assert built.config._attn_implementation == "sdpa"
    assert estimate_memory(built, batch_size=2, seq_len=64).total == unset.total
    config._attn_implementation_internal = "eager"
    assert estimate_memory(config, batch_size=2, seq_len=64).total > unset.total
