"""Cost of adapter statistics (and sample generations) against training time, measured side by side.

Model: the shipped tiny base model, LoRA r=8 alpha=16 on all linear layers (28 adapters), batch 8 x 128
tokens of the fine-tuning corpus, AdamW, fp32, on the chosen device. Timed, interleaved round by round so
that machine noise hits both alike (medians reported):

* one training step: forward, backward, clipping, ``optimizer.step()``, ``zero_grad``;
* one statistics call as the trainer makes it at an evaluation: :func:`snapshot_adapters` before the step and
  :func:`adapter_stats` after it (gradients, singular values, last-update size), including the host transfer;
* once, the sample generations of an evaluation: ``--prompts`` prompts, ``--new-tokens`` greedy tokens each,
  base and current (the base half can be reused afterwards: ``reuse_base``).

Printed: the ratio stats / step, and the share of training time at one statistics call every
``--every`` steps (default 50, ``TrainConfig.eval_every``). Target (issue 14): <= 2%.

With ``--trainer``, the whole thing as users get it: the real :class:`~lora_widgets.LoRATrainer` on the shipped
model (r=8, alpha=16, all linear layers, ``--steps`` updates, the default ``eval_every=50``) with its adapter
statistics, alerts and samples on (the defaults) and off (``adapter_stats=False, sample_prompts=()``), runs
interleaved ``--repeats`` times, fastest of each reported; plus the run's own accounting from its events
(``AdapterStats.seconds`` and the samples' ``base_seconds + current_seconds`` over the run's elapsed time).

Usage: python benchmarks/bench_adapter_stats.py [--rounds 20] [--every 50] [--device cpu]
       python benchmarks/bench_adapter_stats.py --trainer [--steps 200] [--repeats 2]
"""

from __future__ import annotations

import os

# Spinning OpenMP threads on a shared machine make every timing noisy (see bench_trainer.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from lora_widgets import models as demo
from lora_widgets.data.text import prepare_data
from lora_widgets.events.types import AdapterStats, Event, SampleGenerations
from lora_widgets.health.samples import generate_samples
from lora_widgets.lora.layers import LoRAConfig, apply_lora, remove_lora
from lora_widgets.lora.statistics import adapter_stats, snapshot_adapters
from lora_widgets.training.config import TrainConfig
from lora_widgets.training.trainer import LoRATrainer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _trainer_run(insight: bool, steps: int, device: str, out: str) -> tuple[float, float, float, float]:
    """One LoRATrainer run; returns (wall s, run elapsed s, statistics s, samples s)."""
    model, tokenizer = demo.load_base_model()
    off: dict[str, Any] = {} if insight else {"adapter_stats": False, "sample_prompts": ()}
    config = TrainConfig(max_steps=steps, device=device, output_dir=out, **off)
    trainer = LoRATrainer(model, tokenizer, "python-docs", lora=LoRAConfig(r=8, alpha=16.0, target_modules="all-linear"),
                      config=config)  # fmt: skip
    events: list[Event] = []
    trainer.subscribe(events.append)
    t0 = time.perf_counter()
    end = trainer.run_sync()
    wall = time.perf_counter() - t0
    remove_lora(model)
    stats_s = sum(e.seconds for e in events if isinstance(e, AdapterStats))
    samples_s = sum(e.base_seconds + e.current_seconds for e in events if isinstance(e, SampleGenerations))
    return wall, end.elapsed_s, stats_s, samples_s


def trainer_main(steps: int, repeats: int, device: str) -> None:
    logging.disable(logging.WARNING)
    best: dict[bool, tuple[float, float, float, float]] = {}
    with tempfile.TemporaryDirectory() as out:
        _trainer_run(True, 5, device, out)  # warm-up: imports, tokenizer, allocator
        for _ in range(repeats):
            for insight in (False, True):
                got = _trainer_run(insight, steps, device, out)
                if insight not in best or got[0] < best[insight][0]:
                    best[insight] = got
    (off, _, _, _), (on, elapsed, stats_s, samples_s) = best[False], best[True]
    print(
        f"LoRATrainer, shipped model, r=8 all-linear, {steps} steps, eval_every=50, {device}; fastest of {repeats}:"
    )
    print(f"  statistics, alerts and samples off: {off:7.2f} s")
    print(f"  on (the defaults):                  {on:7.2f} s   ratio on/off = {on / off:.3f}")
    print(f"  accounted in the run's events: statistics {stats_s:.3f} s = {100 * stats_s / elapsed:.2f}% of its "
          f"{elapsed:.1f} s; samples {samples_s:.2f} s = {100 * samples_s / elapsed:.2f}%")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainer", action="store_true", help="time the real LoRATrainer with it on and off")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--every", type=int, default=50, help="steps between statistics calls (eval_every)")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.trainer:
        trainer_main(args.steps, args.repeats, args.device)
        return

    device = torch.device(args.device)
    model, tokenizer = demo.load_base_model(device=device)
    apply_lora(model, LoRAConfig(r=8, alpha=16.0, target_modules="all-linear"))
    data = prepare_data(demo.load_corpus("finetune"), tokenizer, block_size=128, val_fraction=0.1, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    model.train()

    def step(measure: bool) -> tuple[float, float]:
        x = data.train[torch.randint(0, data.train.shape[0], (8,), generator=g)].to(device)  # [8, 128]
        _sync(device)
        t0 = time.perf_counter()
        logits = model(input_ids=x, use_cache=False).logits  # [8, 128, V]
        F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        t1 = time.perf_counter()
        snap = snapshot_adapters(model) if measure else None
        t2 = time.perf_counter()
        opt.step()
        _sync(device)
        t3 = time.perf_counter()
        if measure:
            adapter_stats(model, 1, before=snap, after_backward=True, learning_rate=3e-3)  # transfers to host
        t4 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        t5 = time.perf_counter()
        return (t1 - t0) + (t3 - t2) + (t5 - t4), (t2 - t1) + (t4 - t3)

    timed: Callable[[bool], tuple[float, float]] = step
    for _ in range(3):  # warm-up
        timed(True)
    steps, stats = [], []
    for _ in range(args.rounds):
        steps.append(timed(False)[0])
        stats.append(timed(True)[1])
    step_s, stats_s = statistics.median(steps), statistics.median(stats)

    prompts = [str(t)[:60] for t in demo.load_corpus("finetune")[: args.prompts]]
    t0 = time.perf_counter()
    record = generate_samples(model, tokenizer, prompts, step=0, max_new_tokens=args.new_tokens)
    samples_s = time.perf_counter() - t0
    reused = generate_samples(
        model, tokenizer, prompts, step=0, max_new_tokens=args.new_tokens, reuse_base=record
    )

    interval = args.every * step_s
    print(
        f"device: {device}; {len(params) // 2} adapters, r=8; batch 8 x 128; {args.rounds} rounds (medians)"
    )
    print(f"training step:                    {1e3 * step_s:8.1f} ms")
    print(
        f"adapter statistics (all layers):  {1e3 * stats_s:8.1f} ms   ratio stats/step = {stats_s / step_s:.3f}"
    )
    print(
        f"  share of training time at one call every {args.every} steps: "
        f"{100 * stats_s / (interval + stats_s):.2f}%   (target <= 2%)"
    )
    print(
        f"samples ({args.prompts} prompts x {args.new_tokens} tokens, base + current): {samples_s:6.2f} s "
        f"= {100 * samples_s / (interval + samples_s):.1f}% of training time at every {args.every} steps; "
        f"with the base reused: {reused.current_seconds:.2f} s "
        f"= {100 * reused.current_seconds / (interval + reused.current_seconds):.1f}%"
    )


if __name__ == "__main__":
    main()
