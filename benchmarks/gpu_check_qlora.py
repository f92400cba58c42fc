"""The QLoRA rows of ``benchmarks/gpu_check.py``: a 4-bit base (NF4, double quantization) trained by ours and by
transformers.Trainer + PEFT (``prepare_model_for_kbit_training``, as PEFT's QLoRA recipe), tokens/s side by side,
and the memory estimate against a measurement.

On CUDA: a SmolLM2-135M-shaped and a Llama-3.2-1B-shaped model, built from their configs with random weights
(written once to a temporary directory in bf16, loaded back through ``BitsAndBytesConfig``: no download); the
estimate of a training step is compared with ``torch.cuda.max_memory_allocated`` over our run. On the CPU (quick
mode) the tiny Llama of the quick plan; the comparison is then of the quantized weights, estimate against the bytes
bitsandbytes holds (a CPU process has no allocator peak to read).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from typing import Any

import torch
import transformers
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model, prepare_model_for_kbit_training

from lora_widgets import LoRAConfig, LoRATrainer, TrainConfig, estimate_memory
from lora_widgets.events import Event, RunEnded, StepMetrics
from lora_widgets.hf import HFRun
from lora_widgets.memory.arch import known_model_config
from lora_widgets.memory.fit import format_bytes
from lora_widgets.memory.quant import measured_quantized_bytes, quantized_weight_bytes
from lora_widgets.quantization import keep_cpu_layout, quantization_config, quantized_layers

Row = tuple[str, str, str, str]
_COMPUTE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def shapes(plan: Any) -> list[tuple[str, Any]]:
    """The models to quantize: two real shapes on CUDA, the quick plan's tiny Llama on the CPU."""
    if plan.device.type != "cuda":
        return [("tiny Llama", plan.config)]
    return [("SmolLM2-135M", plan.config), ("Llama-3.2-1B", known_model_config("Llama-3.2-1B"))]


def quantized(config: Any, device: torch.device, directory: str) -> Any:
    """``config``'s model with random weights, loaded in 4 bits as ``load_model(base="4-bit")`` does."""
    if not os.path.isdir(directory):
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=quantization_config("4-bit", device), device_map={"": device}
    )
    keep_cpu_layout(model)
    return model


def _tokens(config: Any, batch: int, seq: int, steps: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, config.vocab_size, (batch * steps, seq), generator=g)  # [N, T]


def _ours(model: Any, plan: Any, precision: str, tmp: str) -> tuple[RunEnded, list[Event]]:
    config = TrainConfig(learning_rate=1e-3, batch_size=plan.batch, max_steps=plan.steps, warmup_steps=0,
                         schedule="constant", eval_every=None, val_fraction=0.0, precision=precision,
                         output_dir=tmp, block_size=plan.seq, device=str(plan.device), adapter_stats=False,
                         sample_prompts=())  # fmt: skip
    data = _tokens(model.config, plan.batch, plan.seq, plan.steps)
    trainer = LoRATrainer(model, None, data, lora=LoRAConfig(r=8, alpha=16), config=config)
    events: list[Event] = []
    trainer.subscribe(events.append)
    return trainer.run_sync(), events


def _hf(model: Any, plan: Any, precision: str, tmp: str) -> tuple[RunEnded, list[Event]]:
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, PeftLoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    ids = _tokens(model.config, plan.batch, plan.seq, plan.steps)
    args = transformers.TrainingArguments(
        output_dir=tmp, max_steps=plan.steps, per_device_train_batch_size=plan.batch, learning_rate=1e-3,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=plan.device.type == "cpu",
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    hf = transformers.Trainer(
        model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids]
    )
    hf.remove_callback(transformers.PrinterCallback)
    run = HFRun(hf)
    events: list[Event] = []
    run.subscribe(events.append)
    return asyncio.run(run.run()), events


def _speed(events: list[Event], tokens_per_step: int, warmup: int) -> float:
    late = [e for e in events if isinstance(e, StepMetrics) and e.step > warmup]
    if len(late) < 2:
        return math.nan
    return (
        (late[-1].step - late[0].step) * tokens_per_step / max(late[-1].elapsed_s - late[0].elapsed_s, 1e-9)
    )


def _memory_row(name: str, model: Any, plan: Any, precision: str, peak: int | None) -> Row:
    config = model.config
    layers: list[Any] = list(quantized_layers(model).values())
    label = f"{name} 4-bit, b{plan.batch}x{plan.seq}, {precision}"
    if peak is None:  # CPU: the quantized weights
        est = quantized_weight_bytes([(m.out_features, m.in_features) for m in layers], "4bit")
        got = measured_quantized_bytes(model)
        what = "bitsandbytes storage"
    else:
        est = estimate_memory(config, LoRAConfig(r=8, alpha=16), plan.batch, plan.seq, _COMPUTE[precision],
                              base_quantization="4bit", weight_dtype="float32").total  # fmt: skip
        got, what = peak, "max_memory_allocated"
    err = est / got - 1
    status = "ok" if abs(err) <= (0.02 if peak is None else 0.15) else "off"
    return ("qlora memory estimate", label, f"estimate {format_bytes(est)} vs {what} {format_bytes(got)} ({err:+.1%})",
            status)  # fmt: skip


def qlora_rows(plan: Any, tmp: str, deadline: float) -> list[Row]:
    """Train each shape in 4 bits with ours and with HF + PEFT; report speed and the memory check."""
    rows: list[Row] = []
    precision = plan.precisions[0] if plan.device.type == "cuda" else "fp32"
    for name, config in shapes(plan):
        if time.monotonic() > deadline:
            rows.append((f"qlora {name}", "4-bit", "skipped: time budget", "info"))
            continue
        directory = os.path.join(tmp, f"qlora-{name}")
        shape = (
            f"{name} 4-bit NF4, {plan.batch}x{plan.seq} tokens, LoRA r=8 q/v, {precision}, {plan.steps} steps"
        )
        speed: dict[str, float] = {}
        for who, runner in (("ours (lora_widgets.Trainer)", _ours), ("HF LoRATrainer + PEFT via HFRun", _hf)):
            model = quantized(config, plan.device, directory)
            if plan.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(plan.device)
            end, events = runner(model, plan, precision, os.path.join(directory, who.split()[0]))
            peak = torch.cuda.max_memory_allocated(plan.device) if plan.device.type == "cuda" else None
            speed[who] = _speed(events, plan.batch * plan.seq, plan.warmup)
            ok = end.kind == "finished" and end.final_loss is not None and math.isfinite(end.final_loss)
            result = (
                f"loss {end.final_loss:.3f}, {speed[who]:,.0f} tokens/s"
                if ok
                else f"{end.kind}: {end.message[:160]}"
            )
            rows.append((f"qlora train {who}", shape, result, "ok" if ok else "FAIL"))
            if who.startswith("ours") and ok:
                rows.append(_memory_row(name, model, plan, precision, peak))
            del model
        ours, hf = speed.values()
        rows.append((f"qlora tokens/s ours / HF {name}", shape, f"{ours / hf:.3f}x", "info"))
    return rows
