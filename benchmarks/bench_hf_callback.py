"""What watching a transformers.Trainer costs: the same HF run with no callback, with transformers' own progress
callbacks, and attached to the dashboard's event stream (``HFRun``), measured side by side in one process.

Variants, each a fresh ``transformers.Trainer`` + PEFT LoRA (r=8 on q/v) on the shipped tiny base model, token
blocks of ``--block`` tokens, batch ``--batch``, ``logging_steps=1`` (every step logs: the worst case for a
callback), no evaluation, no checkpoints, fp32 on the CPU, seed 0:

- ``none``: ``hf_trainer.train()`` with the printing/progress callbacks removed;
- ``notebook``: transformers' ``NotebookProgressCallback`` (the one Jupyter users get). Run headless here:
  ``IPython.display`` outside a kernel prints the HTML table's repr (sent to /dev/null), so this measures the
  callback's own work (building the HTML) but not the kernel's iopub traffic, which comes on top in a notebook;
- ``progress``: transformers' ``ProgressCallback`` (tqdm, to /dev/null), the default outside notebooks;
- ``hfrun``: ``await HFRun(hf_trainer).run()``: our ``EventCallback`` (a StepMetrics per log with memory,
  tokens/s, ETA, appended to metrics.jsonl) in a worker thread, each event crossing to the loop thread with
  ``call_soon_threadsafe`` to one subscriber.

Timed: the ``train()`` / ``run()`` call only (the trainer is built before). Repetitions are interleaved, with the
order rotated each round; the median and the best of each variant are printed with their ratio to ``none``.
Target (issue 13): hfrun <= 1.03x none.

Usage: python benchmarks/bench_hf_callback.py [--steps 100] [--repeats 5] [--batch 4] [--block 64]
"""

from __future__ import annotations

import os

# Passive OpenMP waiting: on a shared machine spin-waiting threads make step times depend on the load more than
# on the code (see bench_trainer.py). Export OMP_WAIT_POLICY=ACTIVE to measure the default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import asyncio
import contextlib
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers.utils.notebook import NotebookProgressCallback

from lora_widgets import load_base_model
from lora_widgets.hf import HFRun

VARIANTS = ("none", "notebook", "progress", "hfrun")


def make_trainer(
    base_state: dict[str, torch.Tensor], rows: list[dict[str, torch.Tensor]], steps: int, batch: int, out: str
) -> transformers.Trainer:
    """A fresh Trainer on a fresh copy of the base model (same weights, same seed every time)."""
    model, _ = load_base_model()
    model.load_state_dict(base_state)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    args = transformers.TrainingArguments(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=3e-3,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    trainer.remove_callback(transformers.PrinterCallback)
    return trainer


def timed(variant: str, trainer: transformers.Trainer) -> float:
    """Wall time of one training call of ``variant``; output of the progress callbacks goes to /dev/null."""
    if variant == "notebook":
        trainer.add_callback(NotebookProgressCallback())
    elif variant == "progress":
        trainer.add_callback(transformers.ProgressCallback())
    call: Callable[[], Any]
    if variant == "hfrun":
        run = HFRun(trainer)
        seen: list[Any] = []
        run.subscribe(seen.append)
        call = lambda: asyncio.run(run.run())  # noqa: E731
    else:
        call = trainer.train
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        t0 = time.perf_counter()
        result = call()
        elapsed = time.perf_counter() - t0
    if variant == "hfrun":
        assert result.kind == "finished" and sum(e.kind == "step" for e in seen) == trainer.args.max_steps
    return elapsed


def hook_cost_us(trainer: transformers.Trainer, calls: int = 2000) -> float:
    """Microseconds of ``EventCallback`` work per logged step (``on_step_end`` + ``on_log``: memory read, event,
    metrics.jsonl line, one subscriber), timed in a tight loop: a figure the machine's load barely moves."""
    from lora_widgets.hf import EventCallback

    cb = EventCallback()
    seen: list[Any] = []
    cb.subscribe(seen.append)
    args, state, control = trainer.args, trainer.state, trainer.control
    state.max_steps = calls + 1
    cb.on_train_begin(args, state, control, model=trainer.model)
    t0 = time.perf_counter()
    for i in range(1, calls + 1):
        state.global_step = i
        cb.on_step_end(args, state, control)
        cb.on_log(
            args, state, control, logs={"loss": 2.5, "grad_norm": 0.9, "learning_rate": 1e-3, "epoch": 0.1}
        )
    elapsed = time.perf_counter() - t0
    assert len(seen) == calls + 2  # running, RunStarted, one StepMetrics per call
    return elapsed / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block", type=int, default=64)
    a = parser.parse_args()
    transformers.logging.set_verbosity_error()
    logging.getLogger("lora_widgets").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)

    base, _ = load_base_model()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (a.steps * a.batch, a.block), generator=g)  # [N, T]
    rows = [{"input_ids": r, "labels": r} for r in ids]

    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        timed("none", make_trainer(base_state, rows, 5, a.batch, tmp))  # warm-up: allocator, kernels, imports
        for rep in range(a.repeats):
            order = VARIANTS[rep % len(VARIANTS) :] + VARIANTS[: rep % len(VARIANTS)]
            for variant in order:
                trainer = make_trainer(base_state, rows, a.steps, a.batch, os.path.join(tmp, variant))
                times[variant].append(timed(variant, trainer))

    print(
        f"\nHF Trainer + PEFT, shipped model, {a.steps} steps x batch {a.batch} x {a.block} tokens, "
        f"logging_steps=1, {a.repeats} interleaved repeats, torch threads {torch.get_num_threads()}\n"
    )
    print("| Variant | Median wall time | Best | Median / none | Best / none |")
    print("|---|---|---|---|---|")
    med0, best0 = statistics.median(times["none"]), min(times["none"])
    for v in VARIANTS:
        med, best = statistics.median(times[v]), min(times[v])
        print(f"| {v} | {med:.3f} s | {best:.3f} s | {med / med0:.3f}x | {best / best0:.3f}x |")
    with tempfile.TemporaryDirectory() as tmp:
        cost = hook_cost_us(make_trainer(base_state, rows, a.steps, a.batch, tmp))
    step_ms = med0 / a.steps * 1e3
    print(
        f"\nEventCallback's own work: {cost:.0f} us per logged step = {cost / 1e3 / step_ms:.2%} of a "
        f"{step_ms:.1f} ms step (median of none); the rest of any difference above is the machine's noise"
    )
    ratio = statistics.median(times["hfrun"]) / med0
    print(
        f"\nhfrun / none (median) = {ratio:.3f}x (target <= 1.03x): {'met' if ratio <= 1.03 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
