"""QLoRA on the shipped model, on the CPU, beside 16-bit LoRA: validation loss before and after, time per step,
the weights' bytes, and how far the merged (dequantized) model's validation loss is from the 4-bit model it was
trained on. Prints one side-by-side table; about 40 s on 2 cores.

Usage: python benchmarks/bench_qlora.py [--steps 20]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import tempfile
import time
import warnings

import torch
import transformers

from lora_widgets import LoRAConfig, LoRATrainer, TrainConfig
from lora_widgets.lora.layers import merge_lora
from lora_widgets.memory.fit import estimate_memory, format_bytes
from lora_widgets.memory.quant import measured_quantized_bytes
from lora_widgets.models import load_base_model
from lora_widgets.quantization import quantized_layers
from lora_widgets.training.step import evaluate


def frozen_bytes(model: torch.nn.Module) -> int:
    quantized = {id(p) for m in quantized_layers(model).values() for p in m.parameters()}
    rest = sum(
        p.numel() * p.element_size()
        for p in model.parameters()
        if id(p) not in quantized and not p.requires_grad
    )
    return measured_quantized_bytes(model) + rest


def one_run(base: str, steps: int, tmp: str) -> dict[str, float | str]:
    model, tokenizer = load_base_model(base=base)
    config = TrainConfig(max_steps=steps, eval_every=steps, eval_batches=8, batch_size=8, warmup_steps=2,
                         learning_rate=5e-3, output_dir=tmp, sample_prompts=(), seed=0, adapter_stats=False)  # fmt: skip
    lora = LoRAConfig(r=8, alpha=16, target_modules="all-linear")
    trainer = LoRATrainer(model, tokenizer, "python-docs", lora=lora, config=config)
    t0 = time.perf_counter()
    end = trainer.run_sync()
    wall = time.perf_counter() - t0
    h = trainer.history
    per_step = (h.step[-1] - h.step[1]) and (
        float(h.elapsed_s[-1] - h.elapsed_s[1]) / float(h.step[-1] - h.step[1])
    )
    estimate = estimate_memory(model, None, 8, 128)  # the model as it is: its adapters, its base
    out: dict[str, float | str] = {
        "state": end.kind,
        "val before": float(h.val_loss[0]),
        "val after": float(h.val_loss[-1]),
        "s/step": per_step,
        "run s": wall,
        "frozen bytes": frozen_bytes(model),
        "estimated frozen": estimate.frozen_weights,
    }
    if base == "4-bit":
        blocks = (
            trainer._blocks().val
        )  # the run's own validation blocks [n, 128] (a benchmark may look inside)
        assert isinstance(blocks, torch.Tensor)
        batches = [blocks[i : i + 8] for i in range(0, min(len(blocks), 64), 8)]
        quantized_val = evaluate(model, batches, contextlib.nullcontext)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merge_lora(model, unload=True)
        out["val merged"] = evaluate(model, batches, contextlib.nullcontext)
        out["val 4-bit (same batches)"] = quantized_val
        out["merged - 4-bit val"] = f"{out['val merged'] - quantized_val:+.2e}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    a = parser.parse_args()
    transformers.logging.set_verbosity_error()
    logging.getLogger("lora_widgets").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        # alternated, so that a busy machine slows both alike: 16, 4, 4, 16; the faster of each kind is shown
        runs = [(base, one_run(base, a.steps, tmp)) for base in ("16-bit", "4-bit", "4-bit", "16-bit")]
        rows = {
            base: min((r for b, r in runs if b == base), key=lambda r: float(r["s/step"]))
            for base in ("16-bit", "4-bit")
        }
    keys = list(dict.fromkeys(k for r in rows.values() for k in r))
    print(f"\nshipped model, LoRA r=8 all-linear, {a.steps} steps of 8 x 128 tokens, CPU fp32 compute\n")
    print("| | 16-bit | 4-bit | 4-bit / 16-bit |\n|---|---:|---:|---:|")
    for k in keys:
        a16, a4 = rows["16-bit"].get(k, ""), rows["4-bit"].get(k, "")
        fmt = (lambda v: format_bytes(v)) if "bytes" in k or "frozen" in k else (lambda v: f"{v:.4g}")
        show = [fmt(v) if isinstance(v, float | int) else str(v) for v in (a16, a4)]
        ratio = (
            f"{a4 / a16:.3f}" if isinstance(a16, float | int) and isinstance(a4, float | int) and a16 else ""
        )
        print(f"| {k} | {show[0]} | {show[1]} | {ratio} |")


if __name__ == "__main__":
    main()
