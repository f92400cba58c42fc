"""Estimated vs measured peak memory of one training step, over the accuracy grid (CPU or GPU).

    python benchmarks/bench_memory.py             # the grid of tests/test_memory_accuracy.py + extra rows
    python benchmarks/bench_memory.py --markdown  # as a Markdown table (for docs/memory.md)
    python benchmarks/bench_memory.py --device cuda
    python benchmarks/bench_memory.py --quantized  # a 4-bit / 8-bit base (bitsandbytes), LoRA r=8 (~10 min)

Measured: :func:`lora_widgets.memory.fit.measure_memory` (two AdamW steps; dispatch-level live-bytes tracker
on CPU, ``torch.cuda.max_memory_allocated`` on a GPU). "Naive" is the textbook sum of weights, gradients,
optimizer state and activations, the figure the phase model replaces. The extra rows (not in the test,
because a 21.5 M model or bf16 matmuls are slow on a CPU, or because they show a CPU-only effect) are
marked with *.

``--quantized``: a whole training step on a quantized base (QLoRA), the grid of
``tests/test_qlora_memory.py`` and larger rows (*): two Llama shapes x batch {1, 4} x sequence {128, 256}, 4-bit
(NF4, double quantization) and 8-bit (LLM.int8()), with and without gradient checkpointing, fp32 compute (CPU).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

from transformers import GPT2Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_widgets.lora.layers import LoRAConfig
from tests.test_memory_accuracy import GRID, MODELS, Case, run_case


def gpt2(dropout: float) -> GPT2Config:
    """A 4-block GPT-2 (n_embd 256, vocab 2048) with the given residual/attention/embedding dropout."""
    return GPT2Config(
        vocab_size=2048,
        n_embd=256,
        n_layer=4,
        n_head=4,
        n_positions=512,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=0,
        eos_token_id=0,
    )


EXTRA_MODELS = {"gpt2-3.7M": gpt2(0.0), "gpt2-3.7M dropout 0.1": gpt2(0.1)}
EXTRA = [
    Case("llama-21.5M", LoRAConfig(r=16), 8, 128, "float32"),
    Case("llama-21.5M", None, 4, 128, "bfloat16"),
    Case(
        "llama-21.5M", LoRAConfig(r=16, target_modules="all-linear"), 8, 256, "bfloat16", checkpointing=True
    ),
    Case("gpt2-3.7M", None, 8, 128, "float32"),
    Case("gpt2-3.7M", LoRAConfig(r=8), 8, 128, "bfloat16"),
    Case("gpt2-3.7M dropout 0.1", LoRAConfig(r=8), 8, 128, "float32"),
]


def quantized_rows() -> tuple[list[tuple[str, int, int, str]], int]:
    """(label, estimate, measured, phases) of the quantized-step grid and the larger rows; number in the grid."""
    import transformers

    from tests.test_qlora_memory import STEP_GRID, StepCase, load_quantized, run_step_case

    transformers.logging.set_verbosity_error()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    shapes = [(128, 384, 2, 1024), (256, 704, 4, 2048)]
    extra = [
        StepCase(shape, base, b, s, gc)
        for shape in shapes
        for base in ("4-bit", "8-bit")
        for b, s, gc in ((1, 128, False), (4, 256, False), (4, 256, True))
    ]
    extra += [StepCase(shapes[0], "8-bit", 4, 256, gc, targets=None) for gc in (False, True)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models: dict[tuple[object, ...], object] = {}
        for case in [*STEP_GRID, *extra]:
            key = (case.shape, case.base)
            if key not in models:
                models[key] = load_quantized(Path(tmp), case.shape, case.base)
            est, meas = run_step_case(case, models[key])  # type: ignore[arg-type]
            star = " *" if case in extra else ""
            rows.append(
                (case.label + star, est.total, meas.peak_bytes, f"{est.peak_phase}/{meas.peak_phase}")
            )
    return rows, len(STEP_GRID)


def print_quantized(markdown: bool) -> None:
    start = time.perf_counter()
    rows, in_grid = quantized_rows()
    mib = 1024**2
    if markdown:
        print("| Configuration | Estimate (MiB) | Measured (MiB) | Error | Peak phase (est./meas.) |")
        print("|---|---:|---:|---:|---|")
    for label, est_b, meas_b, phase in rows:
        err = (est_b - meas_b) / meas_b * 100
        if markdown:
            print(f"| {label} | {est_b / mib:.2f} | {meas_b / mib:.2f} | {err:+.1f}% | {phase} |")
        else:
            print(f"{label:<58}  {est_b / mib:>7.2f}MiB  {meas_b / mib:>7.2f}MiB  {err:>+6.1f}%  {phase}")
    errors = [abs(e - m) / m * 100 for _, e, m, _ in rows]
    print(
        f"\nquantized steps: {len(rows)} configurations ({in_grid} in the test), largest error {max(errors):.1f}%, "
        f"mean {sum(errors) / len(errors):.1f}%  ({time.perf_counter() - start:.0f} s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--no-extra", action="store_true", help="only the test grid")
    parser.add_argument("--quantized", action="store_true", help="a quantized base (QLoRA) instead, CPU only")
    args = parser.parse_args()
    if args.quantized:
        print_quantized(args.markdown)
        return
    cases = [(c, False) for c in GRID] + ([] if args.no_extra else [(c, True) for c in EXTRA])
    rows = []
    start = time.perf_counter()
    for case, extra in cases:
        est, meas = run_case(case, {**MODELS, **EXTRA_MODELS}[case.model], device=args.device)
        m = meas.peak_bytes
        rows.append(
            (
                case.label + (" *" if extra else ""),
                est.total,
                m,
                (est.total - m) / m * 100,
                (est.naive_total - m) / m * 100,
                f"{est.peak_phase}/{meas.peak_phase}",
            )
        )
    elapsed = time.perf_counter() - start
    mib = 1024**2
    if args.markdown:
        print(
            "| Configuration | Estimate (MiB) | Measured (MiB) | Error | Naive sum error | Peak phase (est./meas.) |"
        )
        print("|---|---:|---:|---:|---:|---|")
        for label, est_b, meas_b, err, naive, phase in rows:
            print(
                f"| {label} | {est_b / mib:.2f} | {meas_b / mib:.2f} | {err:+.1f}% | {naive:+.0f}% | {phase} |"
            )
    else:
        width = max(len(r[0]) for r in rows)
        print(
            f"{'configuration':<{width}}  {'estimate':>10}  {'measured':>10}  {'error':>7}  {'naive':>6}  phase"
        )
        for label, est_b, meas_b, err, naive, phase in rows:
            print(
                f"{label:<{width}}  {est_b / mib:>7.2f}MiB  {meas_b / mib:>7.2f}MiB  {err:>+6.1f}%  {naive:>+5.0f}%  {phase}"
            )
    grid_errors = [abs(r[3]) for r, (_, extra) in zip(rows, cases, strict=True) if not extra]
    print(
        f"\ntest grid: {len(grid_errors)} configurations, largest error {max(grid_errors):.1f}%, "
        f"mean {sum(grid_errors) / len(grid_errors):.1f}%; naive sum off by up to "
        f"{max(abs(r[4]) for r in rows):.0f}%  ({elapsed:.0f} s on {args.device})"
    )


if __name__ == "__main__":
    main()
